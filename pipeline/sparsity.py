"""Sparsity rules: which latents of a batch of pre-activations are active.

A rule is one object the transcoder holds (`Transcoder.sparsity`). It picks the active set two
ways: `training` (may look at the whole batch) and `inference` (batch-independent, so a row's code
does not depend on its neighbours). It owns the state it learns while training (an nn.Module, so
its buffers move with the transcoder and are saved in checkpoints), the tensors it adds to the
transcoder file (`file_tensors`), and its description in the file metadata (`spec`). A new rule
is a new class here plus one line in RULES.

BatchTopK (Bussmann et al. 2024): training keeps the k*B largest positive pre-activations of the
whole batch; inference keeps pre > `threshold`, an EMA of the smallest activation kept per batch
(decay n / (10 + n) after n batches, capped at THRESHOLD_DECAY, so short runs are not biased by
their start). Its first `per_row_batches` training batches keep each row's own k largest instead
(per-token TopK): at init a pre-activation's size is mostly its row's norm, so the batch-wide
budget goes to the loudest rows (measured at init 0.5: the quietest tenth of a batch got 0.3
latents a row, the loudest tenth 225, 105 of 1,024 rows none) and the first updates fit them
alone; starting per row took a plain dictionary's held-out FVU from 0.292 to 0.282
(docs/benchmarks.md). The threshold learns the batch-wide cutoff from those batches too.

TopK (per token): each row keeps its own k largest positive pre-activations, in training and at
inference; measured to train better than BatchTopK at a short budget (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.util import UserError

THRESHOLD_DECAY = 0.99   # EMA decay of the inference threshold (after a warm start, see observe)
PER_ROW_BATCHES = 30     # BatchTopK's first training batches select per row (measured, docs/benchmarks.md)
CANDIDATE_STRIDE = 61    # subsample stride used to find a cheap lower bound for the BatchTopK cutoff


def true_positions(mask: Tensor) -> Tensor:
    """Ascending positions of the True entries of a 1-D bool mask that is mostly False, as
    mask.nonzero() gives them, about 3x faster on CPU: nonzero over the mask read as 8-byte words
    finds the few words holding a True, and only those words' bytes are searched (one 1-D nonzero
    over them: a 2-D nonzero of the (words, 8) bytes cost twice as much)."""
    if mask.numel() % 8 or mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)                  # words with a True byte
    hits = mask.view(-1, 8).index_select(0, words).view(-1).nonzero().squeeze(1)   # byte 8 * i + j of word i
    return words.index_select(0, hits >> 3) * 8 + (hits & 7)


def at_least(flat: Tensor, cut: Tensor, out: Tensor | None = None) -> Tensor:
    """flat >= cut as a bool mask, for a POSITIVE cut (into `out` when given: a reused buffer spares
    the page faults of a fresh one). On CPU, float32 values are compared as their int32 bit patterns
    (measured 1.3x faster than the float compare): a non-negative float's bits order as the float
    does, and a negative float's are a negative int32, below the cut's. Only a NaN differs (one with
    the sign bit clear counts as >= cut), and a NaN pre-activation stops training anyway."""
    if out is None:
        out = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    if flat.dtype == torch.float32 and flat.device.type == "cpu":
        return torch.ge(flat.view(torch.int32), int(cut.view(torch.int32)), out=out)
    return torch.ge(flat, cut, out=out)


def batch_topk_indices(flat: Tensor, n_keep: int, scratch: Tensor | None = None) -> Tensor:
    """Ascending indices of the n_keep largest POSITIVE values of `flat` (ties at the cutoff all
    kept). A strided subsample gives a cheap lower bound c, so the exact top-n_keep is found among
    the few values >= c instead of over everything; exact either way (falls back when c is too high).
    scratch: a bool buffer of flat's size to reuse for the mask (see at_least)."""
    tiny = torch.finfo(flat.dtype).tiny
    if n_keep >= flat.numel():
        return (flat > 0).nonzero().squeeze(1)
    sample = flat[::CANDIDATE_STRIDE]
    q = min(sample.numel(), int(1.5 * n_keep / CANDIDATE_STRIDE) + 64)
    c = sample.topk(q, sorted=False).values.min().clamp(min=tiny)
    cand = true_positions(at_least(flat, c, scratch))          # one pass over B * L
    if len(cand) < n_keep:
        if float(c) <= tiny:                                   # fewer positives than n_keep: keep all
            return cand
        cut = flat.topk(n_keep, sorted=False).values.min().clamp(min=tiny)
        return (flat >= cut).nonzero().squeeze(1)
    vals = flat.index_select(0, cand)
    # the n_keep-th largest is the (m - n_keep + 1)-th smallest: a selection, cheaper than topk
    cut = vals.kthvalue(len(vals) - n_keep + 1).values
    return cand[vals >= cut]


def row_topk_indices(pre: Tensor, k: int) -> Tensor:
    """pre (B, L) -> ascending flat indices of each row's k largest positive values."""
    top = pre.topk(min(k, pre.shape[1]), dim=1, sorted=False)
    flat = top.indices + torch.arange(pre.shape[0], device=pre.device)[:, None] * pre.shape[1]
    return flat[top.values > 0].sort().values


class BatchTopK(nn.Module):
    name = "batchtopk"
    OLD_SPEC = {"per_row_batches": 0}   # what a spec written before the key existed meant

    def __init__(self, k: int, per_row_batches: int = PER_ROW_BATCHES):
        super().__init__()
        self.k = int(k)
        self.per_row_batches = int(per_row_batches)
        self.register_buffer("threshold", torch.tensor(0.0))   # 0 = not estimated yet
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))   # training batches observed
        self._per_row_done = self.per_row_batches <= 0   # so `updates` is read on the host only while it matters
        self._cut: Tensor | None = None   # the batch-wide cutoff of a per-row batch, for observe
        self._mask: Tensor | None = None  # scratch for the candidate mask, reused batch to batch

    def training_indices(self, pre: Tensor) -> Tensor:
        """pre (B, L), no grad -> ascending flat indices of the active pairs."""
        flat = pre.reshape(-1)
        batch_wide = batch_topk_indices(flat, self.k * pre.shape[0], self._scratch(flat))
        if self._per_row():
            self._cut = flat[batch_wide].min() if len(batch_wide) else None
            return row_topk_indices(pre, self.k)
        return batch_wide

    def _scratch(self, flat: Tensor) -> Tensor:
        """The mask buffer of the last batch if it fits (a fresh 5 MB mask a step cost page faults)."""
        buf = self._mask
        if buf is None or buf.numel() != flat.numel() or buf.device != flat.device:
            buf = self._mask = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
        return buf

    def _per_row(self) -> bool:
        if not self._per_row_done:
            self._per_row_done = int(self.updates) >= self.per_row_batches
        return not self._per_row_done

    def inference_indices(self, pre: Tensor) -> Tensor:
        cut = self.threshold.clamp(min=torch.finfo(pre.dtype).tiny)
        return (pre.reshape(-1) > cut).nonzero().squeeze(1)

    def inference_dense(self, pre: Tensor) -> Tensor:
        """pre (B, L) -> activations (B, L), zero where inactive."""
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre)).clamp(min=0)

    @torch.no_grad()
    def observe(self, vals: Tensor) -> None:
        """After a training batch: vals (nnz,) the kept activations. Updates the threshold; no host sync."""
        vals = self.batch_min(vals)
        if len(vals):
            n = self.updates.double()
            decay = torch.clamp(n / (10 + n), max=THRESHOLD_DECAY).to(self.threshold.dtype)
            self.threshold.copy_(self.threshold * decay + (1 - decay) * vals[0])
            self.updates += 1

    def batch_min(self, vals: Tensor) -> Tensor:
        """What `observe` learns from a batch whose kept activations are `vals`: (1,) the batch-wide
        cutoff (their smallest; in a per-row batch the cutoff the batch-wide rule would have used),
        or (0,) when nothing was kept. Under torchrun the ranks take the minimum of theirs."""
        if self._cut is not None:      # a per-row batch
            cut, self._cut = self._cut.reshape(1), None
            return cut
        return vals.min().reshape(1) if len(vals) else vals[:0]

    def spec(self) -> dict[str, Any]:
        """What the file metadata records: enough to rebuild the rule."""
        return {"rule": self.name, "k": self.k, "per_row_batches": self.per_row_batches}

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._per_row_done = self.per_row_batches <= 0    # re-read `updates` (a resumed run)

    def summary(self) -> dict[str, float]:
        """Scalars for metrics and summaries."""
        return {"threshold": float(self.threshold)}

    def file_tensors(self) -> dict[str, Tensor]:
        """Tensors the transcoder file holds for this rule (the names are part of the file layout)."""
        return {"threshold": self.threshold}


class TopK(nn.Module):
    """Per-token TopK (Gao et al. 2024; sparsify's rule): every row keeps its own k largest positive
    pre-activations, in training and at inference alike, so a code never depends on its batch and
    there is nothing to learn (no threshold, no file tensors)."""
    name = "topk"

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def training_indices(self, pre: Tensor) -> Tensor:
        """pre (B, L) -> ascending flat indices of each row's k largest positive values."""
        return row_topk_indices(pre, self.k)

    def inference_indices(self, pre: Tensor) -> Tensor:
        return self.training_indices(pre)

    def inference_dense(self, pre: Tensor) -> Tensor:
        top = pre.topk(min(self.k, pre.shape[1]), dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp(min=0))

    def observe(self, vals: Tensor) -> None:
        pass

    def spec(self) -> dict[str, Any]:
        return {"rule": self.name, "k": self.k}

    def summary(self) -> dict[str, float]:
        return {}

    def file_tensors(self) -> dict[str, Tensor]:
        return {}


RULES: dict[str, type[nn.Module]] = {"batchtopk": BatchTopK, "topk": TopK}


def rule_from_spec(spec: dict[str, Any]) -> nn.Module:
    spec = dict(spec)
    name = spec.pop("rule")
    if name not in RULES:
        raise UserError(f"unknown sparsity rule {name!r} (this tc knows {', '.join(sorted(RULES))}): "
                        "read the file with the tc version that wrote it")
    rule = RULES[name]
    return rule(**{**getattr(rule, "OLD_SPEC", {}), **spec})

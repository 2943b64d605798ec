"""The language-model side of eval: splice a replacement for the MLP output into the model and
measure next-token loss on held-out text (method in docs/eval.md).

Passes over the same tokens: clean, and once per splice (the transcoder's prediction,
zero-ablation; for a set of transcoders, every layer's at once); per scored position the CE and
KL(clean || spliced), summed in float64.

Two ways to run them, with the same numbers to float tolerance (tests/test_evaluate.py):
``shared`` (the default) runs the blocks before the spliced layer once, stacks the passes into
one batch for the rest, stops before the unembedding and computes logits, CE and KL a few
positions at a time, so no (B, T, vocab) tensor is ever held; ``separate`` is the plain
reference, three full forwards with the model's own logits. The held-out text: when it is the store's own text source, the store's sequences are re-packed from
the same deterministic stream (and checked token for token against the store), every document
they touched is skipped, and evaluation starts at the next untouched document.
"""
from __future__ import annotations

import contextlib
import math
import re
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.store import Store
from pipeline.transcoder import Transcoder
from pipeline.util import UserError

# A replacement for the MLP output: (source (B, T, d), clean target (B, T, d)) -> new target (B, T, d).
# The transcoder is one; the tests splice the identity and zeros through the same code.
Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A splice: the replacements one pass applies together, keyed by (source hook, target hook). A
# transcoder set spliced in at once is one splice of several layers; each layer's source is read
# in the same forward, so it sees the layers before it already replaced.
Splice = dict[tuple[str, str], Replacement]

LOGITS_BUDGET = 128 * 2 ** 20   # logits elements per forward batch when --batch-size is not given (512 MB fp32)
SCORE_CHUNK = 128               # positions per CE/KL chunk: bounds the float32 (chunk, vocab) temporaries
# The shared path: positions per stacked forward (all passes together) when --batch-size is not
# given, and logits elements per scoring chunk (all passes together; 256 MB in float32).
FORWARD_POSITIONS = 4096
SCORE_ELEMENTS = 64 * 2 ** 20
SCORE_SUB = 2                   # positions per CE/KL step within a chunk (its scratch fits the CPU cache)


def fraction_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float | None:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 = as good as the MLP, 0 = as bad as no MLP.

    None when zero-ablation does not change the loss (the ratio means nothing then).
    """
    gap = ce_zero - ce_clean
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        return None
    return (ce_zero - ce_spliced) / gap


def score_mask(tokens: torch.Tensor, bos_id: int, include_bos: bool) -> torch.Tensor:
    """(B, T-1) bool: which next-token predictions count. Position t predicts token t+1.

    A prediction whose target is BOS is never scored (BOS is a document separator the packing
    inserted, not text). Predictions made from a BOS position are scored only with include_bos:
    by default the MLP output there is left clean, so they would only dilute the differences.
    """
    keep = tokens[:, 1:] != bos_id
    if not include_bos:
        keep &= tokens[:, :-1] != bos_id
    return keep


def position_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    ref_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per scored position: next-token CE (N,), and KL(ref || this) (N,) when ref_logits is given.

    logits, ref_logits: (B, T, V) in any float dtype; tokens (B, T); mask (B, T-1) from score_mask.
    Works on SCORE_CHUNK positions at a time in float32 so a 256k vocabulary never needs a full
    (B, T, V) float32 temporary. With lse = logsumexp of the logits l and p = softmax(l_ref):
    CE = lse - l[target] and KL = sum_v p (l_ref - l) - lse_ref + lse (no log-softmax tensors).
    """
    b_idx, t_idx = mask.nonzero(as_tuple=True)          # (N,), (N,)
    targets = tokens[b_idx, t_idx + 1]                  # (N,)
    ce, kl = [], []
    for a in range(0, len(b_idx), SCORE_CHUNK):
        sl = slice(a, a + SCORE_CHUNK)
        lg = logits[b_idx[sl], t_idx[sl]].float()                       # (n, V)
        lse = torch.logsumexp(lg, dim=-1)                               # (n,)
        ce.append(lse - lg.gather(1, targets[sl, None]).squeeze(1))
        if ref_logits is not None:
            ref = ref_logits[b_idx[sl], t_idx[sl]].float()              # (n, V), a copy (advanced indexing)
            lse_ref = torch.logsumexp(ref, dim=-1)
            diff = ref - lg
            p_ref = ref.sub_(lse_ref[:, None]).exp_()                   # in place: one (n, V) buffer fewer
            kl.append((torch.linalg.vecdot(p_ref, diff) - lse_ref + lse).clamp_min(0.0))
    empty = logits.new_zeros(0, dtype=torch.float32)
    ce_all = torch.cat(ce) if ce else empty
    kl_all = (torch.cat(kl) if kl else empty) if ref_logits is not None else None
    return ce_all, kl_all


def splice_hooks(source_hook: str, target_hook: str, replace: Replacement,
                 keep_clean: torch.Tensor | None) -> list[tuple[str, Callable]]:
    """Forward hooks that put replace(source, clean target) in place of the target activation.

    The source is read from the same forward pass (it is upstream of the target, so it is the
    clean model's source). keep_clean (B, T) bool marks positions whose clean target is kept
    (BOS by default: the transcoder never trained on BOS rows).
    """
    seen: dict[str, torch.Tensor] = {}

    def read_source(tensor: torch.Tensor, hook: Any) -> None:
        seen["source"] = tensor

    def write_target(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        new = replace(seen["source"], tensor).to(dtype=tensor.dtype, device=tensor.device)   # (B, T, d)
        if new.shape != tensor.shape:
            raise RuntimeError(f"the replacement returned shape {tuple(new.shape)}, expected {tuple(tensor.shape)}")
        if keep_clean is not None:
            new = torch.where(keep_clean[..., None], tensor, new)
        return new

    return [(source_hook, read_source), (target_hook, write_target)]


def identity_replacement(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The true MLP output: splicing it must leave the model unchanged."""
    return target


def zero_replacement(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of the MLP output."""
    return torch.zeros_like(target)


def transcoder_replacement(transcoder: Transcoder) -> Replacement:
    """The transcoder's prediction of the target from the source, row by row (inference encoding)."""
    def replace(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        flat = source.reshape(-1, source.shape[-1]).float()          # (B*T, d)
        return transcoder.predict(flat).reshape(target.shape)
    return replace


class LossTotals:
    """Running sums for one way of running the model (clean, spliced, zero, ...)."""

    def __init__(self) -> None:
        self.n = 0
        self.ce = 0.0
        self.kl = 0.0
        self.diff = 0.0      # sum of (CE - CE_clean) per position, and its square, for a standard error
        self.diff_sq = 0.0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None, ce_clean: torch.Tensor) -> None:
        d = (ce - ce_clean).double()
        self.n += len(ce)
        self.ce += float(ce.double().sum())
        self.kl += float(kl.double().sum()) if kl is not None else 0.0
        self.diff += float(d.sum())
        self.diff_sq += float((d * d).sum())

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        mean_diff = self.diff / n
        var = max(self.diff_sq / n - mean_diff ** 2, 0.0)
        return {"ce": self.ce / n, "kl": self.kl / n, "ce_increase": mean_diff,
                "ce_increase_stderr": math.sqrt(var / max(self.n - 1, 1))}


@torch.no_grad()
def score_batch(model: Any, tokens: torch.Tensor, splices: dict[str, Splice], bos_id: int, include_bos: bool,
                totals: dict[str, LossTotals]) -> None:
    """Run `tokens` (B, T) clean and once per splice; add CE and KL(clean || spliced) to totals."""
    mask = score_mask(tokens, bos_id, include_bos)                     # (B, T-1)
    keep_clean = None if include_bos else tokens == bos_id             # (B, T)
    clean_logits = model(tokens, return_type="logits")                 # (B, T, V)
    ce_clean, _ = position_losses(clean_logits, tokens, mask)
    totals.setdefault("clean", LossTotals()).add(ce_clean, torch.zeros_like(ce_clean), ce_clean)
    for name, splice in splices.items():
        hooks = [h for (source, target), replace in splice.items()
                 for h in splice_hooks(source, target, replace, keep_clean)]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        ce, kl = position_losses(logits, tokens, mask, ref_logits=clean_logits)
        del logits
        totals.setdefault(name, LossTotals()).add(ce, kl, ce_clean)


class _Done(Exception):
    """Raised from the hook before the unembedding: the shared path makes its logits itself."""


def splice_layer(source_hook: str, target_hook: str) -> int | None:
    """The block both hooks belong to ('blocks.6.hook_resid_mid' -> 6), or None if they differ."""
    layers = {m.group(1) for m in (re.match(r"blocks\.(\d+)\.", h) for h in (source_hook, target_hook)) if m}
    both = all(h.startswith("blocks.") for h in (source_hook, target_hook))
    return int(layers.pop()) if both and len(layers) == 1 else None


def _pass_through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def skipped_blocks(model: Any, n: int) -> Iterator[None]:
    """Blocks 0..n-1 return their input unchanged while inside.

    The bridge's start_at_layer feeds the residual in at block n but still runs the blocks
    before it (and throws their output away); skipping them is what makes the prefix shared.
    """
    layers = [block.original_component for block in model.blocks[:n]]
    for layer in layers:
        layer.forward = _pass_through
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def first_layer(splices: Iterable[Splice]) -> int | None:
    """The first block any splice touches: the blocks before it are shared by every pass (None
    when a hook pair is not inside one block, so nothing can be shared)."""
    layers = [splice_layer(source, target) for splice in splices for source, target in splice]
    return None if not layers or None in layers else min(layers)


def stacked_hooks(splices: list[Splice], batch: int, keep_clean: torch.Tensor | None,
                  final: dict[str, torch.Tensor]) -> list[tuple[str, Callable]]:
    """Hooks for the stacked forward: rows [0, batch) stay clean, rows [(p+1) batch, (p+2) batch)
    get splices[p] (at each of its hook pairs; other pairs keep that pass's own target); the
    residual entering the unembedding goes to final["h"] and ends the forward."""
    pairs = list(dict.fromkeys(pair for splice in splices for pair in splice))
    hooks: list[tuple[str, Callable]] = []
    for source_hook, target_hook in pairs:
        hooks += _stacked_pair(source_hook, target_hook, [s.get((source_hook, target_hook)) for s in splices],
                               batch, keep_clean)

    def stop(tensor: torch.Tensor, hook: Any) -> None:
        final["h"] = tensor
        raise _Done

    return hooks + [("unembed.hook_in", stop)]


def _stacked_pair(source_hook: str, target_hook: str, replaces: list[Replacement | None], batch: int,
                  keep_clean: torch.Tensor | None) -> list[tuple[str, Callable]]:
    """One hook pair of stacked_hooks: replaces[p] (None: leave it) for the rows of pass p + 1."""
    seen: dict[str, torch.Tensor] = {}

    def read_source(tensor: torch.Tensor, hook: Any) -> None:
        seen["source"] = tensor

    def write_target(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        parts = [tensor[:batch]]
        for p, replace in enumerate(replaces, start=1):
            rows = slice(p * batch, (p + 1) * batch)
            if replace is None:
                parts.append(tensor[rows])
                continue
            new = replace(seen["source"][rows], tensor[rows]).to(dtype=tensor.dtype, device=tensor.device)
            if new.shape != tensor[rows].shape:
                raise RuntimeError(f"the replacement returned shape {tuple(new.shape)}, expected {tuple(tensor[rows].shape)}")
            parts.append(new)
        out = torch.cat(parts)
        if keep_clean is not None:
            out = torch.where(keep_clean.repeat(len(parts), 1)[..., None], tensor, out)
        return out

    return [(source_hook, read_source), (target_hook, write_target)]


def unembed_logits(model: Any, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits (…, V) float32 from h (…, d), the residual entering its unembedding.

    A plain Linear unembedding is one matmul into `out` when given (a reused buffer: a fresh one
    this size costs page faults, about 15% of the matmul on the demo). The final softcap (Gemma 2)
    is applied by the Hugging Face model after its unembedding, so it is repeated here; a test
    checks these logits against the model's own.
    """
    linear = getattr(model.unembed, "original_component", None)
    if isinstance(linear, torch.nn.Linear) and out is not None and out.dtype == h.dtype:
        flat = torch.mm(h.reshape(-1, h.shape[-1]), linear.weight.T, out=out.view(-1, out.shape[-1]))
        if linear.bias is not None and bool(linear.bias.any()):
            flat += linear.bias
        logits = out.float()
    else:
        logits = model.unembed(h).float()
    config = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = logits.div_(cap).tanh_().mul_(cap)      # in place, in the order Hugging Face applies it
    return logits


def chunk_losses(logits: torch.Tensor, targets: torch.Tensor,
                 work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (P, n, V) float32, pass 0 clean; targets (n,). CE (P, n), KL(clean || pass p) (P-1, n).

    The formulas of position_losses: CE = lse - l[target], KL = sum_v p_clean (l_clean - l)
    - lse_clean + lse. One (P, n, V) scratch buffer (`work`, reused across chunks: fresh
    buffers of this size cost page faults) holds exp(l - max), whose clean row becomes the
    clean probabilities and whose next row then holds l_clean - l.
    """
    top = logits.amax(dim=-1, keepdim=True)                                         # (P, n, 1)
    ex = torch.sub(logits, top, out=work).exp_()
    total = ex.sum(dim=-1)                                                          # (P, n)
    lse = top.squeeze(-1) + total.log()
    ce = lse - logits.gather(2, targets.expand(len(logits), -1)[..., None]).squeeze(2)
    p_clean = ex[0].div_(total[0, :, None])                                         # (n, V)
    kl = []
    for p in range(1, len(logits)):
        diff = torch.sub(logits[0], logits[p], out=ex[1])                           # ex[1:] is free now
        kl.append((torch.linalg.vecdot(p_clean, diff) - lse[0] + lse[p]).clamp_min(0.0))
    return ce, torch.stack(kl) if kl else ce[:0]


def stacked_losses(model: Any, final: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                   advance: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CE (P, N) and KL (P-1, N) at the N scored positions from final (P, B, T, d), the residual
    entering the unembedding per pass; logits are made SCORE_ELEMENTS at a time, only where scored.
    advance(f), when given, is called after each chunk with the fraction f of the N it scored."""
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    targets = tokens[b_idx, t_idx + 1]
    h = final[:, b_idx, t_idx]                                                      # (P, N, d)
    n = max(1, SCORE_ELEMENTS // (len(final) * int(model.cfg.d_vocab)))
    ce, kl = [], []
    work = final.new_empty(len(final), SCORE_SUB, int(model.cfg.d_vocab), dtype=torch.float32)
    buffer = h.new_empty(len(final) * n, int(model.cfg.d_vocab))                   # reused by every chunk
    for a in range(0, len(targets), n):
        part = h[:, a:a + n]
        out = buffer[:part.shape[0] * part.shape[1]].view(*part.shape[:2], -1)
        logits = unembed_logits(model, part, out)                                   # (P, n, V)
        # The unembedding runs on n positions (a large matmul is efficient); the losses on
        # SCORE_SUB at a time, whose scratch stays in the CPU cache: twice as fast on the demo.
        for b in range(0, logits.shape[1], SCORE_SUB):
            sub = logits[:, b:b + SCORE_SUB]
            c, k = chunk_losses(sub, targets[a + b:a + b + sub.shape[1]], work[:, :sub.shape[1]])
            ce.append(c)
            kl.append(k)
        if advance is not None:
            advance(part.shape[1] / len(targets))
    if not ce:
        return final.new_zeros(len(final), 0), final.new_zeros(len(final) - 1, 0)
    return torch.cat(ce, dim=1), torch.cat(kl, dim=1)


@torch.no_grad()
def score_batch_shared(model: Any, tokens: torch.Tensor, layer: int, splices: dict[str, Splice], bos_id: int,
                       include_bos: bool, totals: dict[str, LossTotals],
                       advance: Callable[[float], None] | None = None) -> None:
    """score_batch's numbers, with the blocks before `layer` (first_layer of the splices) run once
    for every pass.

    Those blocks see only the tokens, so their output is the same in every pass; from block
    `layer` on the passes are stacked into one batch of (1 + len(splices)) * B rows.
    advance(n), when given, is called as the scoring goes with the batch's tokens it covered
    (a batch of the demo takes tens of seconds: the bar moves within it).
    """
    names = list(splices)
    B, T = tokens.shape
    mask = score_mask(tokens, bos_id, include_bos)
    keep_clean = None if include_bos else tokens == bos_id
    resid = model(tokens, stop_at_layer=layer)                        # (B, T, d): the input of block `layer`
    stacked = resid.repeat(1 + len(names), 1, 1)                      # (P*B, T, d)
    final: dict[str, torch.Tensor] = {}
    hooks = stacked_hooks([splices[n] for n in names], B, keep_clean, final)
    with skipped_blocks(model, layer):
        try:
            model.run_with_hooks(stacked, start_at_layer=layer, fwd_hooks=hooks, return_type=None)
        except _Done:
            pass
    if "h" not in final:
        raise RuntimeError("the forward ended without reaching unembed.hook_in")
    step = None if advance is None else (lambda f: advance(f * tokens.numel()))
    ce, kl = stacked_losses(model, final["h"].view(1 + len(names), B, T, -1), tokens, mask, step)
    totals.setdefault("clean", LossTotals()).add(ce[0], torch.zeros_like(ce[0]), ce[0])
    for p, name in enumerate(names):
        totals.setdefault(name, LossTotals()).add(ce[p + 1], kl[p], ce[0])


def lm_losses(model: Any, sequences: np.ndarray, source_hook: str, target_hook: str,
              replacements: dict[str, Replacement], bos_id: int, include_bos: bool, batch_size: int,
              device: str, progress: bool = True, method: str = "shared") -> dict[str, dict[str, float]]:
    """Mean CE, KL from clean and CE increase per replacement of one hook pair over `sequences`
    (n, T) int64: splice_losses with one-pair splices."""
    splices = {name: {(source_hook, target_hook): replace} for name, replace in replacements.items()}
    return splice_losses(model, sequences, splices, bos_id, include_bos, batch_size, device, progress, method)


def splice_losses(model: Any, sequences: np.ndarray, splices: dict[str, Splice], bos_id: int, include_bos: bool,
                  batch_size: int, device: str, progress: bool = True,
                  method: str = "shared") -> dict[str, dict[str, float]]:
    """Mean CE, KL from clean and CE increase per splice over `sequences` (n, T) int64.

    method "shared" (one prefix, stacked passes, chunked logits) or "separate" (the reference:
    a full forward per pass). Hooks outside one block fall back to "separate".
    """
    layer = first_layer(splices.values())
    if method not in ("shared", "separate"):
        raise ValueError(f"unknown method {method!r}")
    totals: dict[str, LossTotals] = {}
    bar = tqdm(total=sequences.size, unit="tok", unit_scale=True, desc="eval: LM loss", disable=not progress)
    for a in range(0, len(sequences), batch_size):
        batch = torch.from_numpy(sequences[a:a + batch_size]).long().to(device)
        before = bar.n
        if method == "shared" and layer is not None:
            score_batch_shared(model, batch, layer, splices, bos_id, include_bos, totals, bar.update)
        else:
            score_batch(model, batch, splices, bos_id, include_bos, totals)
        bar.update(max(0.0, before + batch.numel() - bar.n))   # the rest of the batch (all of it when separate)
    bar.close()
    out = {name: t.summary() for name, t in totals.items()}
    out["clean"]["n_scored"] = totals["clean"].n
    return out


def splice_report(losses: dict[str, dict[str, float]], spliced: str = "spliced", zero: str = "zero") -> dict[str, Any]:
    """The headline numbers from lm_losses' output."""
    c, s, z = losses["clean"]["ce"], losses[spliced]["ce"], losses[zero]["ce"]
    return {"ce_clean": c, "ce_spliced": s, "ce_zero": z, "ce_increase": s - c,
            "ce_increase_stderr": losses[spliced]["ce_increase_stderr"],
            "kl_spliced": losses[spliced]["kl"], "kl_zero": losses[zero]["kl"],
            "fraction_recovered": fraction_recovered(c, s, z), "n_scored_tokens": losses["clean"]["n_scored"]}


class CountingIterator:
    """Wraps a document iterator and counts how many documents were pulled from it."""

    def __init__(self, docs: Iterable[str]):
        self.docs = iter(docs)
        self.pulled = 0

    def __iter__(self) -> "CountingIterator":
        return self

    def __next__(self) -> str:
        doc = next(self.docs)
        self.pulled += 1
        return doc


def held_out_sequences(docs: Iterable[str], tokenizer: Any, bos_id: int, seq_len: int, n_seqs: int,
                       skip_store: Store | None, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """(n, seq_len) int64 evaluation sequences from `docs`, after the text `skip_store` was made from.

    With skip_store: the store's rows are re-packed from the same stream with the store's packing
    (one document at a time, so no document is read ahead), compared token for token with the
    store (a mismatch means the text or tokenizer changed, and held-out cannot be guaranteed), and
    every document they touched is skipped, including the one the store's last row cut through.
    The evaluation sequences are packed from the next document on.
    """
    stream = CountingIterator(docs)
    info: dict[str, Any] = {"skipped_store_sequences": 0, "skipped_documents": 0}
    if skip_store is not None:
        L = skip_store.seq_len
        n_store = skip_store.n_rows // L
        stored = skip_store.tokens
        packed = islice(pack_sequences_lazy(stream, tokenizer, L, bos_id), n_store)
        count = 0
        for i, row in enumerate(tqdm(packed, total=n_store, unit="seq", desc="eval: skip the store's text",
                                     disable=not progress)):
            if not np.array_equal(row, stored[i * L:(i + 1) * L]):
                raise UserError(f"re-reading the store's text does not reproduce its tokens (sequence {i} differs): "
                                "the dataset or tokenizer changed since `tc cache`, so held-out text cannot be "
                                "guaranteed; pass --dataset with text the store was not made from")
            count += 1
        if count < n_store:
            raise UserError(f"the text ended after {count} of the store's {n_store} sequences: the dataset changed "
                            "since `tc cache`; pass --dataset with text the store was not made from")
        info = {"skipped_store_sequences": n_store, "skipped_documents": stream.pulled}
    from pipeline.text import pack_sequences

    seqs = list(islice(pack_sequences(stream, tokenizer, seq_len, bos_id), n_seqs))
    if not seqs:
        raise UserError("no held-out text is left after the text the store holds (it used the whole dataset): "
                        "pass --dataset with other text, or another --split")
    return np.stack(seqs), info


def pack_sequences_lazy(docs: Iterable[str], tokenizer: Any, seq_len: int, bos_id: int) -> Iterator[np.ndarray]:
    """The store's packing with one document per tokenizer call: it reads no document ahead."""
    from pipeline.text import pack_sequences

    return pack_sequences(docs, tokenizer, seq_len, bos_id, batch_docs=1)


def auto_batch_size(seq_len: int, vocab: int) -> int:
    """Sequences per batch for the separate path: one batch's logits near LOGITS_BUDGET elements."""
    return max(1, min(64, LOGITS_BUDGET // max(seq_len * vocab, 1)))


def shared_batch_size(seq_len: int, n_passes: int) -> int:
    """Sequences per batch for the shared path: FORWARD_POSITIONS positions in the stacked forward."""
    return max(1, min(64, FORWARD_POSITIONS // max(seq_len * n_passes, 1)))

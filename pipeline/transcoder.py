"""The Matryoshka BatchTopK transcoder: one nn.Module, `forward(x_in, y_target)` on normalised rows.

Shapes: B rows in a batch, d_in source width, d_out target width, L = d_latent latents,
G Matryoshka groups (sizes `groups`, summing to L), nnz active (row, latent) pairs in a batch.

Choices (also in docs/transcoder.md):
- Normalisation: source and target each use their OWN store statistics: subtract the per-dim mean,
  divide by one scalar scale = sqrt(sum of per-dim variances / d), so E||x_n||^2 = d. Predictions
  are de-normalised with the TARGET's mean and scale.
- Encoder: pre = x_n W_enc^T + b_enc. Which pre-activations are active is the sparsity rule's
  choice (`self.sparsity`, pipeline/sparsity.py): BatchTopK while training, a batch-independent
  threshold at inference.
- Decoding lives in one place, `decode_prefixes`: the training loss, eval's splice and its
  per-prefix FVU all get their predictions from it (`forward`, `predict`, `predict_prefixes`);
  samples and export read activations from `encode` / `encode_rows`, the same encoder.
- Skip path (`skip=True`, `tc train`'s default; Paulo, Shabalin and Belrose 2025): a dense linear map
  W_skip (d_out, d_in), zero at init, trained with the rest; `decode_prefixes` adds W_skip x_n to
  EVERY prefix's prediction, so each prefix's latents explain what the linear map does not.
  Activations (and so samples) do not depend on it.
- Sparse compute: the dense pre-activations are computed once without autograd (to choose the
  active set); the backward of encoder and decoder only touches the nnz active pairs
  (O(nnz * d) instead of O(B * L * d)). `dense=True` runs the plain dense reference instead.
  The G prefix terms come from `PrefixMSE` (running sums, no (G, B, d) autograd graph).
- Matryoshka loss: for every prefix boundary m_i (cumulative group sizes) the MSE (mean over rows
  and dims, normalised space) of the target from latents < m_i plus b_dec. The total is the MEAN
  of the G prefix terms (each prefix weighted equally), plus aux_coef * AuxK loss.
- Dead latents: a latent that has not fired for `dead_tokens` training tokens is dead. AuxK
  (Gao et al. 2024): per row, the top `aux_k` positive pre-activations among dead latents
  reconstruct the DETACHED residual (y_n - full prediction).detach(); its MSE is scaled by aux_coef.
  The main path's pre-activations are reused; dense matmuls over the dead columns when a row
  keeps at least AUX_DENSE_DENSITY of them, else the per-pair kernels (same sums).
- Decoder rows have unit norm: `project_decoder_grad()` removes each row's gradient component
  parallel to the row before the optimiser step, `normalize_decoder()` renormalises after it.
- Init: W_dec rows random unit vectors; W_enc rows = encoder_init (default 0.6) x W_dec rows when
  d_in == d_out (tied init, as Gao et al., scaled down), else independent random vectors of that
  norm; b_enc = 0, b_dec = 0 (the normalised target's mean is 0). The scale trades dead latents
  against early FVU (bench/dead_latents.py): at 0.1 Adam's first steps rewrite the few winning rows
  and most latents never fire (51% dead on held-out text after 300 steps); at 1.0 almost all live
  but the random first codes cost FVU (0.314 vs 0.274); 0.5 gives 21% dead at FVU 0.285. With
  BatchTopK's per-row start (pipeline/sparsity.py), which removes much of that early cost, 0.6
  gives a Matryoshka transcoder 9% dead at FVU 0.282.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.sparsity import BatchTopK, rule_from_spec
from pipeline.util import UserError, replaced_atomically

FORMAT = "tc-transcoder"
FORMAT_VERSION = 2       # 2: the metadata names the sparsity rule ("sparsity"); version 1 files are BatchTopK
READABLE_VERSIONS = (1, 2)
ENCODER_INIT_SCALE = 0.6  # encoder rows start at this norm (decoder rows at 1): measured, docs/benchmarks.md
AUX_DENSE_DENSITY = 1 / 8    # AuxK by matmuls once a row keeps this share of the dead columns (measured crossover)
GATHER_CHUNK = 8192      # entries per chunk in the decoder backward (bounds nnz x d temporaries)
PROJECT_CHUNK = 128      # decoder rows per pass of the gradient projection (stays in L2: 4x faster, measured)


@dataclass
class TranscoderOutput:
    """What one forward pass returns. Tensors, so nothing forces a GPU sync until it is logged."""
    loss: Tensor          # () mean of prefix MSEs + aux_coef * aux_loss (has grad)
    mse: Tensor           # (G,) MSE of prefix i (latents < m_i) in normalised space (has grad)
    aux_loss: Tensor      # () AuxK MSE on the detached residual (0 when no latent is dead)
    fvu: Tensor           # () fraction of variance unexplained by the full prediction (detached)
    fvu_levels: Tensor    # (G,) FVU of each prefix (detached); fvu_levels[-1] == fvu
    l0: Tensor            # () mean number of active latents per row
    rows: Tensor          # (nnz,) int64 batch row of each active pair, sorted by (group, row, latent)
    cols: Tensor          # (nnz,) int64 latent index of each active pair
    vals: Tensor          # (nnz,) activation value of each active pair (detached)
    pred: Tensor          # (B, d_out) full prediction, normalised space (detached)


# ----------------------------------------------------------------------------- sparse kernels

def segment_offsets(sorted_ids: Tensor, n_segments: int) -> Tensor:
    """Start offset of each segment 0..n-1 in an array sorted by segment id: (n_segments,)."""
    counts = torch.bincount(sorted_ids, minlength=n_segments)
    return counts.cumsum(0) - counts


class SparseEncode(torch.autograd.Function):
    """vals[e] = x[rows[e]] . W_enc[cols[e]] + b_enc[cols[e]], values already known from the dense
    no-grad pass; the backward costs O(nnz * d) instead of a dense (L, B) x (B, d) matmul."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, rows: Tensor, cols: Tensor,
                vals: Tensor, col_order: Tensor) -> Tensor:
        ctx.save_for_backward(x, w_enc, rows, cols, col_order)
        return vals.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (nnz,)
        x, w_enc, rows, cols, col_order = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).index_add_(0, rows, w_enc[cols] * grad[:, None])
        if ctx.needs_input_grad[1]:
            # row l of the gradient is the sum of g_e * x[rows_e] over the entries of latent l
            offsets = segment_offsets(cols[col_order], w_enc.shape[0])
            grad_w = F.embedding_bag(rows[col_order], x, offsets, mode="sum",
                                     per_sample_weights=grad[col_order])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(w_enc.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_x, grad_w, grad_b, None, None, None, None


class ColumnsEncode(torch.autograd.Function):
    """acts (B, n) = x . W_enc[cols]^T + b_enc[cols] where acts > 0, else 0, the values already known
    (AuxK's kept pre-activations of the dead latents `cols`); the backward is two dense matmuls over
    those n columns only, for when too many pairs are kept for SparseEncode's gathers to pay."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, cols: Tensor, acts: Tensor) -> Tensor:
        ctx.save_for_backward(x, w_enc, cols, acts)
        return acts.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (B, n)
        x, w_enc, cols, acts = ctx.saved_tensors
        # acts >= 0, so its sign is the 0/1 mask of the kept values (masked_fill: 7x slower on CPU)
        grad = grad * acts.sign()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ w_enc.index_select(0, cols)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_enc).index_copy_(0, cols, grad.t() @ x)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(w_enc.shape[0], dtype=grad.dtype, device=grad.device).index_copy_(0, cols, grad.sum(0))
        return grad_x, grad_w, grad_b, None, None


class SparseDecode(torch.autograd.Function):
    """out[bag] = sum over entries e of that bag of vals[e] * W_dec[cols[e]]: (n_bags, d_out).
    Entries must be sorted by bag. Gradients touch only the nnz active decoder rows."""

    @staticmethod
    def forward(ctx, vals: Tensor, w_dec: Tensor, cols: Tensor, bags: Tensor, n_bags: int,
                col_order: Tensor) -> Tensor:
        offsets = segment_offsets(bags, n_bags)
        ctx.save_for_backward(vals, w_dec, cols, bags, col_order, offsets)
        return F.embedding_bag(cols, w_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out: (n_bags, d_out)
        vals, w_dec, cols, bags, col_order, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = per_sample_weight_grad(grad_out, w_dec, cols, bags, offsets)
        if ctx.needs_input_grad[1]:
            offsets = segment_offsets(cols[col_order], w_dec.shape[0])
            grad_w = F.embedding_bag(bags[col_order], grad_out, offsets, mode="sum",
                                     per_sample_weights=vals[col_order])
        return grad_vals, grad_w, None, None, None, None


def stable_order(ids: Tensor) -> Tensor:
    """argsort of small non-negative integer ids, equal ids kept in their order (a stable sort of
    int32 keys: about twice as fast on CPU as torch.argsort of the int64 ids)."""
    return torch.sort(ids.to(torch.int32), stable=True).indices


def per_sample_weight_grad(grad_out: Tensor, weight: Tensor, cols: Tensor, bags: Tensor,
                           offsets: Tensor) -> Tensor:
    """grad_vals[e] = grad_out[bags[e]] . weight[cols[e]] without (nnz, d) temporaries when torch's
    embedding-bag kernel is available (several times faster than gathering), else in chunks."""
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, weight, cols, offsets, bags, 0, -1)      # mode 0 = sum
    except (AttributeError, RuntimeError, NotImplementedError):
        out = torch.empty(len(cols), dtype=grad_out.dtype, device=grad_out.device)
        for a in range(0, len(cols), GATHER_CHUNK):
            b = a + GATHER_CHUNK
            out[a:b] = (grad_out[bags[a:b]] * weight[cols[a:b]]).sum(-1)
        return out


class PrefixMSE(torch.autograd.Function):
    """The Matryoshka terms in one pass: mse[i] = mean((y - base - parts[0] - ... - parts[i])^2), (G,),
    from parts (G, B, d) (group i's decode alone), base (B, d) or (d,) (b_dec, plus the skip path)
    and y (B, d). Also returns the errors err (G, B, d), not differentiable. Running sums instead of
    cumsum/broadcast/pow/mean on (G, B, d) tensors and their autograd graph: on CPU those cost about
    a fifth of a step's non-matmul time (torch's cumsum over the leading dim is strided and its
    backward flips twice); the gradient is a reverse running sum of the errors."""

    @staticmethod
    def forward(ctx, parts: Tensor, base: Tensor, y: Tensor):
        G = parts.shape[0]
        err = torch.empty_like(parts)
        torch.sub(y - base, parts[0], out=err[0])
        for i in range(1, G):
            torch.sub(err[i - 1], parts[i], out=err[i])
        flat = err.view(G, -1)
        mse = torch.linalg.vector_norm(flat, dim=1).square() / flat.shape[1]   # a norm is one fast pass
        ctx.save_for_backward(err)
        ctx.set_materialize_grads(False)    # err takes no gradient: no (G, B, d) zeros for it
        ctx.base_shape = base.shape
        ctx.mark_non_differentiable(err)
        return mse, err

    @staticmethod
    def backward(ctx, grad_mse: Tensor | None, _grad_err):
        (err,) = ctx.saved_tensors
        if grad_mse is None:
            return None, None, None
        G = err.shape[0]
        coef = grad_mse * (-2.0 / err[0].numel())             # d mse_i / d pred_i = -2 err_i / (B d)
        grad = torch.empty_like(err)                          # grad[j] = sum over i >= j of coef_i err_i
        torch.mul(err[G - 1], coef[G - 1], out=grad[G - 1])
        for i in range(G - 2, -1, -1):
            torch.addcmul(grad[i + 1], err[i], coef[i], out=grad[i])
        grad_base = grad[0] if len(ctx.base_shape) == 2 else grad[0].sum(0)
        return grad, grad_base, None


# ----------------------------------------------------------------------------- the module

class Transcoder(nn.Module):
    def __init__(self, d_in: int, d_out: int, groups: list[int], k: int | None = None, *, aux_k: int = 512,
                 aux_coef: float = 1 / 32, dead_tokens: int = 100_000, dense: bool = False,
                 meta: dict[str, Any] | None = None, seed: int | None = None, sparsity: nn.Module | None = None,
                 skip: bool = False, encoder_init: float = ENCODER_INIT_SCALE):
        super().__init__()
        if sum(groups) <= 0 or any(g <= 0 for g in groups):
            raise ValueError(f"groups must be positive sizes, got {groups}")
        if (sparsity is None) == (k is None):
            raise ValueError("give exactly one of k (BatchTopK) and sparsity (a rule from pipeline/sparsity.py)")
        self.d_in, self.d_out = d_in, d_out
        self.sparsity = sparsity if sparsity is not None else BatchTopK(k)
        self.aux_k, self.aux_coef, self.dead_tokens, self.dense = aux_k, aux_coef, dead_tokens, dense
        self.meta = dict(meta or {})   # model, layer, hooks: recorded in the safetensors metadata
        self.set_groups(groups)
        L = self.d_latent
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(L, d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if d_in == d_out:
            w_enc = w_dec.clone()
        else:
            w_enc = torch.randn(L, d_in, generator=gen)
            w_enc /= w_enc.norm(dim=1, keepdim=True)
        # between small first codes (0.1: fast start, but most latents never fire) and unit rows
        # (almost all fire, but their random codes cost FVU early): measured, see the module docstring
        w_enc *= encoder_init
        self.W_enc = nn.Parameter(w_enc)                  # (L, d_in)
        self.b_enc = nn.Parameter(torch.zeros(L))         # (L,)
        self.W_dec = nn.Parameter(w_dec)                  # (L, d_out)
        self.b_dec = nn.Parameter(torch.zeros(d_out))     # (d_out,)
        # zero at init: training starts from the plain transcoder and adds only what helps
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if skip else None   # (d_out, d_in)
        self.register_buffer("source_mean", torch.zeros(d_in))
        self.register_buffer("source_scale", torch.tensor(1.0))
        self.register_buffer("target_mean", torch.zeros(d_out))
        self.register_buffer("target_scale", torch.tensor(1.0))
        # training state (saved in checkpoints, not in the exported layout)
        self.register_buffer("tokens_since_fired", torch.zeros(L, dtype=torch.int64))

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    @property
    def k(self) -> int | None:
        """Active latents per row of the rule, when it has such a number."""
        return getattr(self.sparsity, "k", None)

    # -- configuration

    def set_groups(self, groups: list[int]) -> None:
        """Group sizes (sum = d_latent). Changing them on a trained model re-cuts the prefixes."""
        groups = [int(g) for g in groups]
        if hasattr(self, "W_enc") and sum(groups) != self.d_latent:
            raise ValueError(f"groups {groups} do not sum to d_latent {self.d_latent}")
        self.groups = groups
        self.d_latent = sum(groups)
        self.boundaries = [sum(groups[: i + 1]) for i in range(len(groups))]   # prefix ends m_i
        starts = torch.tensor([0] + self.boundaries[:-1])
        self._group_starts = starts   # (G,) first latent of each group (CPU; moved on use)

    def set_normalization(self, source_mean: Tensor, source_scale: float, target_mean: Tensor,
                          target_scale: float) -> None:
        self.source_mean.copy_(torch.as_tensor(source_mean, dtype=torch.float32))
        self.source_scale.fill_(float(source_scale))
        self.target_mean.copy_(torch.as_tensor(target_mean, dtype=torch.float32))
        self.target_scale.fill_(float(target_scale))

    # -- normalisation

    def normalize_source(self, x: Tensor) -> Tensor:
        return (x.float() - self.source_mean) / self.source_scale

    def normalize_target(self, y: Tensor) -> Tensor:
        return (y.float() - self.target_mean) / self.target_scale

    def denormalize_target(self, y_n: Tensor) -> Tensor:
        """Normalised prediction -> target units, with the TARGET's statistics."""
        return y_n * self.target_scale + self.target_mean

    # -- selection

    def _pre(self, x_n: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_n, self.W_enc.t())   # (B, L), no relu: cutoffs are > 0

    def _select(self, pre: Tensor, use_threshold: bool, by_group: bool = True) -> tuple[Tensor, Tensor]:
        """Active (rows, cols), sorted by (group, row, latent), or by (row, latent) when not
        by_group. pre: (B, L), no grad. use_threshold: the rule's batch-independent inference
        choice, else its training choice."""
        L = pre.shape[1]
        if use_threshold:
            idx = self.sparsity.inference_indices(pre)
        else:
            idx = self.sparsity.training_indices(pre)
        rows, cols = idx // L, idx % L                 # row-major: sorted by (row, latent)
        if by_group and len(self.groups) > 1:
            # regroup by latent group; a stable sort keeps the row order inside each group
            order = stable_order(self.group_of(cols))
            rows, cols = rows[order], cols[order]
        return rows, cols

    def group_of(self, cols: Tensor) -> Tensor:
        return torch.bucketize(cols, self._group_starts.to(cols.device), right=True) - 1

    # -- forward

    def forward(self, x_n: Tensor, y_n: Tensor, use_threshold: bool = False,
                update_stats: bool | None = None) -> TranscoderOutput:
        """x_n: (B, d_in), y_n: (B, d_out), both NORMALISED. The rule's training choice unless
        use_threshold. update_stats (default: self.training) updates the dead-latent counters and
        the rule's learned state (BatchTopK's threshold)."""
        if update_stats is None:
            update_stats = self.training
        B = x_n.shape[0]
        with torch.no_grad():
            pre = self._pre(x_n)                                       # (B, L)
            rows, cols = self._select(pre, use_threshold)              # (nnz,), (nnz,)
            raw_vals = pre.view(-1).index_select(0, rows * pre.shape[1] + cols)   # (nnz,) all > 0; pre[rows, cols], 2x faster
        if self.dense:
            preds = self._dense_decode_prefixes(x_n, rows, cols, pre)  # (G, B, d_out)
            err = y_n.unsqueeze(0) - preds
            mse = err.pow(2).mean(dim=(1, 2))                          # (G,)
            err = err.detach()
        else:
            col_order = stable_order(cols)
            vals = SparseEncode.apply(x_n, self.W_enc, self.b_enc, rows, cols, raw_vals, col_order)
            parts = self.decode_groups(rows, cols, vals, B, col_order)  # (G, B, d_out) group i alone
            mse, err = PrefixMSE.apply(parts, self.bias(x_n), y_n)     # (G,), (G, B, d_out) detached
        aux = self._aux_loss(x_n, err[-1], pre)
        loss = mse.mean() + self.aux_coef * aux
        with torch.no_grad():
            total_var = (y_n - y_n.mean(0)).pow(2).sum().clamp(min=1e-12)
            fvu_levels = mse.detach() * err[0].numel() / total_var
            if update_stats:
                self._update_stats(cols, raw_vals, B, learn_rule=not use_threshold)
        return TranscoderOutput(loss=loss, mse=mse, aux_loss=aux, fvu=fvu_levels[-1], fvu_levels=fvu_levels,
                                l0=torch.tensor(len(cols) / B), rows=rows, cols=cols, vals=raw_vals,
                                pred=y_n - err[-1])

    def decode_prefixes(self, rows: Tensor, cols: Tensor, vals: Tensor, B: int,
                        col_order: Tensor | None = None, prefixes: bool = True,
                        x_n: Tensor | None = None) -> Tensor:
        """The prediction of every Matryoshka prefix in normalised target units, (G, B, d_out):
        prefix i from latents < m_i, plus b_dec, plus the skip path W_skip x_n when the transcoder
        has one (x_n: the (B, d_in) normalised source, needed then). (rows, cols, vals) are the
        active pairs sorted by (group, row, latent), as `_select` gives them. Sparse (one embedding-bag per (group, row)),
        never B x L x d; differentiable in vals and W_dec (pass col_order = argsort(cols) then).
        prefixes=False: only the whole dictionary's prediction, (1, B, d_out), from pairs sorted by
        (row, latent) (`_select(..., by_group=False)`); a G-th of the work, for inference."""
        return self.decode_groups(rows, cols, vals, B, col_order, prefixes).cumsum(0) + self.bias(x_n)

    def decode_groups(self, rows: Tensor, cols: Tensor, vals: Tensor, B: int, col_order: Tensor | None = None,
                      by_group: bool = True) -> Tensor:
        """What each group's latents alone decode to, (G, B, d_out), no bias (decode_prefixes sums
        them); the whole dictionary as one group, (1, B, d_out), when not by_group."""
        if by_group:
            n_groups, bags = len(self.groups), self.group_of(cols) * B + rows   # sorted by construction
        else:
            n_groups, bags = 1, rows
        parts = SparseDecode.apply(vals, self.W_dec, cols, bags, n_groups * B, col_order)
        return parts.view(n_groups, B, self.d_out)

    def bias(self, x_n: Tensor | None) -> Tensor:
        """What every prefix's prediction adds to its latents' decode: b_dec, plus W_skip x_n with a
        skip path; (d_out,) or (B, d_out)."""
        if self.W_skip is None:
            return self.b_dec
        if x_n is None:
            raise ValueError("a skip transcoder's decode needs the normalised source x_n")
        return torch.addmm(self.b_dec, x_n, self.W_skip.t())

    def _dense_decode_prefixes(self, x_n: Tensor, rows: Tensor, cols: Tensor, pre: Tensor) -> Tensor:
        """Reference for decode_prefixes (and the SAELens way): dense acts (B, L) @ W_dec per group."""
        mask = torch.zeros_like(pre)
        mask[rows, cols] = 1.0
        acts = torch.relu(x_n @ self.W_enc.t() + self.b_enc) * mask   # (B, L) with grad
        parts = torch.stack([acts[:, a:b] @ self.W_dec[a:b] for a, b in
                             zip([0] + self.boundaries[:-1], self.boundaries)])
        return parts.cumsum(0) + self.bias(x_n)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_tokens   # (L,) bool

    def _aux_loss(self, x_n: Tensor, residual: Tensor, pre: Tensor) -> Tensor:
        """AuxK: the top aux_k dead latents per row reconstruct the detached residual (B, d_out)
        (y_n minus the full prediction, no grad to the main path). pre: the main path's (B, L)
        pre-activations, reused: the dead columns are gathered once and ranked per row."""
        dead = self.dead_mask().nonzero().squeeze(1)               # (n_dead,)
        if len(dead) == 0 or self.aux_k <= 0 or not torch.is_grad_enabled():
            return x_n.new_zeros(())
        with torch.no_grad():
            pre_dead = pre.index_select(1, dead)                   # (B, n_dead)
            ka = min(self.aux_k, len(dead))
            if ka < len(dead):
                top = pre_dead.topk(ka, dim=1, sorted=False)
                acts = torch.zeros_like(pre_dead).scatter_(1, top.indices, top.values.clamp(min=0))
                best = top.values
            else:
                acts = best = pre_dead.clamp(min=0)                # (B, n_dead), the kept values, else 0
        if not bool(best.max() > 0):                               # no dead latent has a positive pre-activation
            return x_n.new_zeros(())
        if not self.dense and ka >= AUX_DENSE_DENSITY * len(dead):
            # dense enough (at most ka of a row's n_dead are kept) that matmuls over the dead columns
            # beat per-pair gathers (aux_k 512 of 1,024 dead columns is half of them): the same sums
            vals = ColumnsEncode.apply(x_n, self.W_enc, self.b_enc, dead, acts)
            aux_pred = vals @ self.W_dec.index_select(0, dead)    # (B, d_out)
            return (residual - aux_pred).pow(2).mean()
        with torch.no_grad():
            pairs = acts.nonzero()                                 # sorted by row
            rows, cols = pairs[:, 0], dead[pairs[:, 1]]
            raw_vals = acts[pairs[:, 0], pairs[:, 1]]
        if self.dense:
            acts = torch.relu(x_n @ self.W_enc.t() + self.b_enc)
            mask = torch.zeros_like(acts)
            mask[rows, cols] = 1.0
            aux_pred = (acts * mask) @ self.W_dec
        else:
            col_order = stable_order(cols)
            vals = SparseEncode.apply(x_n, self.W_enc, self.b_enc, rows, cols, raw_vals, col_order)
            aux_pred = SparseDecode.apply(vals, self.W_dec, cols, rows, x_n.shape[0], col_order)   # (B, d_out)
        return (residual - aux_pred).pow(2).mean()

    def _update_stats(self, cols: Tensor, vals: Tensor, B: int, learn_rule: bool = True) -> None:
        """Dead-latent counters, and what the sparsity rule learns from a batch its training choice
        picked (learn_rule): the inference threshold must not learn from its own choices."""
        self.tokens_since_fired += B
        self.tokens_since_fired[cols] = 0
        if learn_rule:
            self.sparsity.observe(vals)

    # -- decoder norm

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the part of each decoder row's gradient that would change its norm."""
        if self.W_dec.grad is not None:
            w, grad = self.W_dec, self.W_dec.grad
            # in blocks of rows, so each block's dots and update find it in cache (one (L, d)
            # vecdot temporary and a second pass over both tensors cost 4x as much)
            n = PROJECT_CHUNK if w.device.type == "cpu" else len(w)   # a GPU wants one launch
            for a in range(0, len(w), n):
                g, r = grad[a:a + n], w[a:a + n]
                g.addcmul_(r, torch.linalg.vecdot(g, r).unsqueeze(1), value=-1)

    @torch.no_grad()
    def is_finite(self) -> bool:
        """No NaN or inf in any weight (one reduction per tensor)."""
        return all(bool(torch.isfinite(p).all()) for p in self.parameters())

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    # -- inference on raw activations

    @torch.no_grad()
    def encode(self, x_raw: Tensor) -> Tensor:
        """(B, d_in) raw source -> (B, L) dense activations, the rule's inference (batch-independent)."""
        return self.sparsity.inference_dense(self._pre(self.normalize_source(x_raw)))

    @torch.no_grad()
    def encode_rows(self, source: np.ndarray) -> Tensor:
        """Raw store rows (n, d_in), any float dtype (fp16 as stored) -> (n, L) float32 activations
        on the transcoder's device (inference rule)."""
        return self.encode(torch.from_numpy(source).to(self.W_enc.device).float()).float()

    @torch.no_grad()
    def encode_sparse(self, x_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, d_in) raw source -> (rows, cols, vals) of the inference encoding."""
        pre = self._pre(self.normalize_source(x_raw))
        rows, cols = self._select(pre, use_threshold=True)
        return rows, cols, pre[rows, cols]

    @torch.no_grad()
    def predict_prefixes(self, x_raw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, d_in) raw source -> the prediction of every prefix in raw target units (G, B, d_out),
        and the active (rows, cols) pairs (inference rule)."""
        x_n = self.normalize_source(x_raw)
        pre = self._pre(x_n)
        rows, cols = self._select(pre, use_threshold=True)
        preds = self.decode_prefixes(rows, cols, pre[rows, cols], x_raw.shape[0], x_n=x_n)
        return self.denormalize_target(preds), rows, cols

    @torch.no_grad()
    def predict(self, x_raw: Tensor) -> Tensor:
        """(B, d_in) raw source -> (B, d_out) predicted raw target (the whole dictionary)."""
        x_n = self.normalize_source(x_raw)
        pre = self._pre(x_n)
        rows, cols = self._select(pre, use_threshold=True, by_group=False)
        y_n = self.decode_prefixes(rows, cols, pre[rows, cols], x_raw.shape[0], prefixes=False, x_n=x_n)[0]
        return self.denormalize_target(y_n)

    # -- files

    def save(self, path: str | Path) -> None:
        """The documented safetensors layout (docs/transcoder.md); written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.file_tensors().items()}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "d_in": str(self.d_in),
                "d_out": str(self.d_out), "d_latent": str(self.d_latent),
                "sparsity": json.dumps(self.sparsity.spec()), **({"k": str(self.k)} if self.k is not None else {}),
                "groups": json.dumps(self.groups), "aux_k": str(self.aux_k), "aux_coef": repr(self.aux_coef),
                "dead_tokens": str(self.dead_tokens), "skip": json.dumps(self.skip),
                "hooks": json.dumps(self.meta.get("hooks", {})), "meta": json.dumps(self.meta)}
        with replaced_atomically(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Transcoder":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise UserError(f"no transcoder at {path}: train one with `tc train`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        version = str(meta.get("format_version", ""))
        if meta.get("format") != FORMAT or not version.isdigit() or int(version) not in READABLE_VERSIONS:
            readable = ", ".join(f"v{v}" for v in READABLE_VERSIONS)
            raise UserError(f"{path} is not a {FORMAT} file this tc reads ({readable}; found "
                            f"{meta.get('format')} v{meta.get('format_version')})")
        # version 1 files are all BatchTopK, their k a metadata key of its own
        spec = json.loads(meta["sparsity"]) if "sparsity" in meta else {"rule": "batchtopk", "k": int(meta["k"])}
        model = cls(int(meta["d_in"]), int(meta["d_out"]), json.loads(meta["groups"]),
                    aux_k=int(meta.get("aux_k", 512)), aux_coef=float(meta.get("aux_coef", 1 / 32)),
                    dead_tokens=int(meta.get("dead_tokens", 100_000)), meta=json.loads(meta.get("meta", "{}")),
                    sparsity=rule_from_spec(spec), skip=json.loads(meta.get("skip", "false")))
        model.load_file_tensors(load_file(str(path)))
        return model.to(device)

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors of the file layout (docs/transcoder.md), by their names in the file."""
        skip = {"W_skip": self.W_skip} if self.skip else {}
        return {**{name: getattr(self, name) for name in EXPORTED}, **skip, **self.sparsity.file_tensors()}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        for name, mine in self.file_tensors().items():
            mine.copy_(tensors[name])


EXPORTED = ["W_enc", "b_enc", "W_dec", "b_dec", "source_mean", "source_scale", "target_mean", "target_scale"]


def norm_constants(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Store.stats() -> per-side mean (d,) and scalar scale sqrt(sum(var)/d), so E||x_n||^2 = d."""
    out = {}
    for side in ("source", "target"):
        mean = torch.as_tensor(stats[side]["mean"], dtype=torch.float64)
        var = torch.as_tensor(stats[side]["var"], dtype=torch.float64)
        scale = math.sqrt(max(float(var.sum()) / len(var), 1e-12))
        out[f"{side}_mean"] = mean.float()
        out[f"{side}_scale"] = scale
    return out

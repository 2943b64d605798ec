"""`tc train` under torchrun: what the ranks of one training job exchange (docs/distributed.md).

Every rank holds the same transcoder and optimiser and trains on its own slice of each global
batch (the single-process batch; pipeline/loader.py `share`). One step agrees on everything the
single process computes over the whole batch:

- BatchTopK's cutoff: the k x B largest pre-activations of the GLOBAL batch (each rank's own top
  k x B values are gathered; the cutoff is the k x B-th largest of them all, so the active set is
  the one a single process picks, ties included);
- the gradients: summed over the ranks and divided by their number (every loss term is a mean
  over rows, and the slices are equal, so that is the global batch's gradient);
- the dead-latent counters (a latent fired if it fired on any rank, the window counts the global
  batch's tokens) and the inference threshold's update (the smallest kept activation of all ranks);
- the logged metrics (loss, FVU from summed squared errors and variances, L0) and whether a
  checkpoint is due (any rank's clock).

Weights, optimiser state, counters and threshold are therefore the same on every rank; only their
float rounding differs from one process (sums in another order). The feature-sample buffers are
each rank's own and are merged into rank 0's at every checkpoint and at the end.

Tensor collectives go over NCCL when training on GPUs (a group of their own), else over the job's
gloo group; pickled objects (a checkpoint, sample buffers) and the loader's exchange of rows (each
rank reads only its own chunks) always over gloo.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.dist import Job
from pipeline.sparsity import BatchTopK, batch_topk_indices, row_topk_indices


class Sync:
    """The collectives of one training job; a method per thing the ranks agree on."""

    def __init__(self, job: Job, device: torch.device):
        self.job, self.world = job, job.world
        self.group = None                                  # the job's gloo group
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self.group = job._collective(lambda: dist.new_group(backend="nccl"))

    def _reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        self.job._collective(lambda: dist.all_reduce(t, op=op, group=self.group))
        return t

    def exchange_rows(self, out: Tensor, send: Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        """The loader's exchange of fp16 CPU rows (pipeline/loader.py `_Share`): each rank reads its
        own chunks only and sends every other rank the rows of its slice they hold. Over gloo (the
        job's default group: all_to_all_single takes uneven splits there), from the training thread."""
        self.job._collective(lambda: dist.all_to_all_single(out, send, out_splits, in_splits))

    # -- the step

    def attach(self, model: Any) -> None:
        """A BatchTopK rule of `model` picks over the global batch from now on."""
        if type(model.sparsity) is BatchTopK:
            rule = GlobalBatchTopK(model.sparsity.k, model.sparsity.per_row_batches, self)
            rule.load_state_dict(model.sparsity.state_dict())
            model.sparsity = rule.to(model.W_enc.device)

    def batch_topk(self, flat: Tensor, n_keep: int) -> Tensor:
        """Ascending indices into this rank's `flat` of the pairs in the global batch's n_keep largest
        positive values (ties at the cutoff all kept, as batch_topk_indices does for one process).
        Each rank first sends only its own top `share_size` values (a rank holds about n_keep / W of
        the global top: its rows are a random slice); if that cannot prove the cutoff, all n_keep."""
        idx = batch_topk_indices(flat, n_keep)      # holds every local value the global top can hold
        vals = flat[idx]
        cut = None
        for m in dict.fromkeys((share_size(n_keep, self.world), n_keep)):
            cut = global_cut(self._gather_top(vals, m), n_keep)
            if cut is not None:
                break
        return idx[vals >= cut.clamp(min=torch.finfo(flat.dtype).tiny)]   # fewer positives: keep them all

    def _gather_top(self, vals: Tensor, m: int) -> Tensor:
        """Every rank's m largest of `vals`, descending, padded with -inf: (W, m)."""
        mine = torch.full((m,), float("-inf"), dtype=vals.dtype, device=vals.device)
        top = vals.topk(min(m, len(vals)), sorted=True).values
        mine[:len(top)] = top
        every = [torch.empty_like(mine) for _ in range(self.world)]
        self.job._collective(lambda: dist.all_gather(every, mine, group=self.group))
        return torch.stack(every)

    def reduce_grads(self, model: Any) -> None:
        """Every parameter's gradient, summed over the ranks and divided by their number (each loss
        term is a mean over this rank's equal slice, so that is the global batch's gradient)."""
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._reduce(p.grad).div_(self.world)

    @torch.no_grad()
    def agree(self, model: Any, out: Any, y: Tensor, due: bool) -> tuple[Any, bool]:
        """After train.train_step on this rank's slice: the dead counters and threshold learnt from
        the global batch; returns the global batch's metrics as an output, and whether a checkpoint
        is due on any rank."""
        due = self._update_stats(model, out, y.shape[0] * self.world, due)
        return self._global_metrics(out, y), due

    def _update_stats(self, model: Any, out: Any, batch: int, due: bool) -> bool:
        """Transcoder._update_stats over the global batch, in one MAX reduction (the checkpoint flag with it)."""
        L = model.d_latent
        flags = torch.zeros(L + 2, dtype=torch.float32, device=out.vals.device)
        flags[out.cols] = 1.0                                       # fired on this rank
        flags[L] = float(due)
        mine = model.sparsity.batch_min(out.vals) if hasattr(model.sparsity, "batch_min") else out.vals[:0]
        flags[L + 1] = -mine[0] if len(mine) else float("-inf")   # max of -min = -(global min)
        self._reduce(flags, dist.ReduceOp.MAX)
        model.tokens_since_fired += batch
        model.tokens_since_fired[flags[:L] > 0] = 0
        if torch.isfinite(flags[L + 1]):
            model.sparsity.observe(-flags[L + 1:])
        return bool(flags[L] > 0)

    def _global_metrics(self, out: Any, y: Tensor) -> Any:
        """The metrics of the global batch, from one SUM reduction of this rank's sums."""
        G, (b, d) = len(out.mse), y.shape
        y64 = y.double()
        mine = torch.cat([torch.stack([out.loss.detach().double(), out.aux_loss.detach().double(),
                                       torch.tensor(float(len(out.cols)), dtype=torch.float64, device=y.device),
                                       y64.square().sum()]),
                          out.mse.detach().double() * (b * d), y64.sum(0)])
        s = self._reduce(mine)
        n = b * self.world
        total_var = (s[3] - s[4 + G:].square().sum() / n).clamp(min=1e-12)
        levels = (s[4:4 + G] / total_var).float()
        return dataclasses.replace(out, loss=(s[0] / self.world).float(), aux_loss=(s[1] / self.world).float(),
                                   fvu=levels[-1], fvu_levels=levels, l0=(s[2] / n).float())

    # -- what rank 0 gathers or hands out

    def merge_samples(self, collector: Any, fresh: dict[str, Tensor] | None) -> None:
        """Every rank's sample buffers merged into rank 0's; the others start again from `fresh` (an
        empty collector's state), so each sample is merged once."""
        if collector is None:
            return
        state = collector.state_dict() if not self.job.main else None
        box = [None] * self.world if self.job.main else None
        self.job._collective(lambda: dist.gather_object(state, box, dst=0))
        if self.job.main:
            for other in box[1:]:
                collector.merge_state(other)
        elif fresh is not None:
            collector.load_state_dict(fresh)

    def check_same_weights(self, model: Any, step: int) -> None:
        """The ranks' weights must agree (a bug that lets them drift would be silent otherwise)."""
        with torch.no_grad():
            mine = torch.stack([p.double().sum() for p in model.parameters()]).cpu().tolist()
        every = self.job.gather(mine)
        if any(w != every[0] for w in every):
            raise RuntimeError(f"the ranks' weights differ at step {step}: {every}")


def share_size(n_keep: int, world: int) -> int:
    """How many of its largest values a rank sends first: 1.5x its expected share of the global
    top n_keep, plus a margin (the fallback, all n_keep, then almost never runs)."""
    return min(n_keep, -(-3 * n_keep // (2 * world)) + 64)


def global_cut(every: Tensor, n_keep: int) -> Tensor | None:
    """The n_keep-th largest value over all ranks (-inf when there are fewer), from each rank's m
    largest, descending (W, m); None when those do not prove it: a rank whose m-th value is at or
    above the candidate cutoff may hold more values above it than it sent."""
    union = every.reshape(-1)
    cut = union.topk(n_keep, sorted=False).values.min() if union.numel() >= n_keep else union.new_tensor(float("-inf"))
    last = every[:, -1]
    if every.shape[1] < n_keep and bool((torch.isfinite(last) & (last >= cut)).any()):
        return None
    return cut


class GlobalBatchTopK(BatchTopK):
    """BatchTopK whose training choice is made over the global batch of the job (`Sync.batch_topk`);
    everything else (threshold, file tensors, spec) is BatchTopK's, so its files are BatchTopK's."""

    def __init__(self, k: int, per_row_batches: int, sync: Sync):
        super().__init__(k, per_row_batches)
        self.sync = sync

    def training_indices(self, pre: Tensor) -> Tensor:
        flat = pre.reshape(-1)
        batch_wide = self.sync.batch_topk(flat, self.k * pre.shape[0] * self.sync.world)
        if self._per_row():   # per row, as one process does; the cutoff it learns is the global one
            self._cut = flat[batch_wide].min() if len(batch_wide) else flat.new_tensor(float("inf"))
            return row_topk_indices(pre, self.k)
        return batch_wide

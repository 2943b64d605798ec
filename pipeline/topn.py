"""Per-slot top-n buffers on tensors: the kernel under every feature-sample collector.

A slot is a feature (top activations) or a feature x activation interval (random samples, keyed by
a random priority). Batches are merged with sort/scatter only, no Python loop over slots, on any
device. Used by the training collector (pipeline/collector.py) and the exact pass
(pipeline/collect.py).
"""
from __future__ import annotations

import torch

from pipeline.util import UserError

NEG = float("-inf")


def _rank_in_slot(inv: torch.Tensor, key: torch.Tensor, n_slots: int, n: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For entries with slot `inv` (E,) and `key` (E,): the indices, slots and ranks (by key,
    descending; ties keep input order) of the entries ranked below n in their slot."""
    order = torch.sort(key, descending=True, stable=True).indices          # (E,)
    order = order[torch.sort(inv[order], stable=True).indices]            # grouped by slot
    slot = inv[order]
    counts = torch.bincount(slot, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts                              # first position of each slot
    rank = torch.arange(len(slot), device=slot.device) - starts[slot]
    keep = rank < n
    return order[keep], slot[keep], rank[keep]


def _drop_repeated_rows(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, rows (T, L): where a row appears twice in a slot, keep only its largest key (ties: the
    earlier position); the others become empty (key -inf, row -1)."""
    o1 = torch.sort(keys, dim=1, descending=True, stable=True).indices    # key order
    r1 = rows.gather(1, o1)
    o2 = torch.sort(r1, dim=1, stable=True).indices                        # equal rows side by side
    r2 = r1.gather(1, o2)
    dup2 = torch.zeros_like(r2, dtype=torch.bool)
    dup2[:, 1:] = (r2[:, 1:] == r2[:, :-1]) & (r2[:, 1:] >= 0)
    dup1 = torch.empty_like(dup2).scatter_(1, o2, dup2)                    # back to key order
    dup = torch.empty_like(dup1).scatter_(1, o1, dup1)                     # back to input order
    return keys.masked_fill(dup, NEG), rows.masked_fill(dup, -1)


def _merge_order(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """kept, new (T, n), each sorted descending: indices into cat([kept, new], 1) of their first n
    in merged order (descending; equal keys: kept first). A merge path with two binary searches
    per entry, several times cheaper than sorting the (T, 2n) block."""
    t, n = kept.shape
    k_asc, n_asc = (-kept).contiguous(), (-new).contiguous()             # ascending
    pos = torch.arange(n, device=kept.device).expand(t, n)
    pos_kept = pos + torch.searchsorted(n_asc, k_asc, right=False)     # + new entries strictly larger
    pos_new = pos + torch.searchsorted(k_asc, n_asc, right=True)       # + kept entries larger or equal
    order = torch.empty((t, 2 * n), dtype=torch.int64, device=kept.device)
    order.scatter_(1, pos_kept, pos)
    order.scatter_(1, pos_new, pos + n)
    return order[:, :n]


class TopBuffer:
    """Per slot, the n entries with the largest keys: keys (S, n) (-inf = empty), rows (S, n) int64
    (-1 = empty), vals (S, n) float32 (the activation; equal to the key for top-activation buffers,
    a separate payload when the key is a random priority). Rows in a slot are sorted by key,
    descending; on equal keys the entry seen first wins."""

    def __init__(self, n_slots: int, n: int, device: str | torch.device = "cpu"):
        self.n = n
        self.keys = torch.full((n_slots, n), NEG, dtype=torch.float32, device=device)
        self.rows = torch.full((n_slots, n), -1, dtype=torch.int64, device=device)
        self.vals = torch.zeros((n_slots, n), dtype=torch.float32, device=device)

    def merge(self, slot: torch.Tensor, key: torch.Tensor, row: torch.Tensor, val: torch.Tensor,
              dedupe: bool = False) -> None:
        """Add entries (E,) each: slot index, key, store row, value. With `dedupe`, a row already
        kept in a slot is kept once, with its largest key (entries of one call must not repeat a row)."""
        if slot.numel() == 0:
            return
        touched, inv = torch.unique(slot, return_inverse=True)            # (T,), (E,)
        t, n = len(touched), self.n
        idx, s, rank = _rank_in_slot(inv, key, t, n)                      # the batch's own top-n per slot
        new_keys = torch.full((t, n), NEG, dtype=torch.float32, device=slot.device)
        new_rows = torch.full((t, n), -1, dtype=torch.int64, device=slot.device)
        new_vals = torch.zeros((t, n), dtype=torch.float32, device=slot.device)
        new_keys[s, rank] = key[idx].float()
        new_rows[s, rank] = row[idx]
        new_vals[s, rank] = val[idx].float()
        # kept entries first: on equal keys the earlier one stays
        old_keys = self.keys[touched]
        keys = torch.cat([old_keys, new_keys], 1)                         # (T, 2n)
        rows = torch.cat([self.rows[touched], new_rows], 1)
        vals = torch.cat([self.vals[touched], new_vals], 1)
        if dedupe:
            keys, rows = _drop_repeated_rows(keys, rows)
            vals = vals.masked_fill(rows < 0, 0.0)
            top = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n]
        else:
            top = _merge_order(old_keys, new_keys)
        self.keys[touched] = keys.gather(1, top)
        self.rows[touched] = rows.gather(1, top)
        self.vals[touched] = vals.gather(1, top)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}keys": self.keys.cpu(), f"{prefix}rows": self.rows.cpu(), f"{prefix}vals": self.vals.cpu()}

    def load_state_dict(self, d: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("keys", "rows", "vals"):
            saved = d[f"{prefix}{name}"]
            mine = getattr(self, name)
            if saved.shape != mine.shape:
                raise UserError(f"saved sample state has shape {tuple(saved.shape)} but this run needs "
                                f"{tuple(mine.shape)}: the sample settings changed since it was saved")
            mine.copy_(saved)

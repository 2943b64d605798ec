"""Shuffled chunk reads from a store: an endless, deterministic stream of normalised batches.

The row stream: epoch e visits all chunks in a random order seeded by (seed, e); consecutive groups
of `group_chunks` chunks in that order are read concurrently (whole chunks only, never fancy
indexing of Zarr) into a mixing buffer; the group's usable rows (flagged rows dropped) are shuffled
with a generator seeded by (seed, e, group) and appended to the stream. Batch i is rows
[i*B, (i+1)*B) of the stream, so batches straddle groups and epochs. Reading runs ahead in a
background thread (the next group is read while the current one is cut into batches).

The loader's state is ONE integer, `position` = rows handed out; a loader created at that position
yields exactly the batches an uninterrupted one would have yielded next.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from pipeline.store import Store
from pipeline.util import UserError

DEFAULT_GROUP_CHUNKS = 8


@dataclass
class Batch:
    x: Tensor      # (B, d_in) float32, normalised source, on the loader's device
    y: Tensor      # (B, d_out) float32, normalised target
    rows: Tensor   # (B,) int64 store row of each batch row (for samples), on the loader's device


@dataclass
class _Group:
    source: np.ndarray   # (n, d) float16, store order
    target: np.ndarray   # (n, d) float16
    rows: np.ndarray     # (n,) int64 store row ids
    perm: np.ndarray     # (n_usable,) shuffled indices into the arrays above (usable rows only)


class ChunkLoader:
    """Iterate to get `Batch`es forever; `position` is what a checkpoint needs; call `close()`."""

    def __init__(self, store: Store, batch_size: int, *, seed: int = 0, position: int = 0,
                 group_chunks: int = DEFAULT_GROUP_CHUNKS, include_bos: bool = False,
                 include_outliers: bool = False,
                 norm: dict | None = None, device: str | torch.device = "cpu", prefetch_batches: int = 4):
        self.store = store
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_chunks = max(1, int(group_chunks))
        self.device = torch.device(device)
        self.usable_mask = store.usable(include_bos, include_outliers)                      # (n_rows,) bool
        starts = np.arange(store.n_chunks) * store.chunk_rows
        self.chunk_usable = np.add.reduceat(self.usable_mask.astype(np.int64), starts) if store.n_chunks else np.zeros(0, np.int64)
        self.rows_per_epoch = int(self.chunk_usable.sum())
        if self.rows_per_epoch == 0:
            raise UserError(f"{store.path} has no usable rows (all are flagged BOS, clamped or outlier): cache more text")
        self._norm = self._norm_tensors(norm, store.d_model)
        self.position = int(position)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.group_chunks, thread_name_prefix="tc-read")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tc-group")   # next group
        self._thread = threading.Thread(target=self._produce, args=(self.position,), daemon=True,
                                        name="tc-loader")
        self._thread.start()

    # -- the deterministic plan

    def epoch_chunk_order(self, epoch: int) -> np.ndarray:
        """The chunk visiting order of an epoch: (n_chunks,) int."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.store.n_chunks)

    def epoch_groups(self, epoch: int) -> list[np.ndarray]:
        order = self.epoch_chunk_order(epoch)
        return [order[i:i + self.group_chunks] for i in range(0, len(order), self.group_chunks)]

    def locate(self, position: int) -> tuple[int, int, int]:
        """Row-stream position -> (epoch, group index in that epoch, usable-row offset in the group)."""
        epoch, offset = divmod(position, self.rows_per_epoch)
        for gi, chunks in enumerate(self.epoch_groups(epoch)):
            n = int(self.chunk_usable[chunks].sum())
            if offset < n:
                return epoch, gi, offset
            offset -= n
        raise AssertionError("position beyond the epoch")   # unreachable: offset < rows_per_epoch

    # -- reading

    def _read_group(self, epoch: int, gi: int, chunks: np.ndarray) -> _Group:
        """Read whole chunks concurrently into one buffer; shuffle the usable rows' indices."""
        parts = list(self._pool.map(self.store.read_chunk, [int(c) for c in chunks]))
        source = np.concatenate([p.source for p in parts])
        target = np.concatenate([p.target for p in parts])
        rows = np.concatenate([np.arange(p.start, p.start + len(p.tokens), dtype=np.int64) for p in parts])
        usable = np.flatnonzero(self.usable_mask[rows])
        perm = usable[np.random.default_rng([self.seed, epoch, gi, 1]).permutation(len(usable))]
        return _Group(source, target, rows, perm)

    def _groups_from(self, epoch: int, gi: int) -> Iterator[_Group]:
        """Groups in stream order from (epoch, gi) on, the next one read while this one is used."""
        pending = None
        while not self._stop.is_set():
            groups = self.epoch_groups(epoch)
            for g in range(gi, len(groups)):
                if pending is None:
                    pending = self._ahead.submit(self._read_group, epoch, g, groups[g])
                current = pending.result()
                nxt = (epoch, g + 1) if g + 1 < len(groups) else (epoch + 1, 0)
                nxt_chunks = self.epoch_groups(nxt[0])[nxt[1]]
                pending = self._ahead.submit(self._read_group, nxt[0], nxt[1], nxt_chunks)
                yield current
                if self._stop.is_set():
                    return
            epoch, gi = epoch + 1, 0

    def _produce(self, position: int) -> None:
        try:
            epoch, gi, offset = self.locate(position)
            pieces: list[tuple[_Group, np.ndarray]] = []
            need = self.batch_size
            for group in self._groups_from(epoch, gi):
                idx = group.perm[offset:]
                offset = 0
                while len(idx):
                    take = idx[:need]
                    idx = idx[need:]
                    pieces.append((group, take))
                    need -= len(take)
                    if need == 0:
                        self._put(self._make_batch(pieces))
                        pieces, need = [], self.batch_size
                    if self._stop.is_set():
                        return
        except BaseException as e:   # hand the error to the consumer
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _make_batch(self, pieces: list[tuple[_Group, np.ndarray]]):
        src = np.concatenate([g.source[i] for g, i in pieces])   # (B, d) fp16, in-memory gather
        tgt = np.concatenate([g.target[i] for g, i in pieces])
        rows = np.concatenate([g.rows[i] for g, i in pieces])
        src_t, tgt_t, rows_t = torch.from_numpy(src), torch.from_numpy(tgt), torch.from_numpy(rows)
        if self.device.type == "cuda":
            # fp16 in pinned memory; the consumer copies it non-blocking and converts on the GPU
            return src_t.pin_memory(), tgt_t.pin_memory(), rows_t.pin_memory()
        return self._normalize(src_t, tgt_t) + (rows_t,)

    # -- normalisation

    @staticmethod
    def _norm_tensors(norm: dict | None, d: int) -> dict:
        if norm is None:
            return {"source_mean": torch.zeros(d), "source_scale": 1.0,
                    "target_mean": torch.zeros(d), "target_scale": 1.0}
        return {k: (torch.as_tensor(v, dtype=torch.float32) if k.endswith("mean") else float(v))
                for k, v in norm.items()}

    def _normalize(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        n = self._norm
        if src.device != n["source_mean"].device:
            n["source_mean"] = n["source_mean"].to(src.device)
            n["target_mean"] = n["target_mean"].to(src.device)
        x = (src.float() - n["source_mean"]) / n["source_scale"]
        y = (tgt.float() - n["target_mean"]) / n["target_scale"]
        return x, y

    # -- iteration

    def __iter__(self) -> "ChunkLoader":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        src, tgt, rows = item
        if self.device.type == "cuda":
            src = src.to(self.device, non_blocking=True)
            tgt = tgt.to(self.device, non_blocking=True)
            rows = rows.to(self.device, non_blocking=True)
            src, tgt = self._normalize(src, tgt)
        self.position += self.batch_size
        return Batch(src, tgt, rows)

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=10)
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ChunkLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

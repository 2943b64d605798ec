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

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
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
    owner: np.ndarray | None = None   # (n,) the rank that read each row (its rows only are filled)


@dataclass
class _Share:
    """One rank's part of a global batch before the exchange (pipeline/ddp.py `Sync.exchange_rows`):
    the rows of its own chunks that each rank's slice needs, grouped by that rank, and where the
    rows it receives go in its slice."""
    send: np.ndarray         # (n_send, 2d) float16, source | target, in batch order
    send_splits: list[int]   # rows for rank 0, 1, ...
    recv_splits: list[int]   # rows from rank 0, 1, ...
    order: np.ndarray        # (b,) slice position of each received row
    rows: np.ndarray         # (b,) int64 store rows of the slice (from metadata)


def epoch_chunk_order(seed: int, n_chunks: int, epoch: int) -> np.ndarray:
    """The chunk visiting order of an epoch: (n_chunks,) int."""
    return np.random.default_rng([seed, epoch]).permutation(n_chunks)


def epoch_groups(seed: int, n_chunks: int, group_chunks: int, epoch: int) -> list[np.ndarray]:
    order = epoch_chunk_order(seed, n_chunks, epoch)
    return [order[i:i + group_chunks] for i in range(0, len(order), group_chunks)]


def locate(position: int, rows_per_epoch: int, chunk_usable: np.ndarray, groups_of) -> tuple[int, int, int]:
    """Row-stream position -> (epoch, group index in that epoch, usable-row offset in the group)."""
    epoch, offset = divmod(position, rows_per_epoch)
    for gi, chunks in enumerate(groups_of(epoch)):
        n = int(chunk_usable[chunks].sum())
        if offset < n:
            return epoch, gi, offset
        offset -= n
    raise AssertionError("position beyond the epoch")   # unreachable: offset < rows_per_epoch


def group_perm(usable_mask: np.ndarray, rows: np.ndarray, seed: int, epoch: int, gi: int) -> np.ndarray:
    """The shuffled order of a group's usable rows: indices into the group's arrays."""
    usable = np.flatnonzero(usable_mask[rows])
    return usable[np.random.default_rng([seed, epoch, gi, 1]).permutation(len(usable))]


def chunk_usable_counts(store: Store, usable_mask: np.ndarray) -> np.ndarray:
    starts = np.arange(store.n_chunks) * store.chunk_rows
    return np.add.reduceat(usable_mask.astype(np.int64), starts) if store.n_chunks else np.zeros(0, np.int64)


def batch_pieces(groups: Iterable[_Group], offset: int, batch_size: int) -> Iterator[list[tuple[_Group, np.ndarray]]]:
    """Batches of `batch_size` rows taken in each group's shuffled order, from row `offset` of the
    first group on: each batch as (group, row indices) pieces, a batch may straddle two groups."""
    pieces: list[tuple[_Group, np.ndarray]] = []
    need = batch_size
    for group in groups:
        idx = group.perm[offset:]
        offset = 0
        while len(idx):
            take, idx = idx[:need], idx[need:]
            pieces.append((group, take))
            need -= len(take)
            if need == 0:
                yield pieces
                pieces, need = [], batch_size


def slice_pieces(pieces: list[tuple[_Group, np.ndarray]], start: int, stop: int) -> list[tuple[_Group, np.ndarray]]:
    """Rows [start, stop) of the batch `pieces` make up, as pieces of their own."""
    out, at = [], 0
    for group, idx in pieces:
        a, b = max(start - at, 0), min(stop - at, len(idx))
        if a < b:
            out.append((group, idx[a:b]))
        at += len(idx)
    return out


class _Background:
    """What both loaders share: a producer thread filling a bounded queue from reads in thread
    pools (`_stop`, `_queue`, `_thread`, `_ahead`, `_pool`, set by the subclass), and its shutdown."""

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def owners(n_chunks: int, world: int) -> np.ndarray:
    """The rank that reads each chunk of a group, by its place in the group: the ranks' shares of a
    group differ by at most one chunk."""
    return np.arange(n_chunks) % world


def read_log(rank: int, epoch: int, gi: int, chunks: Iterable[int]) -> None:
    """TC_READ_LOG=PREFIX: each rank appends `epoch group chunk` per chunk it reads to PREFIX.RANK
    (a debug record: the tests check the ranks' reads are disjoint and cover every group)."""
    prefix = os.environ.get("TC_READ_LOG")
    if prefix:
        with open(f"{prefix}.{rank}", "a") as f:
            f.writelines(f"{epoch} {gi} {int(c)}\n" for c in chunks)


class ChunkLoader(_Background):
    """Iterate to get `Batch`es forever; `position` is what a checkpoint needs; call `close()`.

    `share=(rank, world)`: one rank of a job of `world` (docs/distributed.md): the stream and its
    batches of `batch_size` rows are the single-process ones, and this loader hands out rows
    [rank*b, (rank+1)*b) of each, b = batch_size / world; `position` still counts the whole
    batches' rows, so it means the same for any world size. Each rank reads only its own chunks of
    each group (`owners`); the rows of its slice in other ranks' chunks come through `exchange`
    (all_to_all_single's signature: out, in, out_splits, in_splits), called from `next()` so that
    it runs in the caller's thread, in step with the other ranks' training collectives."""

    def __init__(self, store: Store, batch_size: int, *, seed: int = 0, position: int = 0,
                 group_chunks: int = DEFAULT_GROUP_CHUNKS, include_bos: bool = False,
                 include_outliers: bool = False,
                 norm: dict | None = None, device: str | torch.device = "cpu", prefetch_batches: int = 4,
                 share: tuple[int, int] = (0, 1), exchange: Callable | None = None):
        self.store = store
        self.batch_size = int(batch_size)
        rank, world = share
        if self.batch_size % world:   # train.job_plan refuses such a --batch-size in one line first
            raise ValueError(f"batch_size {self.batch_size} does not divide among {world} ranks")
        self.rank_rows = (rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        self.rank, self.world = rank, world
        self.exchange = exchange or dist.all_to_all_single
        self.seed = int(seed)
        self.group_chunks = max(1, int(group_chunks))
        self.device = torch.device(device)
        self.usable_mask = store.usable(include_bos, include_outliers)                      # (n_rows,) bool
        self.chunk_usable = chunk_usable_counts(store, self.usable_mask)
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
        return epoch_chunk_order(self.seed, self.store.n_chunks, epoch)

    def epoch_groups(self, epoch: int) -> list[np.ndarray]:
        return epoch_groups(self.seed, self.store.n_chunks, self.group_chunks, epoch)

    def locate(self, position: int) -> tuple[int, int, int]:
        """Row-stream position -> (epoch, group index in that epoch, usable-row offset in the group)."""
        return locate(position, self.rows_per_epoch, self.chunk_usable, self.epoch_groups)

    # -- reading

    def _read_group(self, epoch: int, gi: int, chunks: np.ndarray) -> _Group:
        """Read this rank's whole chunks of the group concurrently into one buffer (the others' rows
        are left unfilled); shuffle the usable rows' indices (row ids come from the store's layout)."""
        ranges = [self.store.chunk_range(int(c)) for c in chunks]
        sizes = [b - a for a, b in ranges]
        owner = np.repeat(owners(len(chunks), self.world), sizes)
        mine = [j for j in range(len(chunks)) if j % self.world == self.rank]
        read_log(self.rank, epoch, gi, chunks[mine])
        parts = self._pool.map(self.store.read_chunk, [int(chunks[j]) for j in mine])
        if self.world == 1:
            parts = list(parts)
            source, target = np.concatenate([p.source for p in parts]), np.concatenate([p.target for p in parts])
        else:
            n, starts = sum(sizes), np.concatenate([[0], np.cumsum(sizes)])
            source = np.empty((n, self.store.d_model), np.float16)
            target = np.empty((n, self.store.d_model), np.float16)
            for j, p in zip(mine, parts):
                source[starts[j]:starts[j + 1]], target[starts[j]:starts[j + 1]] = p.source, p.target
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
        return _Group(source, target, rows, group_perm(self.usable_mask, rows, self.seed, epoch, gi), owner)

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
            for pieces in batch_pieces(self._groups_from(epoch, gi), offset, self.batch_size):
                self._put(self._make_batch(pieces))
                if self._stop.is_set():
                    return
        except BaseException as e:   # hand the error to the consumer
            self._put(e)

    def _make_batch(self, pieces: list[tuple[_Group, np.ndarray]]):
        if self.world > 1:
            return self._share(pieces)
        src = np.concatenate([g.source[i] for g, i in pieces])   # (B, d) fp16, in-memory gather
        tgt = np.concatenate([g.target[i] for g, i in pieces])
        rows = np.concatenate([g.rows[i] for g, i in pieces])
        src_t, tgt_t, rows_t = torch.from_numpy(src), torch.from_numpy(tgt), torch.from_numpy(rows)
        if self.device.type == "cuda":
            # fp16 in pinned memory; the consumer copies it non-blocking and converts on the GPU
            return src_t.pin_memory(), tgt_t.pin_memory(), rows_t.pin_memory()
        return self._normalize(src_t, tgt_t) + (rows_t,)

    def _share(self, pieces: list[tuple[_Group, np.ndarray]]) -> _Share:
        """What this rank sends and receives of the global batch `pieces`: row p of the batch is in
        rank p // b's slice and was read by the rank that owns its chunk."""
        b = self.batch_size // self.world
        owner = np.concatenate([g.owner[i] for g, i in pieces])                 # (B,)
        mine = [(g, i[g.owner[i] == self.rank]) for g, i in pieces]
        send = np.concatenate([np.concatenate([g.source[i], g.target[i]], axis=1) for g, i in mine])
        dest = np.flatnonzero(owner == self.rank) // b   # ascending: grouped by destination already
        lo, hi = self.rank_rows
        rows = np.concatenate([g.rows[i] for g, i in slice_pieces(pieces, lo, hi)])
        return _Share(send, np.bincount(dest, minlength=self.world).tolist(),
                      np.bincount(owner[lo:hi], minlength=self.world).tolist(),
                      np.argsort(owner[lo:hi], kind="stable"), rows)

    def _exchanged(self, share: _Share) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's slice from the exchange: fp16 source and target in slice order, and its rows."""
        got = torch.empty((len(share.order), share.send.shape[1]), dtype=torch.float16)
        self.exchange(got, torch.from_numpy(share.send), share.recv_splits, share.send_splits)
        both = torch.empty_like(got)
        both[torch.from_numpy(share.order)] = got
        d = both.shape[1] // 2
        src, tgt, rows = both[:, :d].contiguous(), both[:, d:].contiguous(), torch.from_numpy(share.rows)
        return (src, tgt, rows) if self.device.type == "cuda" else self._normalize(src, tgt) + (rows,)

    # -- normalisation

    @staticmethod
    def _norm_tensors(norm: dict | None, d: int) -> dict:
        if norm is None:
            return {"source_mean": torch.zeros(d), "source_scale": 1.0,
                    "target_mean": torch.zeros(d), "target_scale": 1.0}
        return {k: (torch.as_tensor(v, dtype=torch.float32) if k.endswith("mean") else float(v))
                for k, v in norm.items()}

    def _normalize(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        return self._normalize_with(self._norm, src, tgt)

    @staticmethod
    def _normalize_with(n: dict, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
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
        if isinstance(item, _Share):
            item = self._exchanged(item)
        src, tgt, rows = item
        if self.device.type == "cuda":
            src = src.to(self.device, non_blocking=True)
            tgt = tgt.to(self.device, non_blocking=True)
            rows = rows.to(self.device, non_blocking=True)
            src, tgt = self._normalize(src, tgt)
        self.position += self.batch_size
        return Batch(src, tgt, rows)


class SetLoader(_Background):
    """The batches of several transcoders (one per layer of a multi-layer store) from ONE pass over it.

    Member i gets exactly the batches `ChunkLoader(stores[i], ...)` would give it from its position:
    the chunk order and groups depend on the seed and the chunk count only, and each member's rows
    are shuffled with its own layer's usable rows, as a one-layer run of that layer does. Each group
    is read once for all members (every layer's chunks, concurrently) and kept while a member still
    uses it. Members step in lockstep: `next()` gives {member: Batch} for the members furthest
    behind (all of them once they agree; after a resume that found them at different steps, the
    ones behind first), never past a member's `limit` rows. Memory: a group of every layer's
    chunks, so about n_layers times a one-layer loader's buffers."""

    def __init__(self, stores: list[Store], batch_size: int, *, positions: list[int], limits: list[int],
                 seed: int = 0, group_chunks: int = DEFAULT_GROUP_CHUNKS, include_bos: bool = False,
                 include_outliers: bool = False, norms: list[dict | None] | None = None,
                 device: str | torch.device = "cpu", prefetch_batches: int = 4):
        self.stores = stores
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.group_chunks = max(1, int(group_chunks))
        self.device = torch.device(device)
        self.n_chunks = stores[0].n_chunks
        self.usable_mask = [s.usable(include_bos, include_outliers) for s in stores]
        self.chunk_usable = [chunk_usable_counts(s, m) for s, m in zip(stores, self.usable_mask)]
        self.rows_per_epoch = [int(c.sum()) for c in self.chunk_usable]
        for s, n in zip(stores, self.rows_per_epoch):
            if n == 0:
                raise UserError(f"{s.path} layer {s.layer} has no usable rows (all are flagged BOS, clamped or "
                                "outlier): cache more text")
        norms = norms or [None] * len(stores)
        self._norm = [ChunkLoader._norm_tensors(n, s.d_model) for n, s in zip(norms, stores)]
        self.positions = [int(p) for p in positions]
        self.limits = [int(v) for v in limits]
        self._cache: dict[tuple[int, int], Any] = {}    # (epoch, group) -> Future of its data
        self._current: dict[int, tuple[int, int]] = {}  # member -> the group it is cutting
        self._open = {i for i in range(len(stores)) if self.positions[i] < self.limits[i]}   # still to serve
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.group_chunks, thread_name_prefix="tc-read")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tc-group")
        self._thread = threading.Thread(target=self._produce, daemon=True, name="tc-set-loader")
        self._thread.start()

    def epoch_groups(self, epoch: int) -> list[np.ndarray]:
        return epoch_groups(self.seed, self.n_chunks, self.group_chunks, epoch)

    # -- reading: each group once, all layers

    def _read_group(self, epoch: int, gi: int, chunks: np.ndarray) -> list[_Group]:
        jobs = [(i, int(c)) for i in range(len(self.stores)) for c in chunks]
        parts = list(self._pool.map(lambda job: self.stores[job[0]].read_chunk(job[1]), jobs))
        per = len(chunks)
        rows = np.concatenate([np.arange(p.start, p.start + len(p.tokens), dtype=np.int64) for p in parts[:per]])
        groups = []
        for i in range(len(self.stores)):
            mine = parts[i * per:(i + 1) * per]
            groups.append(_Group(np.concatenate([p.source for p in mine]), np.concatenate([p.target for p in mine]),
                                 rows, group_perm(self.usable_mask[i], rows, self.seed, epoch, gi)))
        return groups

    def _group(self, key: tuple[int, int]) -> Any:
        """The future of a group's data, read once; the group after it is read ahead."""
        for k in (key, self._next_key(key)):
            if k not in self._cache:
                self._cache[k] = self._ahead.submit(self._read_group, k[0], k[1], self.epoch_groups(k[0])[k[1]])
        return self._cache[key]

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, gi = key
        return (epoch, gi + 1) if gi + 1 < len(self.epoch_groups(epoch)) else (epoch + 1, 0)

    def _enter(self, member: int, key: tuple[int, int]) -> None:
        """`member` cuts group `key` now: the groups every member has left are dropped."""
        self._current[member] = key
        if all(m in self._current for m in self._open):
            oldest = min(self._current[m] for m in self._open)
            for k in [k for k in self._cache if k < oldest]:
                del self._cache[k]

    def _member_batches(self, i: int) -> Iterator[tuple]:
        """Member i's batches from its position on: ChunkLoader._produce, over the shared groups."""
        epoch, gi, offset = locate(self.positions[i], self.rows_per_epoch[i], self.chunk_usable[i],
                                   self.epoch_groups)
        for pieces in batch_pieces(self._member_groups(i, (epoch, gi)), offset, self.batch_size):
            yield self._make_batch(i, pieces)

    def _member_groups(self, i: int, key: tuple[int, int]) -> Iterator[_Group]:
        """Member i's share of the groups from `key` on, each asked for when the member reaches it."""
        while True:
            self._enter(i, key)
            yield self._group(key).result()[i]
            key = self._next_key(key)

    def _produce(self) -> None:
        try:
            streams = [self._member_batches(i) for i in range(len(self.stores))]
            pos = list(self.positions)
            while not self._stop.is_set():
                open_ = [i for i in range(len(pos)) if pos[i] < self.limits[i]]
                for i in set(self._open) - set(open_):   # reached its limit: no longer holds a group
                    self._open.discard(i)
                    self._current.pop(i, None)
                if not open_:
                    return
                low = min(pos[i] for i in open_)
                due = [i for i in open_ if pos[i] == low]
                item = {i: next(streams[i]) for i in due}
                for i in due:
                    pos[i] += self.batch_size
                self._put(item)
        except BaseException as e:   # hand the error to the consumer
            self._put(e)

    def _make_batch(self, i: int, pieces: list[tuple[_Group, np.ndarray]]) -> tuple:
        src = torch.from_numpy(np.concatenate([g.source[k] for g, k in pieces]))
        tgt = torch.from_numpy(np.concatenate([g.target[k] for g, k in pieces]))
        rows = torch.from_numpy(np.concatenate([g.rows[k] for g, k in pieces]))
        if self.device.type == "cuda":
            return src.pin_memory(), tgt.pin_memory(), rows.pin_memory()
        return ChunkLoader._normalize_with(self._norm[i], src, tgt) + (rows,)

    # -- iteration

    def __iter__(self) -> "SetLoader":
        return self

    def __next__(self) -> dict[int, Batch]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        out = {}
        for i, (src, tgt, rows) in item.items():
            if self.device.type == "cuda":
                src = src.to(self.device, non_blocking=True)
                tgt = tgt.to(self.device, non_blocking=True)
                rows = rows.to(self.device, non_blocking=True)
                src, tgt = ChunkLoader._normalize_with(self._norm[i], src, tgt)
            self.positions[i] += self.batch_size
            out[i] = Batch(src, tgt, rows)
        return out

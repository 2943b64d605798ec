"""The shuffled chunk loader: coverage, determinism, epochs, resume position, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.loader import ChunkLoader
from pipeline.store import Store
from pipeline.transcoder import norm_constants


def take(loader: ChunkLoader, n_batches: int) -> list:
    try:
        return [next(loader) for _ in range(n_batches)]
    finally:
        loader.close()


def stream_rows(store, batch_size, n_batches, **kw) -> np.ndarray:
    return np.concatenate([b.rows.numpy() for b in take(ChunkLoader(store, batch_size, **kw), n_batches)])


@pytest.fixture(scope="module")
def store(synthetic_store) -> Store:
    return Store(synthetic_store)


def test_each_epoch_visits_every_usable_row_exactly_once(store):
    usable = np.flatnonzero(store.flags == 0)
    batch = 300   # does not divide the epoch: batches straddle groups and epochs
    n = -(-2 * len(usable) // batch) + 1
    rows = stream_rows(store, batch, n, seed=3, group_chunks=3)
    for epoch in range(2):
        seen = rows[epoch * len(usable):(epoch + 1) * len(usable)]
        assert len(seen) == len(usable)
        assert np.array_equal(np.sort(seen), usable)          # once each, never a flagged (BOS) row
    e0, e1 = rows[:len(usable)], rows[len(usable):2 * len(usable)]
    assert not np.array_equal(e0, e1)                          # reshuffled, not replayed


def test_chunk_order_is_fresh_each_epoch_and_groups_are_mixed(store):
    loader = ChunkLoader(store, 256, seed=0, group_chunks=2)
    try:
        orders = [loader.epoch_chunk_order(e) for e in range(4)]
        first_group = loader.epoch_groups(0)[0]
    finally:
        loader.close()
    assert all(sorted(o) == list(range(store.n_chunks)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    rows = stream_rows(store, 256, 3, seed=0, group_chunks=2)
    chunks = rows // store.chunk_rows
    usable_in_group = int(sum(((store.flags == 0)[store.chunk_range(c)[0]:store.chunk_range(c)[1]]).sum()
                              for c in first_group))
    # the first group's rows come only from its chunks, interleaved (shuffled), not chunk after chunk
    head = chunks[:usable_in_group]
    assert set(head.tolist()) == set(int(c) for c in first_group)
    assert (np.diff(head) != 0).sum() > 10


def test_same_seed_same_stream_other_seed_other_stream(store):
    a = stream_rows(store, 128, 20, seed=7)
    b = stream_rows(store, 128, 20, seed=7)
    c = stream_rows(store, 128, 20, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("start_batch", [0, 5, 31, 70])   # inside a group, across groups and epochs
def test_resume_from_a_position_gives_the_identical_stream(store, start_batch):
    batch = 250
    full = take(ChunkLoader(store, batch, seed=1, group_chunks=3), start_batch + 6)
    resumed_loader = ChunkLoader(store, batch, seed=1, group_chunks=3, position=start_batch * batch)
    resumed = take(resumed_loader, 6)
    assert resumed_loader.position == (start_batch + 6) * batch
    for a, b in zip(full[start_batch:], resumed):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_batches_are_normalised_store_rows(store):
    nc = norm_constants(store.stats())
    (b,) = take(ChunkLoader(store, 64, seed=0, norm=nc), 1)
    rows = b.rows.numpy()
    src = torch.from_numpy(store.source[:][rows].astype(np.float32))
    tgt = torch.from_numpy(store.target[:][rows].astype(np.float32))
    assert b.x.dtype == torch.float32 and b.rows.dtype == torch.int64
    torch.testing.assert_close(b.x, (src - nc["source_mean"]) / nc["source_scale"])
    torch.testing.assert_close(b.y, (tgt - nc["target_mean"]) / nc["target_scale"])


def test_include_bos_keeps_bos_rows(store):
    n_all = store.n_rows
    rows = stream_rows(store, 512, -(-n_all // 512), seed=0, include_bos=True)
    assert np.array_equal(np.sort(rows[:n_all]), np.arange(n_all))


def test_loader_reads_whole_chunks_only(store, monkeypatch):
    """Never fancy-index Zarr: every read is one whole chunk's contiguous rows."""
    reads = []
    original = Store._read

    def spy(self, name, a, b, c=None):
        if name in ("source", "target"):
            reads.append((a, b))
        return original(self, name, a, b, c)

    monkeypatch.setattr(Store, "_read", spy)
    take(ChunkLoader(store, 256, seed=0, group_chunks=2), 4)
    whole = {store.chunk_range(c) for c in range(store.n_chunks)}
    assert reads and set(reads) <= whole

"""The store format on its own: fp16 overflow rule, statistics, commits, the writer lock, vocab."""
import numpy as np
import pytest
import zarr

from conftest import BOS_ID, stop_store_creation_at
from pipeline.store import (CHUNKED_ARRAYS, FLAG_BOS, FLAG_OVERFLOW, FP16_MAX, Store, StoreWriter, chunk_rows_for,
                            is_store, to_fp16)
from pipeline.util import UserError


def small_writer(path, n_rows=96, d=4, chunk_rows=32):
    return StoreWriter.create(path, n_rows=n_rows, d_model=d, chunk_rows=chunk_rows, vocab=["a", "é", " b"],
                              attrs={"seq_len": 16, "hooks": {"source": "s", "target": "t"}, "config": {}})


def test_chunk_rows_hold_whole_sequences():
    for seq_len in (64, 100, 256, 1024, 5000):
        rows = chunk_rows_for(seq_len)
        assert rows % seq_len == 0 and rows >= seq_len
    assert chunk_rows_for(1024) == 4096


def test_fp16_overflow_is_clamped_flagged_and_counted(tmp_path):
    x = np.ones((32, 4), np.float32)
    x[3, 1] = 1e6
    x[5, 0] = -7e4
    y, over = to_fp16(x)
    assert np.isfinite(y).all() and y[3, 1] == FP16_MAX and y[5, 0] == -FP16_MAX
    assert over.nonzero()[0].tolist() == [3, 5]

    w = small_writer(tmp_path / "s.zarr", n_rows=32)
    tok = np.arange(32, dtype=np.int32)
    w.write_chunk(0, x, np.ones_like(x), tok, tok == 0)
    w.finalize(32)
    w.close()
    s = Store(tmp_path / "s.zarr")
    assert np.isfinite(s.source[:]).all()
    assert s.flags[3] == FLAG_OVERFLOW and s.flags[5] == FLAG_OVERFLOW and s.flags[0] == FLAG_BOS
    assert s.attrs["overflow"] == {"source": 2, "target": 0, "rows": 2}
    # statistics ignore the BOS row and the clamped rows
    assert s.stats()["source"]["count"] == 29
    np.testing.assert_allclose(s.stats()["source"]["mean"], 1.0)


def test_fp16_cast_matches_numpy_for_arrays_and_tensors():
    import torch

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 8)) * 3e4).astype(np.float32)   # some rows beyond the fp16 range
    x[0, :4] = [65504.0, 65519.0, 65520.0, -65505.0]               # at and around the limit
    expected = np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16)
    rows = (np.abs(x) > FP16_MAX).any(1)
    for value in (x, torch.from_numpy(x), torch.from_numpy(x).reshape(8, 8, 8)):
        y, over = to_fp16(value)
        assert y.dtype == np.float16 and y.shape == (64, 8)
        np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))
        np.testing.assert_array_equal(over, rows)
    small = x / 1e3   # within range: the fast path, nothing flagged
    y, over = to_fp16(torch.from_numpy(small).bfloat16())
    np.testing.assert_array_equal(y, torch.from_numpy(small).bfloat16().float().numpy().astype(np.float16))
    assert not over.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_stops_the_cast(bad):
    x = np.ones((4, 4), np.float32)
    x[2, 3] = bad
    with pytest.raises(UserError, match="NaN or inf"):
        to_fp16(x)


def test_chunk_files_are_the_bytes_zarr_writes(tmp_path):
    """tc writes chunks of local uncompressed arrays itself; the files must be zarr's own."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 4)).astype(np.float32)
    tok = rng.integers(1, 50, 80).astype(np.int32)
    tok[[0, 40]] = 0   # chunk 2 has no BOS: its flags are all 0, a chunk zarr does not store
    stores = {}
    for way in ("tc", "zarr"):
        path = tmp_path / f"{way}.zarr"
        w = small_writer(path, n_rows=80)   # the last chunk is partial: 16 of 32 rows
        if way == "zarr":
            w.folders = dict.fromkeys(w.folders)   # every array through zarr's own writes
        else:
            assert all(w.folders.values())
        for c in range(3):
            rows = slice(32 * c, min(32 * c + 32, 80))
            w.write_chunk(c, x[rows], -x[rows], tok[rows], tok[rows] == 0)
        w.finalize(80)
        w.close()
        stores[way] = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
                       if p.is_file() and p.relative_to(path).parts[0] in CHUNKED_ARRAYS}
    assert len(stores["tc"]) > 7 * 2 and any("flags/c/" in k for k in stores["tc"])
    assert stores["tc"] == stores["zarr"]
    s = Store(tmp_path / "tc.zarr")
    np.testing.assert_array_equal(s.source[:], x.astype(np.float16))
    np.testing.assert_array_equal(s.tokens, tok)


def test_nan_activations_stop_the_write(tmp_path):
    w = small_writer(tmp_path / "s.zarr", n_rows=32)
    x = np.ones((32, 4), np.float32)
    x[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        w.write_chunk(0, x, x, np.zeros(32, np.int32), np.zeros(32, bool))
    w.close()


def test_statistics_match_numpy_over_unflagged_rows(synthetic_store):
    s = Store(synthetic_store)
    keep = s.flags == 0
    assert (~keep).sum() == s.n_rows // s.seq_len          # exactly the BOS rows
    for side in ("source", "target"):
        x = s.group[side][:].astype(np.float64)[keep]
        st = s.stats()[side]
        np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(st["var"], x.var(0), rtol=1e-6, atol=1e-6)
        assert st["mean_norm"] == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-9)
        assert st["mean_sq_norm"] == pytest.approx((x ** 2).sum(1).mean(), rel=1e-9)


def test_only_committed_chunks_count_and_finalize_needs_all(tmp_path):
    w = small_writer(tmp_path / "s.zarr")
    x = np.ones((32, 4), np.float32)
    tok = np.zeros(32, np.int32)
    w.write_chunk(1, x, x, tok, tok == 1)
    assert w.pending_chunks() == [0, 2]
    with pytest.raises(RuntimeError, match="not committed"):
        w.finalize(96)
    w.close()
    with pytest.raises(UserError, match="unfinished"):
        Store(tmp_path / "s.zarr").require_complete()


def watch_group_json(path, monkeypatch) -> list[dict]:
    """Every state of the group's zarr.json a kill could leave behind: its attributes after each write."""
    import json

    from zarr.storage import LocalStore

    states, real_set = [], LocalStore.set

    async def set_and_record(self, key, value):
        await real_set(self, key, value)
        if key == "zarr.json":
            states.append(json.loads((path / "zarr.json").read_text()).get("attributes", {}))
    monkeypatch.setattr(LocalStore, "set", set_and_record)
    return states


def test_a_kill_between_metadata_writes_never_leaves_a_half_marked_store(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    states = watch_group_json(path, monkeypatch)
    w = small_writer(path)
    assert states and all(st.get("schema") == "tc-store" and "chunk_rows" in st for st in states)
    x = np.ones((32, 4), np.float32)
    tok = np.arange(32, dtype=np.int32)
    for c in range(3):
        w.write_chunk(c, x, x, tok, tok == 0)
    states.clear()
    w.finalize(96)
    w.close()
    summary_keys = {"n_rows", "complete", "stats", "overflow", "n_bos_rows"}
    assert states[-1]["complete"]
    for st in states:   # wherever a kill lands, "complete" comes with everything it vouches for
        assert not st.get("complete") or summary_keys <= set(st), sorted(st)


def test_a_store_stopped_while_being_created_is_recognised(tmp_path, monkeypatch):
    from pipeline.store import creation_interrupted

    path = tmp_path / "s.zarr"
    stop_store_creation_at(monkeypatch, "chunk_meta")   # the last array
    with pytest.raises(KeyboardInterrupt):
        small_writer(path)
    monkeypatch.undo()
    assert creation_interrupted(path) and not is_store(path)
    other = tmp_path / "other"
    other.mkdir()
    zarr.open_group(str(other), mode="w", attributes={"schema": "someone-else"})
    assert not creation_interrupted(other) and not creation_interrupted(tmp_path / "absent")


def test_text_running_out_shrinks_the_store(tmp_path):
    w = small_writer(tmp_path / "s.zarr", n_rows=96)
    x = np.ones((32, 4), np.float32)
    tok = np.arange(32, dtype=np.int32)
    w.write_chunk(0, x, x, tok, tok == 0)
    w.write_chunk(1, x[:16], x[:16], tok[:16], tok[:16] == 0)
    w.finalize(48)
    w.close()
    s = Store(tmp_path / "s.zarr")
    assert s.complete and s.n_rows == 48 and s.source.shape == (48, 4) and s.n_chunks == 2
    assert s.tokens.tolist() == list(range(32)) + list(range(16))


def test_finalize_stopped_between_resizes_finishes_them_when_run_again(tmp_path, monkeypatch):
    x = np.ones((32, 4), np.float32)
    tok = np.arange(32, dtype=np.int32)

    def write_short_store(path):
        w = small_writer(path, n_rows=96)
        w.write_chunk(0, x, x, tok, tok == 0)
        w.write_chunk(1, x[:16], x[:16], tok[:16], tok[:16] == 0)
        return w
    write_short_store(tmp_path / "ref.zarr").finalize(48)

    w = write_short_store(tmp_path / "s.zarr")
    real, calls = zarr.Array.resize, []

    def resize_twice_then_stop(self, shape):
        calls.append(shape)
        if len(calls) > 2:
            raise KeyboardInterrupt   # stands in for a kill after two arrays were shrunk
        return real(self, shape)
    monkeypatch.setattr(zarr.Array, "resize", resize_twice_then_stop)
    with pytest.raises(KeyboardInterrupt):
        w.finalize(48)
    monkeypatch.undo()
    w.close()
    w = StoreWriter.reopen(tmp_path / "s.zarr")
    w.finalize(48)
    w.close()
    ref, s = zarr.open_group(str(tmp_path / "ref.zarr")), zarr.open_group(str(tmp_path / "s.zarr"))
    for name in CHUNKED_ARRAYS:
        assert s[name].shape == ref[name].shape, name
        assert np.array_equal(s[name][:], ref[name][:]), name


def test_second_writer_is_refused_and_dead_writer_lock_taken_over(tmp_path):
    path = tmp_path / "s.zarr"
    w = small_writer(path)
    with pytest.raises(UserError, match="another tc process"):
        StoreWriter.reopen(path)
    w.close()
    (path / ".tc-writer.lock").write_text(f"{__import__('socket').gethostname()} 999999999")   # a dead pid
    StoreWriter.reopen(path).close()


def test_vocab_round_trips_unicode(tmp_path):
    w = small_writer(tmp_path / "s.zarr")
    w.close()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    off, blob = g["vocab/offsets"][:], g["vocab/bytes"][:].tobytes()
    assert [blob[off[i]:off[i + 1]].decode() for i in range(3)] == ["a", "é", " b"]


def test_not_a_store_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a tc activation store"):
        Store(tmp_path)


def test_rows_map_to_sequences(synthetic_store):
    s = Store(synthetic_store)
    starts = np.arange(0, s.n_rows, s.seq_len)
    assert (s.tokens[starts] == BOS_ID).all()
    assert s.sequence_start(starts[3] + 5) == starts[3]
    r = s.read_chunk(2)
    assert r.start == 2 * s.chunk_rows and len(r.tokens) == s.chunk_rows
    np.testing.assert_array_equal(r.tokens, s.tokens[r.start:r.start + s.chunk_rows])

"""Outlier rows: flagged when cached, left out of statistics, training and samples by default, kept
with the options, counted and shown, and found at read time in stores made before the rule."""
import json

import numpy as np
import pytest
import torch
import zarr

from conftest import write_synthetic_store
from pipeline import info
from pipeline.collector import SampleSettings, make_collector
from pipeline.loader import ChunkLoader
from pipeline.store import FLAG_BOS, FLAG_OUTLIER, FLAG_OVERFLOW, Store, outlier_mask

PLANTED = (5, 70, 1500, 3000, 7001)   # not BOS rows (those are every 64th)


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("o") / "o.zarr", outlier_rows=PLANTED)


def test_the_rule_flags_rows_far_above_their_chunks_median_and_never_bos_or_clamped():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float16)
    x[[7, 50]] *= 6            # far above the median norm
    x[90] *= 2                 # high, but within the rule's factor
    flags = np.zeros(200, np.uint8)
    flags[0], flags[1] = FLAG_BOS, FLAG_OVERFLOW
    x[[0, 1]] *= 50            # BOS and clamped rows are never outliers, and do not move the median
    assert np.flatnonzero(outlier_mask(x, flags)).tolist() == [7, 50]
    assert not outlier_mask(x, flags, factor=0).any()
    assert np.flatnonzero(outlier_mask(x, flags, factor=1.8)).tolist() == [7, 50, 90]


def test_planted_rows_are_flagged_counted_and_left_out_of_statistics(planted_store, tmp_path):
    s = Store(planted_store)
    assert np.flatnonzero(s.flags & FLAG_OUTLIER).tolist() == list(PLANTED)
    assert s.attrs["n_outlier_rows"] == len(PLANTED) and s.n_outlier_rows == len(PLANTED)
    assert s.attrs["outlier_rule"] == {"rule": "source_norm_over_chunk_median", "factor": 2.5}
    bos = (s.flags & FLAG_BOS) != 0
    keep = ~bos
    keep[list(PLANTED)] = False
    src = s.source[:].astype(np.float64)
    st = s.stats()["source"]
    assert st["count"] == keep.sum()
    np.testing.assert_allclose(st["mean"], src[keep].mean(0), rtol=1e-9)
    np.testing.assert_allclose(st["var"], src[keep].var(0), rtol=1e-6)
    # the same store with the rule off keeps them in its statistics
    off = Store(write_synthetic_store(tmp_path / "off.zarr", outlier_rows=PLANTED, outlier_factor=0))
    assert off.n_outlier_rows == 0 and off.stats()["source"]["count"] == keep.sum() + len(PLANTED)


def rows_loaded(store, **options):
    loader = ChunkLoader(store, 512, seed=0, **options)
    try:
        seen = np.concatenate([next(loader).rows.cpu().numpy() for _ in range(loader.rows_per_epoch // 512)])
    finally:
        loader.close()
    return set(seen.tolist())


def test_training_rows_leave_outliers_out_unless_asked(planted_store):
    s = Store(planted_store)
    assert not rows_loaded(s) & set(PLANTED)
    assert ChunkLoader(s, 512).rows_per_epoch == s.n_usable() == 8192 - 128 - len(PLANTED)
    with_them = ChunkLoader(s, 512, include_outliers=True)
    with_them.close()
    assert with_them.rows_per_epoch == s.n_usable(include_outliers=True) == 8192 - 128
    assert set(PLANTED) <= rows_loaded(s, include_outliers=True)


def test_samples_leave_outliers_out_unless_asked(planted_store):
    s = Store(planted_store)
    rows = torch.tensor([4, 5, 6, 70])
    acts = torch.ones(4, 2).index_fill_(0, torch.tensor([1, 3]), 9.0)   # the outliers fire strongest
    settings = SampleSettings(sample_every=1, max_samples_per_feature=2, sample_threshold=0.1, sample_context=4,
                              top_features=2, samples_per_feature=2, include_bos=False)
    col = make_collector(settings, 2, "cpu", s)
    col.observe(0, acts, rows)
    assert not set(col.top.rows.flatten().tolist()) & set(PLANTED)
    settings.include_outliers = True
    col = make_collector(settings, 2, "cpu", s)
    col.observe(0, acts, rows)
    assert set(col.top.rows[0].tolist()) == {5, 70}


def make_legacy(path):
    """What tc 0.1 wrote: no outlier bit, no rule in the attributes, statistics over every unflagged row."""
    g = zarr.open_group(str(path), mode="r+")
    attrs = g.attrs.asdict()
    for key in ("outlier_rule", "n_outlier_rows"):
        attrs.pop(key, None)
    attrs["flags"].pop("outlier", None)
    g.attrs.clear()
    g.update_attributes(attrs)


def test_stores_made_before_the_rule_get_the_same_flags_and_statistics_at_read_time(planted_store, tmp_path):
    legacy_path = write_synthetic_store(tmp_path / "old.zarr", outlier_rows=PLANTED, outlier_factor=0)
    make_legacy(legacy_path)
    legacy, new = Store(legacy_path), Store(planted_store)
    assert legacy.outliers_at_read and not new.outliers_at_read
    assert "outlier" not in json.dumps(zarr.open_group(str(legacy_path)).attrs.asdict()["flags"])
    np.testing.assert_array_equal(legacy.flags, new.flags)
    a, b = legacy.stats(), new.stats()
    for side in ("source", "target"):
        assert a[side]["count"] == b[side]["count"]
        for key in ("mean", "var"):
            np.testing.assert_allclose(a[side][key], b[side][key], rtol=1e-9, atol=1e-12)
        for key in ("mean_norm", "mean_sq_norm"):
            assert a[side][key] == pytest.approx(b[side][key], rel=1e-9)
    # reading never writes: the old store's files are as they were
    assert not (np.asarray(zarr.open_group(str(legacy_path))["flags"][:]) & FLAG_OUTLIER).any()


def test_info_shows_the_outlier_count_and_rule(planted_store, tmp_path):
    line = info.outlier_line(Store(planted_store))
    assert f"{len(PLANTED)} rows" in line and "2.5x" in line and "flagged when cached" in line
    legacy_path = write_synthetic_store(tmp_path / "old.zarr", outlier_rows=PLANTED, outlier_factor=0)
    make_legacy(legacy_path)
    assert "found at read time" in info.outlier_line(Store(legacy_path))


def test_info_warns_when_the_rule_flags_an_unexpected_share(tmp_path):
    many = tuple(r for r in range(1, 8192, 40) if r % 64)   # about 2.5% of rows
    line = info.outlier_line(Store(write_synthetic_store(tmp_path / "many.zarr", outlier_rows=many)))
    assert f"{len(many)} rows" in line and "warning: more than 1% of rows" in line

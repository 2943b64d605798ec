"""Feature samples: the during-training collector, contexts, and the exact pass (`tc samples collect`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import collect as S
from pipeline.collect import CollectConfig, run_collect
from pipeline.collector import SampleCollector, SampleSettings, make_collector
from pipeline.contexts import context_starts
from pipeline.run import COLLECT_META, COLLECT_STATE, SAMPLES_FILE
from pipeline.samples import load_samples
from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, Store
from pipeline.transcoder import Transcoder, norm_constants
from pipeline.util import UserError


# ----------------------------------------------------------------------------- helpers

def make_run(root: Path, store_path: Path, threshold: float = 0.8, groups=(64, 64), seed: int = 0) -> Path:
    """A run folder holding a randomly initialised transcoder with a set inference threshold."""
    store = Store(store_path)
    tc = Transcoder(store.d_model, store.d_model, list(groups), 4, seed=seed)
    nc = norm_constants(store.stats())
    tc.set_normalization(nc["source_mean"], nc["source_scale"], nc["target_mean"], nc["target_scale"])
    tc.sparsity.threshold.fill_(threshold)
    run = root / "run"
    run.mkdir(parents=True)
    tc.save(run / "transcoder.safetensors")
    (run / "config.json").write_text(json.dumps({"cache": str(store_path)}))
    return run


def encode_store(run: Path, store: Store) -> np.ndarray:
    """Brute force: the threshold activations of every row, chunk by chunk (N, F)."""
    tc = Transcoder.load(run / "transcoder.safetensors")
    out = [tc.encode(torch.from_numpy(store.read_chunk(c).source).float()).numpy() for c in range(store.n_chunks)]
    return np.concatenate(out)


def brute_top(history: list[tuple[int, float, int]], f: int, n: int, threshold: float) -> list[tuple[float, int]]:
    """history: (feature, value, row) in the order seen. Per row its largest value (ties: first
    seen), values above threshold, sorted by value descending then first seen; the first n."""
    best: dict[int, tuple[float, int]] = {}
    for order, (ff, v, r) in enumerate(history):
        if ff == f and v > threshold and (r not in best or v > best[r][0]):
            best[r] = (v, order)
    ranked = sorted(((v, o, r) for r, (v, o) in best.items()), key=lambda t: (-t[0], t[1]))
    return [(v, r) for v, _, r in ranked[:n]]


def kept(col: SampleCollector, f: int) -> list[tuple[float, int]]:
    return [(float(v), int(r)) for v, r in zip(col.top.vals[f], col.top.rows[f]) if r >= 0]


# ----------------------------------------------------------------------------- collector

@pytest.mark.parametrize("n_rows,known", [(60, False), (60, True), (1000, True)])
def test_collector_keeps_exactly_the_top_n_above_threshold(n_rows, known):
    """Small run: values on a coarse grid (many ties, many exactly at the threshold), rows repeated
    across batches (few rows) or mostly fresh (many: the merge skips the duplicate check); the kept
    set equals the brute-force reference for every feature."""
    gen = torch.Generator().manual_seed(1)
    F, N, B, R, thr = 9, 6, 24, n_rows, 0.25
    col = SampleCollector(F, N, thr, n_rows=R if known else None)
    history = []
    for step in range(15):
        rows = torch.randperm(R, generator=gen)[:B]                          # distinct within a batch
        acts = torch.randint(0, 9, (B, F), generator=gen).float() / 8 * 0.5  # 0, 1/16, ..., 0.5: ties
        acts[torch.rand(B, F, generator=gen) < 0.4] = 0
        col.observe(step * 100, acts, rows)
        history += [(f, float(acts[b, f]), int(rows[b])) for b in range(B) for f in range(F)]
    assert any(v == thr for _, v, _ in history)          # the edge case is exercised
    for f in range(F):
        assert kept(col, f) == brute_top(history, f, N, thr), f
    above = sum(1 for _, v, _ in history if v > thr)
    assert int(col.observed.sum()) == above
    assert col.last_step == 1400


def test_collector_reads_the_transcoder_output(synthetic_store):
    """observe() takes the TranscoderOutput of a training forward (BatchTopK active pairs)."""
    store = Store(synthetic_store)
    tc = Transcoder(store.d_model, store.d_model, [64, 64], 4, seed=0)
    nc = norm_constants(store.stats())
    tc.set_normalization(nc["source_mean"], nc["source_scale"], nc["target_mean"], nc["target_scale"])
    col = SampleCollector(tc.d_latent, 5, 0.1)
    history = []
    for i, start in enumerate((64, 1024, 3000)):
        rows = torch.arange(start, start + 256)
        out = tc(tc.normalize_source(torch.from_numpy(store.source[start:start + 256])),
                 tc.normalize_target(torch.from_numpy(store.target[start:start + 256])))
        col.observe(i, out, rows)
        dense = torch.zeros(256, tc.d_latent)
        dense[out.rows, out.cols] = out.vals
        history += [(f, float(dense[b, f]), int(rows[b])) for b in range(256) for f in range(tc.d_latent)
                    if dense[b, f] > 0]
    for f in range(tc.d_latent):
        assert kept(col, f) == brute_top(history, f, 5, 0.1), f
    assert sum(len(kept(col, f)) for f in range(tc.d_latent)) > 0


def test_collector_state_survives_resume(tmp_path):
    """Stop halfway, save the state as a checkpoint would (safetensors), load it into a new
    collector, continue: the same result as an uninterrupted run."""
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randperm(200, generator=gen)[:32], torch.relu(torch.randn(32, 16, generator=gen)))
               for _ in range(8)]
    full = SampleCollector(16, 4, 0.1)
    for i, (rows, acts) in enumerate(batches):
        full.observe(i, acts, rows)
    first = SampleCollector(16, 4, 0.1)
    for i, (rows, acts) in enumerate(batches[:5]):
        first.observe(i, acts, rows)
    save_file(first.state_dict(), str(tmp_path / "state.safetensors"))
    resumed = SampleCollector(16, 4, 0.1)
    resumed.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    for i, (rows, acts) in enumerate(batches[5:], start=5):
        resumed.observe(i, acts, rows)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(UserError):           # other settings: a clear refusal, not a shape crash
        SampleCollector(16, 5, 0.1).load_state_dict(a)


def test_make_collector_drops_bos_rows(synthetic_store):
    store = Store(synthetic_store)
    cfg = SampleSettings(sample_every=1, max_samples_per_feature=3, sample_threshold=0.1, sample_context=5,
                         top_features=4, samples_per_feature=3, include_bos=False)
    col = make_collector(cfg, 4, "cpu", store)
    rows = torch.arange(0, 8)                                 # row 0 is a BOS row
    col.observe(0, torch.ones(8, 4), rows)
    assert 0 not in col.top.rows.tolist()[0]
    assert col.rows_observed == 7
    cfg.include_bos = True
    col = make_collector(cfg, 4, "cpu", store)
    col.observe(0, torch.full((8, 4), 2.0).index_fill_(0, torch.tensor([0]), 5.0), rows)
    assert col.top.rows[0, 0] == 0


def test_training_samples_written(tmp_path, synthetic_store):
    """finish() writes the summary and the top features with contexts taken from the store."""
    store = Store(synthetic_store)
    gen = torch.Generator().manual_seed(0)
    col = SampleCollector(12, 8, 0.1)
    usable = np.flatnonzero(store.flags == 0)
    for i in range(6):
        rows = torch.from_numpy(np.random.default_rng(i).choice(usable, 64, replace=False))
        col.observe(i, torch.relu(torch.randn(64, 12, generator=gen)), rows)
    cfg = SampleSettings(sample_every=100, max_samples_per_feature=8, sample_threshold=0.1, sample_context=5,
                         top_features=4, samples_per_feature=3, include_bos=False)
    out = col.finish(tmp_path, store, cfg)
    summary = json.loads((out / "summary.json").read_text())
    feats = json.loads((out / "features.json").read_text())["features"]
    assert summary["samples_collected"] == int(col.observed.sum())
    assert summary["features_with_samples"] == 12 and len(feats) == 4
    assert summary["samples_written"] == 12
    assert 0 < summary["context_diversity"] <= 1
    lo, hi = summary["activation_range"]
    assert lo > 0.1 and hi == pytest.approx(float(col.top.vals.max()))
    vocab = store.vocab()
    for feat in feats:
        assert len(feat["samples"]) == 3
        assert feat["top_tokens"][0]["count"] >= feat["top_tokens"][-1]["count"]
        for s in feat["samples"]:
            assert s["token_ids"] == store.tokens[s["context_start"]:s["row"] + 1].tolist()
            assert s["token"] == vocab[store.tokens[s["row"]]]
            assert s["marked"].endswith("\u00ab" + s["token"] + "\u00bb")
            assert len(s["token_ids"]) <= 5
    assert set(load_file(str(out / SAMPLES_FILE))) == set(col.state_dict())


# ----------------------------------------------------------------------------- contexts

def test_context_rule():
    seq_len = 16
    flags = np.zeros(64, np.uint8)
    flags[::seq_len] = FLAG_BOS               # every sequence starts with BOS
    flags[16 + 9] = FLAG_BOS                  # a new document inside sequence 1
    rows = np.array([3, 16 + 5, 16 + 9, 16 + 12, 32 + 15, 48 + 1])
    got = context_starts(rows, flags, seq_len, n_ctx=5)
    assert got.tolist() == [
        0,          # clipped at the sequence start (its BOS is kept)
        16 + 1,     # 5 rows ending at the activating row, no boundary in between
        16 + 9,     # the row itself is a BOS: a one-token context
        16 + 9,     # stops at the in-sequence BOS
        32 + 11,    # plain window
        48,         # never crosses into the previous sequence
    ]
    assert context_starts(np.array([10]), flags, seq_len, n_ctx=1).tolist() == [10]
    assert context_starts(np.zeros(0, np.int64), flags, seq_len, 5).size == 0


# ----------------------------------------------------------------------------- exact pass

@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, synthetic_store):
    root = tmp_path_factory.mktemp("exact")
    run = make_run(root, synthetic_store)
    cfg = CollectConfig(run=str(run), top_n=7, intervals=4, interval_samples=3, hist_bins=10, device="cpu",
                        batch_size=300, save_every=2)
    run_collect(cfg)
    return run, cfg


def test_exact_collect_matches_brute_force(exact_run, synthetic_store):
    run, cfg = exact_run
    store = Store(synthetic_store)
    acts = encode_store(run, store)                                       # (N, F)
    usable = (store.flags & (FLAG_BOS | FLAG_OVERFLOW)) == 0
    acts[~usable] = 0
    s = load_samples(run)
    assert s.source == "exact" and s.rows_total == int(usable.sum())
    fires = (acts > 0).sum(0)
    assert np.array_equal(s.fires, fires)
    np.testing.assert_allclose(s.density(), fires / usable.sum())
    np.testing.assert_allclose(s.act_max, acts.max(0), rtol=1e-6)
    np.testing.assert_allclose(s.mean_activation(), acts.sum(0) / np.maximum(fires, 1), rtol=1e-5)
    assert np.array_equal(s.hist.sum(1), fires)                          # histogram counts sum to the fires
    for f in range(acts.shape[1]):
        order = np.lexsort((np.arange(len(acts)), -acts[:, f]))[:cfg.top_n]   # value desc, then row
        order = order[acts[order, f] > 0]
        got = s.top_rows[f][s.top_rows[f] >= 0]
        assert got.tolist() == order.tolist(), f
        np.testing.assert_allclose(s.top_vals[f, :len(got)], acts[order, f], rtol=1e-6)
        # interval samples: real firing rows, each inside its interval, no row twice
        assert (s.interval_rows[f] >= 0).any() == (fires[f] > 0)
        for q in range(cfg.intervals if fires[f] else 0):
            r = s.interval_rows[f, q][s.interval_rows[f, q] >= 0]
            v = s.interval_vals[f, q, :len(r)]
            np.testing.assert_allclose(v, acts[r, f], rtol=1e-6)
            lo, hi = s.act_max[f] * q / cfg.intervals, s.act_max[f] * (q + 1) / cfg.intervals
            assert np.all((v >= lo * (1 - 1e-6)) & (v <= hi * (1 + 1e-6)))
            in_q = np.sum((acts[:, f] > 0) & (np.minimum((acts[:, f] / s.act_max[f] * cfg.intervals).astype(int),
                                                           cfg.intervals - 1) == q))
            assert len(r) == min(in_q, cfg.interval_samples) and len(set(r.tolist())) == len(r)
    meta = json.loads((run / "samples" / "collect.json").read_text())
    assert meta["complete"] and meta["config"]["top_n"] == 7 and "torch" in meta["versions"]
    assert not (run / "samples" / COLLECT_STATE).exists()


def test_exact_collect_resumes_after_interruption(tmp_path, synthetic_store, exact_run, monkeypatch):
    """Interrupted after a state save in each pass, then re-run: the same files as one run."""
    ref_run, ref_cfg = exact_run
    reference = load_file(str(ref_run / "samples" / SAMPLES_FILE))
    real_save = S.save_tensors_atomic
    for stop_after in (2, 5):      # in pass 1, in pass 2 (8 chunks / save_every 2 = 4 saves a pass)
        run = tmp_path / f"r{stop_after}"
        shutil.copytree(ref_run, run, ignore=shutil.ignore_patterns("samples"))
        calls = {"n": 0}

        def flaky_save(path, tensors, meta):
            real_save(path, tensors, meta)
            calls["n"] += 1
            if calls["n"] == stop_after:
                raise KeyboardInterrupt

        monkeypatch.setattr(S, "save_tensors_atomic", flaky_save)
        cfg = CollectConfig(**{**ref_cfg.__dict__, "run": str(run)})
        with pytest.raises(KeyboardInterrupt):
            run_collect(cfg)
        monkeypatch.setattr(S, "save_tensors_atomic", real_save)
        assert (run / "samples" / COLLECT_STATE).exists() and not (run / "samples" / COLLECT_META).exists()
        progress = load_file(str(run / "samples" / COLLECT_STATE))["progress"].tolist()
        assert progress[:2] == ([1, 4] if stop_after == 2 else [2, 2])
        run_collect(cfg)
        resumed = load_file(str(run / "samples" / SAMPLES_FILE))
        for k in reference:
            assert torch.equal(reference[k], resumed[k]), (stop_after, k)


def test_exact_collect_refuses_other_settings(tmp_path, synthetic_store, exact_run):
    ref_run, ref_cfg = exact_run
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    before = (run / "samples" / SAMPLES_FILE).read_bytes()
    cfg = CollectConfig(**{**ref_cfg.__dict__, "run": str(run), "top_n": 3})
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        run_collect(cfg)
    assert (run / "samples" / SAMPLES_FILE).read_bytes() == before      # nothing damaged
    run_collect(CollectConfig(**{**cfg.__dict__, "overwrite": True}))
    assert load_samples(run).top_rows.shape[1] == 3


def test_collect_bad_input(tmp_path, synthetic_store):
    with pytest.raises(UserError, match="does not exist"):
        run_collect(CollectConfig(run=str(tmp_path / "nope")))
    (tmp_path / "notrun").mkdir()
    with pytest.raises(UserError, match="not a tc run"):
        run_collect(CollectConfig(run=str(tmp_path / "notrun")))
    run = make_run(tmp_path, synthetic_store)
    with pytest.raises(UserError, match="--top-n must be positive"):
        run_collect(CollectConfig(run=str(run), top_n=0))
    (run / "transcoder.safetensors").unlink()
    with pytest.raises(UserError, match="no final transcoder"):
        run_collect(CollectConfig(run=str(run)))

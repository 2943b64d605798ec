"""Stage two speed, in one process, same model config and step code throughout:

1. loader: training steps/s fed by the shuffled chunk loader from the Zarr store vs. fed from the
   same rows already in memory (normalised float32 tensors, random batches). Target >= 0.9x.
2. decode: the sparse step (active latents only: embedding-bag decode, O(nnz x d) encoder
   backward) vs. the dense reference (B x all latents x d, the way SAELens decodes), per step and
   per decode alone.

    python bench/bench_train.py                                  # synthetic store, d 640, 5120 latents, k 48
    python bench/bench_train.py --store data/g3.zarr --steps 50
    python bench/bench_train.py --d 64 --dict-size 512 --k 8 --batch-size 256 --rows 20k --steps 5   # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.loader import ChunkLoader
from pipeline.store import Store, StoreWriter, chunk_rows_for
from pipeline.train import TrainConfig, build_model, default_groups, make_optimizer, train_step
from pipeline.transcoder import norm_constants
from pipeline.util import parse_count, parse_int_list, versions


def synthetic_store(path: Path, n_rows: int, d: int, seq_len: int = 256, seed: int = 0) -> Path:
    """Rows that are sparse sums of random directions (like the tests' store, at benchmark size)."""
    rng = np.random.default_rng(seed)
    n_feat, k_true = 4 * d, 8
    enc, dec = rng.normal(size=(n_feat, d)).astype(np.float32), rng.normal(size=(n_feat, d)).astype(np.float32)
    chunk = chunk_rows_for(seq_len)
    w = StoreWriter.create(path, n_rows=n_rows, d_model=d, chunk_rows=chunk, vocab=[f"t{i}" for i in range(100)],
                           attrs={"model": "bench-synthetic", "layer": 0, "seq_len": seq_len,
                                  "hooks": {"source": "blocks.0.hook_resid_mid", "target": "blocks.0.hook_mlp_out"},
                                  "tokenizer": {"name": "synthetic", "bos_id": 2, "vocab_size": 100}})
    try:
        for c in w.pending_chunks():
            n = min(chunk, n_rows - c * chunk)
            idx = rng.integers(0, n_feat, (n, k_true))
            mags = rng.uniform(0.5, 3, (n, k_true, 1)).astype(np.float32)
            source, target = (enc[idx] * mags).sum(1), (dec[idx] * mags).sum(1)   # (n, d) each
            tokens = rng.integers(3, 100, n).astype(np.int32)
            bos = (np.arange(c * chunk, c * chunk + n) % seq_len) == 0
            tokens[bos] = 2
            w.write_chunk(c, source, target, tokens, bos)
        w.finalize(n_rows)
    finally:
        w.close()
    return path


def timed_steps(model, optimizer, batches, n: int, warmup: int) -> float:
    """Steps/s over n steps after `warmup` untimed ones; `batches` yields (x, y)."""
    for _ in range(warmup):
        x, y = next(batches)
        train_step(model, optimizer, x, y, 1e-4)
    t0 = time.perf_counter()
    for _ in range(n):
        x, y = next(batches)
        train_step(model, optimizer, x, y, 1e-4)
    return n / (time.perf_counter() - t0)


def from_store(cfg: TrainConfig, store: Store, n: int, warmup: int) -> float:
    model = build_model(cfg, store, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg.lr, torch.device("cpu"))
    loader = ChunkLoader(store, cfg.batch_size, seed=0, norm=norm_constants(store.stats()))
    try:
        return timed_steps(model, optimizer, ((b.x, b.y) for b in loader), n, warmup)
    finally:
        loader.close()


def from_memory(cfg: TrainConfig, store: Store, n: int, warmup: int) -> float:
    nc = norm_constants(store.stats())
    keep = store.usable()
    x = (torch.from_numpy(store.source[:][keep].astype(np.float32)) - nc["source_mean"]) / nc["source_scale"]
    y = (torch.from_numpy(store.target[:][keep].astype(np.float32)) - nc["target_mean"]) / nc["target_scale"]
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
            yield x[idx], y[idx]

    model = build_model(cfg, store, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg.lr, torch.device("cpu"))
    return timed_steps(model, optimizer, batches(), n, warmup)


def sparse_vs_dense(cfg: TrainConfig, store: Store, n: int) -> dict:
    """Whole training steps and decode-only times, sparse vs dense, on the same batches."""
    sparse = build_model(cfg, store, torch.device("cpu"))
    dense = copy.deepcopy(sparse)
    dense.dense = True
    loader = ChunkLoader(store, cfg.batch_size, seed=1, norm=norm_constants(store.stats()))
    try:
        batch = next(loader)
    finally:
        loader.close()
    out = {}
    for name, model in (("sparse", sparse), ("dense", dense)):
        opt = make_optimizer(model, cfg.lr, torch.device("cpu"))
        out[f"{name}_steps_per_s"] = timed_steps(model, opt, iter(lambda: (batch.x, batch.y), None), n, 1)
    # decode alone: the B x d_out prediction from the active set
    with torch.no_grad():
        res = sparse(batch.x, batch.y, update_stats=False)
        rows, cols, vals = res.rows, res.cols, res.vals
        acts = torch.zeros(cfg.batch_size, sparse.d_latent)
        acts[rows, cols] = vals
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=cfg.batch_size)
        offsets = counts.cumsum(0) - counts
        w = sparse.W_dec.detach()

        def sparse_decode():
            return F.embedding_bag(cols[order], w, offsets, mode="sum", per_sample_weights=vals[order])

        def dense_decode():
            return acts @ w

        torch.testing.assert_close(sparse_decode(), dense_decode(), rtol=1e-4, atol=1e-4)
        for name, fn in (("sparse", sparse_decode), ("dense", dense_decode)):
            fn()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[f"{name}_decode_ms"] = (time.perf_counter() - t0) / n * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="an existing store (default: build a synthetic one of --rows x --d)")
    ap.add_argument("--d", type=int, default=640, help="d_model of the synthetic store")
    ap.add_argument("--rows", default="64k", help="rows of the synthetic store")
    ap.add_argument("--dict-size", type=int, default=5120)
    ap.add_argument("--groups", default=None, help="default: 1/8, 1/4, 1/2, 1/8 of --dict-size")
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(a.store) if a.store else synthetic_store(Path(tmp) / "bench.zarr", parse_count(a.rows), a.d)
        store = Store(path).require_complete()
        groups = parse_int_list(a.groups) if a.groups else default_groups(a.dict_size)
        cfg = TrainConfig(cache=str(path), dict_size=a.dict_size, groups=groups, k=a.k, batch_size=a.batch_size)
        shape = f"d {store.d_model}, {a.dict_size} latents, groups {groups}, k {a.k}, batch {a.batch_size}"
        print(f"{shape}, {store.n_rows} rows, torch threads {torch.get_num_threads()}")
        mem = from_memory(cfg, store, a.steps, a.warmup)
        zarr_sps = from_store(cfg, store, a.steps, a.warmup)
        mem2 = from_memory(cfg, store, a.steps, a.warmup)   # again: the machine may drift
        mem = (mem + mem2) / 2
        print(f"in-memory rows    {mem:8.2f} steps/s")
        print(f"zarr store loader {zarr_sps:8.2f} steps/s   ratio {zarr_sps / mem:.2f}x (target >= 0.9x)")
        sd = sparse_vs_dense(cfg, store, max(3, a.steps // 3))
        print(f"sparse step       {sd['sparse_steps_per_s']:8.2f} steps/s")
        print(f"dense step        {sd['dense_steps_per_s']:8.2f} steps/s   sparse/dense "
              f"{sd['sparse_steps_per_s'] / sd['dense_steps_per_s']:.2f}x")
        print(f"decode only       sparse {sd['sparse_decode_ms']:.2f} ms, dense (SAELens way) "
              f"{sd['dense_decode_ms']:.2f} ms: {sd['dense_decode_ms'] / sd['sparse_decode_ms']:.1f}x")
        print(json.dumps({"shape": shape, "memory_steps_per_s": mem, "store_steps_per_s": zarr_sps,
                          "ratio": zarr_sps / mem, **sd, "versions": versions()}))


if __name__ == "__main__":
    main()

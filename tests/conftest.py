"""Shared fixtures. `synthetic_store` builds a small, complete store without any model, so that
stage-two tests run in seconds; its target is a fixed sparse function of its source, so a
transcoder can learn it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Under pytest-xdist (the README's test command runs two workers) each worker, and every process
# it starts, computes on one thread: two workers of two threads each would oversubscribe two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from pipeline.store import StoreWriter, chunk_rows_for  # noqa: E402

BOS_ID = 2


def stop_store_creation_at(monkeypatch, array: str) -> None:
    """Make StoreWriter.create stop (KeyboardInterrupt, standing in for a kill) just before it
    makes `array`; monkeypatch.undo() lifts it."""
    import zarr

    real = zarr.Group.create_array

    def create_array(self, name, **kw):
        if name == array:
            raise KeyboardInterrupt
        return real(self, name, **kw)
    monkeypatch.setattr(zarr.Group, "create_array", create_array)


def write_synthetic_store(path: str | Path, n_rows: int = 8192, d_model: int = 32, seq_len: int = 64,
                          n_features: int = 128, k_true: int = 4, vocab_size: int = 100, seed: int = 0,
                          chunk_rows: int | None = None, outlier_rows: tuple[int, ...] = (),
                          outlier_factor: float | None = None) -> Path:
    """A complete store whose rows are sparse sums of random feature directions (source) and a
    different decoder for the same features (target). Row 0 of every sequence is BOS with a huge norm;
    the `outlier_rows` (not BOS) get 8x their source norm."""
    rng = np.random.default_rng(seed)
    chunk_rows = chunk_rows or chunk_rows_for(seq_len, 1024)
    enc_dirs = rng.normal(size=(n_features, d_model)).astype(np.float32)
    dec_dirs = rng.normal(size=(n_features, d_model)).astype(np.float32)
    tokens = rng.integers(3, vocab_size, size=n_rows).astype(np.int32)
    tokens[::seq_len] = BOS_ID
    # each token id turns on the same few features, so samples have a meaning to find
    token_feats = rng.integers(0, n_features, size=(vocab_size, k_true))
    mags = rng.uniform(0.5, 3.0, size=(n_rows, k_true)).astype(np.float32)
    codes = np.zeros((n_rows, n_features), np.float32)
    np.put_along_axis(codes, token_feats[tokens], mags, axis=1)
    source = codes @ enc_dirs + 0.01 * rng.normal(size=(n_rows, d_model)).astype(np.float32) + 1.0
    target = codes @ dec_dirs - 0.5
    bos = tokens == BOS_ID
    source[bos] *= 100.0
    source[list(outlier_rows)] *= 8.0
    vocab = ["<pad>", "<eos>", "<bos>"] + [f" w{i}" for i in range(3, vocab_size)]
    writer = StoreWriter.create(path, n_rows=n_rows, d_model=d_model, chunk_rows=chunk_rows, vocab=vocab, attrs={
        "model": "synthetic", "layer": 0, "seq_len": seq_len, "dtype": "float16",
        "hooks": {"source": "blocks.0.hook_resid_mid", "target": "blocks.0.hook_mlp_out"},
        "tokenizer": {"name": "synthetic", "bos_id": BOS_ID, "vocab_size": vocab_size},
        "dataset": {"spec": "synthetic"}, "config": {"model": "synthetic", "layer": 0, "seq_len": seq_len}},
        **({} if outlier_factor is None else {"outlier_factor": outlier_factor}))
    try:
        for c in writer.pending_chunks():
            a, b = c * chunk_rows, min((c + 1) * chunk_rows, n_rows)
            writer.write_chunk(c, source[a:b], target[a:b], tokens[a:b], bos[a:b])
        writer.finalize(n_rows)
    finally:
        writer.close()
    return Path(path)


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread is faster and steadier than two on a 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A complete 8,192-row, d=32 synthetic store shared by the session's tests (read-only!)."""
    return write_synthetic_store(tmp_path_factory.mktemp("stores") / "synthetic.zarr")


def rewrite_as_tc_0_1_transcoder(path: str | Path, out: str | Path | None = None) -> Path:
    """The transcoder file at `path` as tc 0.1 wrote it: the same tensors, format_version 1, k as a
    metadata key of its own and no "sparsity" key. Written to `out` (default: in place)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    assert json.loads(meta.pop("sparsity"))["rule"] == "batchtopk"
    meta["format_version"] = "1"
    out = Path(out or path)
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out

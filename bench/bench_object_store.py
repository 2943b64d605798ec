"""A store on S3 against the same store on the local disk: writing it (what `tc cache` does after the
forward: every chunk through StoreWriter, then finalize) and one training read pass over it (the
real ChunkLoader, one epoch of batches). In one process, local and S3 alternating; the S3 endpoint
is moto's server in a process of its own on 127.0.0.1.

Loopback moto is not S3: it is a Python server on the same cores, with no network between, so the
ratio measures tc's request pattern and the client and server costs, not S3's latency or bandwidth.

    python bench/bench_object_store.py --rounds 3 --chunks 16 --d-model 640
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.loader import ChunkLoader  # noqa: E402
from pipeline.storage import Location  # noqa: E402
from pipeline.store import Store, StoreWriter  # noqa: E402

SEQ_LEN, CHUNK_ROWS = 1024, 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> subprocess.Popen:
    """moto's S3 server on loopback, with one bucket; the AWS variables point this process at it."""
    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    Location("s3://tc-bench").fs.mkdir("tc-bench")
    return server


def chunks(n_chunks: int, d_model: int) -> list[tuple]:
    """Activations for every chunk, made before any timing."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_chunks):
        src = rng.normal(size=(CHUNK_ROWS, d_model)).astype(np.float16)
        tgt = rng.normal(size=(CHUNK_ROWS, d_model)).astype(np.float16)
        tokens = rng.integers(3, 1000, CHUNK_ROWS).astype(np.int32)
        tokens[::SEQ_LEN] = 2
        out.append((src, tgt, tokens, tokens == 2))
    return out


def write(path: str, data: list[tuple], d_model: int) -> float:
    t0 = time.perf_counter()
    writer = StoreWriter.create(path, n_rows=len(data) * CHUNK_ROWS, d_model=d_model, chunk_rows=CHUNK_ROWS, attrs={
        "model": "bench", "layer": 0, "seq_len": SEQ_LEN, "dtype": "float16",
        "hooks": {"source": "blocks.0.hook_resid_mid", "target": "blocks.0.hook_mlp_out"},
        "tokenizer": {"name": "bench", "bos_id": 2, "vocab_size": 1000}, "dataset": {"spec": "bench"},
        "config": {"model": "bench"}}, vocab=[f"t{i}" for i in range(1000)])
    try:
        for c, part in enumerate(data):
            writer.write_chunk(c, *part)
        writer.finalize(len(data) * CHUNK_ROWS)
    finally:
        writer.close()
    return time.perf_counter() - t0


def read_pass(path: str, batch_size: int = 4096) -> float:
    """One epoch of training batches through the loader (open, checksums, reads, shuffle)."""
    t0 = time.perf_counter()
    store = Store(path).require_complete()
    loader = ChunkLoader(store, batch_size)
    try:
        for _ in range(loader.rows_per_epoch // batch_size):
            next(loader)
    finally:
        loader.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=640)
    a = ap.parse_args()
    server = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    data = chunks(a.chunks, a.d_model)
    mb = a.chunks * CHUNK_ROWS * (4 * a.d_model + 5) / 1e6
    times = {k: [] for k in ("write local", "write s3", "read local", "read s3")}
    try:
        for i in range(a.rounds):
            order = ("local", "s3") if i % 2 == 0 else ("s3", "local")
            for kind in order:
                path = str(tmp / f"r{i}.zarr") if kind == "local" else f"s3://tc-bench/r{i}.zarr"
                times[f"write {kind}"].append(write(path, data, a.d_model))
                times[f"read {kind}"].append(read_pass(path))
                Location(path).remove_all()
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        server.terminate()
        server.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.chunks} chunks of {CHUNK_ROWS} rows, d_model {a.d_model}: {mb:,.0f} MB; medians of {a.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:12s} {v:6.2f} s  ({mb / v:,.0f} MB/s)")
    print(f"s3 / local: write {med['write s3'] / med['write local']:.1f}x, read pass "
          f"{med['read s3'] / med['read local']:.1f}x")


if __name__ == "__main__":
    main()

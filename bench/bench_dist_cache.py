"""The cost of coordination: the same `tc cache` work by one process and by a 2-rank torchrun job
(gloo, CPU), each process at one thread, runs alternating. Prints each run's wall time and the ratio
of the medians (two ranks / one process). On a machine with 2 free cores the 2-rank job can be at
most twice as fast in the forward; every rank still tokenizes the whole stream and loads the model.

    python bench/bench_dist_cache.py --rounds 3 --tokens 60k
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_args(tokens: str, out: Path) -> list[str]:
    return ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", tokens,
            "--seq-len", "64", "--chunk-rows", "256", "--batch-size", "4", "--out", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_2() -> list[str]:
    """torchrun with two processes on this machine; the program follows."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port())]


def launch(name: str) -> list[str]:
    """`tc` as one process ("one process") or as a 2-rank job ("two ranks")."""
    return [sys.executable, "-m", "cli"] if name == "one process" else [*torchrun_2(), "-m", "cli"]


def timed(command: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", default="60k")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    times: dict[str, list[float]] = {"one process": [], "two ranks": []}
    try:
        for i in range(a.rounds):
            for name in times:   # alternating, so a change in the machine's load hits both
                out = tmp / f"{i}-{name.replace(' ', '-')}.zarr"
                times[name].append(timed([*launch(name), *cache_args(a.tokens, out)]))
                print(f"round {i}: {name}: {times[name][-1]:.1f} s", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, two = (statistics.median(v) for v in times.values())
    print(f"median: one process {one:.1f} s, two ranks {two:.1f} s: two ranks / one process = {two / one:.2f}")


if __name__ == "__main__":
    main()

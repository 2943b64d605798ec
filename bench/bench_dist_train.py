"""The cost of coordination in training: the same `tc train` work (same store, global batch, steps)
by one process and by a 2-rank torchrun job (gloo, CPU), each process at one thread, runs
alternating. Prints per run the whole command's wall time and the training loop's steady rate (the
tokens/s metrics.jsonl logs, its first window left out: it holds the start-up), then the ratios
of the medians. Each rank computes half of every batch, so with two free cores the loop could at
best be twice as fast; what it loses is the per-step exchange (gradients: the whole model, every
step) and the rows of a rank's slice that another rank read (each rank reads its own chunks only).

    python bench/bench_dist_train.py --rounds 2 --store data/demo/gemma-3-270m_l6.zarr --steps 60
    python bench/bench_dist_train.py --exchange      # the per-step exchange alone, 2 ranks

Each two-rank run also counts the chunks each rank read (the loader's TC_READ_LOG record) and
prints the bytes per rank against the store's whole-pass read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_dist_cache import launch, timed, torchrun_2   # the launch helpers of stage one's bench

ROOT = Path(__file__).resolve().parent.parent


def train_args(store: str, steps: int, out: Path) -> list[str]:
    # the demo's dictionary (5,120 latents, k 48, batch 1,024); one checkpoint, at the end
    return ["train", "--cache", store, "--dict-size", "5120", "--k", "48", "--batch-size", "1024",
            "--steps", str(steps), "--log-every", "10", "--checkpoint-every", str(steps),
            "--checkpoint-minutes", "0", "--lr", "3e-3", "--warmup-steps", "10", "--out", str(out)]


def loop_rate(run: Path) -> float:
    """Tokens/s of the training loop, the first logged window (start-up) left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def exchange_worker(reps: int = 20) -> None:
    """Under torchrun: one step's collectives at the demo's shapes (d 640, 5,120 latents, skip path,
    k 48 x 512 rows per rank), as pipeline/ddp.py makes them; rank 0 prints the time of each."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from pipeline.ddp import share_size

    d, L, k, b = 640, 5120, 48, 512
    m = share_size(k * 2 * b, 2)
    W = 2
    mine = torch.randn(b, 2 * d).half()     # the fp16 source | target rows this rank read for the batch
    got = torch.empty(b, 2 * d, dtype=torch.float16)
    halves = [b // W] * W                    # a random slice: about 1/W of its rows from each rank
    grads = [torch.randn(L, d), torch.randn(L), torch.randn(L, d), torch.randn(d), torch.randn(d, d)]
    parts = {"gradients (5 tensors, 7.0M floats)": lambda: [dist.all_reduce(g) for g in grads],
             "BatchTopK cutoff (all-gather of each rank's share_size values)": lambda: dist.all_gather(
                 [torch.empty(m) for _ in range(2)], torch.randn(m)),
             "dead counters + threshold + checkpoint flag (max)": lambda: dist.all_reduce(
                 torch.zeros(L + 2), op=dist.ReduceOp.MAX),
             "metrics (sum)": lambda: dist.all_reduce(torch.zeros(8 + d, dtype=torch.float64)),
             "the loader's row exchange (all_to_all_single, 512 fp16 rows of 2 x 640, half to the other rank)":
                 lambda: dist.all_to_all_single(got, mine, halves, halves)}
    for name, fn in parts.items():
        fn()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        ms = (time.perf_counter() - t0) / reps * 1e3
        if dist.get_rank() == 0:
            print(f"{name}: {ms:.2f} ms per step", flush=True)
    dist.destroy_process_group()


def chunks_read(prefix: Path, world: int) -> list[int]:
    """Chunks each rank read (one line per chunk in TC_READ_LOG's files)."""
    return [len(Path(f"{prefix}.{r}").read_text().splitlines()) for r in range(world)]


def main() -> None:
    if "RANK" in os.environ:
        return exchange_worker()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exchange", action="store_true", help="time one step's collectives alone")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--store", default="data/demo/gemma-3-270m_l6.zarr")
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    if a.exchange:
        subprocess.run([*torchrun_2(), __file__], check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                 "PYTHONPATH": str(ROOT)})
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-train-"))
    wall: dict[str, list[float]] = {"one process": [], "two ranks": []}
    rate: dict[str, list[float]] = {"one process": [], "two ranks": []}
    try:
        for i in range(a.rounds):
            for name in wall:   # alternating, so a change in the machine's load hits both
                out = tmp / f"{i}-{name.replace(' ', '-')}"
                os.environ["TC_READ_LOG"] = str(out) + ".reads"
                wall[name].append(timed([*launch(name), *train_args(a.store, a.steps, out)]))
                rate[name].append(loop_rate(out))
                if name == "two ranks":
                    print(f"  chunks read per rank: {chunks_read(Path(str(out) + '.reads'), 2)} "
                          f"(one process: {chunks_read(tmp / f'{i}-one-process.reads', 1)})", flush=True)
                print(f"round {i}: {name}: {wall[name][-1]:.1f} s, loop {rate[name][-1]:,.0f} tokens/s "
                      f"({rate[name][-1] / 1024:.2f} steps/s)", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w1, w2 = (statistics.median(v) for v in wall.values())
    r1, r2 = (statistics.median(v) for v in rate.values())
    print(f"median wall: one process {w1:.1f} s, two ranks {w2:.1f} s: two / one = {w2 / w1:.2f}")
    print(f"median loop: one process {r1 / 1024:.2f} steps/s, two ranks {r2 / 1024:.2f} steps/s: "
          f"speed-up {r2 / r1:.2f}x")


if __name__ == "__main__":
    main()

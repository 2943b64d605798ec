"""Overhead of the during-training sample collector, relative to the training step, in one process.

The collector runs every `--sample-every` steps (default 100), so its share of training time is
    overhead = time(collector.observe) / (sample_every x time(training step)).
Target (issue 4): <= 5% at the reference shapes (d_model 2304, 18,432 latents, k 48, batch 1024).
Both are measured here on the same device, with the real Transcoder's forward output fed to the
collector; the collector's buffers are first filled (the steady state of a long run). Two cases:
rows never sampled before (the first pass over the store: a merge-path merge) and rows sampled
before (a later epoch: the merge also drops repeated rows, which costs two more sorts).

    python bench/bench_samples.py                          # reference shapes (slow on a CPU)
    python bench/bench_samples.py --device cuda
    python bench/bench_samples.py --d-model 64 --dict-size 512 --k 8 --steps 3   # smoke run
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.collector import SampleCollector
from pipeline.train import default_groups, train_step
from pipeline.transcoder import Transcoder
from pipeline.util import pick_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=2304)
    p.add_argument("--dict-size", type=int, default=18432)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--samples", type=int, default=100, help="max samples per feature")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--sample-every", type=int, default=100)
    p.add_argument("--steps", type=int, default=5, help="timed repeats of each")
    p.add_argument("--device", default="auto")
    return p.parse_args()


def time_training(a: argparse.Namespace, device: torch.device) -> tuple[float, object]:
    """Median seconds of one training step at the given shapes, and the last forward output."""
    torch.manual_seed(0)
    d, L, B = a.d_model, a.dict_size, a.batch_size
    model = Transcoder(d, d, default_groups(L), a.k, seed=0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x, y = torch.randn(B, d, device=device), torch.randn(B, d, device=device)
    state = {}

    def step() -> None:                                 # the trainer's own step
        state["out"] = train_step(model, opt, x, y, 3e-4)

    step()                                              # warm-up (allocations, kernels)
    return timed(step, device, a.steps), state["out"]


def time_collector(a: argparse.Namespace, device: torch.device, out: object) -> tuple[float, float, float]:
    """Median seconds of observe() on fresh rows and on rows seen before, once the buffers are full."""
    L, B, n_rows = a.dict_size, a.batch_size, 5_000_000   # the reference store: 5M tokens
    col = SampleCollector(L, a.samples, a.threshold, device, n_rows=n_rows)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(1)).to(device)
    cursor = {"i": 0}

    def observe(repeat: bool = False) -> None:
        i = 0 if repeat else cursor["i"]                # repeat: rows seen before (a second epoch)
        col.observe(0, out, order[i * B:(i + 1) * B])
        cursor["i"] += 0 if repeat else 1

    for _ in range(max(3, 2 * a.samples * L // max(1, a.k * B))):   # fill the buffers: a long run's state
        observe()
        if int((col.top.rows[:, -1] >= 0).sum()) >= 0.9 * L:
            break
    fresh_s = timed(observe, device, a.steps)
    repeat_s = timed(lambda: observe(repeat=True), device, a.steps)
    return fresh_s, repeat_s, float((col.top.rows >= 0).float().mean())


def main() -> None:
    a = parse_args()
    device = torch.device(pick_device(a.device))
    step_s, out = time_training(a, device)
    fresh_s, repeat_s, filled = time_collector(a, device, out)
    print(f"device {device}, d {a.d_model}, latents {a.dict_size}, k {a.k}, batch {a.batch_size}, "
          f"{a.samples} samples/feature (buffers {filled:.0%} full)")
    print(f"training step                    {step_s * 1e3:9.2f} ms")
    print(f"collector.observe, first epoch   {fresh_s * 1e3:9.2f} ms   ({fresh_s / step_s:.3f}x one step)")
    print(f"collector.observe, rows repeated {repeat_s * 1e3:9.2f} ms   ({repeat_s / step_s:.3f}x one step)")
    every = a.sample_every * step_s
    print(f"overhead at --sample-every {a.sample_every}: {fresh_s / every:.2%} (first epoch), "
          f"{max(fresh_s, repeat_s) / every:.2%} (worst) of training time (target <= 5%)")


if __name__ == "__main__":
    main()

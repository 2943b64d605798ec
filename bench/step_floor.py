"""How close is a training step to its floor, the one dense matmul that picks the active set?

    python bench/step_floor.py                    # d 640, 5,120 latents, k 48, batch 1,024 (the demo's shape)
    python bench/step_floor.py --d 2304 --dict-size 18432 --repeats 5
    python bench/step_floor.py --threads 1 --clock cpu   # on a shared machine: this process's CPU time

In one process, alternating: the encoder matmul alone (batch x d times d x latents, no autograd),
and whole `train_step`s of the default transcoder (Matryoshka groups 1/8, 1/4, 1/2, 1/8, skip
path) on rows drawn from a fixed random sparse code, first with no dead latents (AuxK idle), then
with a given share marked dead (AuxK working on them). Prints medians and the ratios step / matmul.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.train import default_groups, make_optimizer, train_step
from pipeline.transcoder import Transcoder


def timed(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median ms of `repeats` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1000)
    return statistics.median(out)


def rows(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse sums of random directions (source) and another decoder of the same code (target)."""
    g = torch.Generator().manual_seed(seed)
    feats = 4 * d
    code = torch.rand(n, feats, generator=g) * (torch.rand(n, feats, generator=g) < 8 / feats)
    return code @ torch.randn(feats, d, generator=g), code @ torch.randn(feats, d, generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--dict-size", type=int, default=5120)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dead-share", type=float, default=0.2, help="latents marked dead for the AuxK case")
    p.add_argument("--aux-k", type=int, default=512, help="AuxK's dead latents per row (tc train --aux-k)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time: steadier when other jobs share the cores "
                        "(with one thread; several threads' spinning would count)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    model = Transcoder(a.d, a.d, default_groups(a.dict_size), a.k, seed=0, skip=True, aux_k=a.aux_k)
    opt = make_optimizer(model, 1e-4, torch.device("cpu"))
    x, y = rows(a.batch_size, a.d)
    x, y = (x - x.mean(0)) / x.std(), (y - y.mean(0)) / y.std()

    def matmul() -> None:
        with torch.no_grad():
            torch.addmm(model.b_enc, x, model.W_enc.t())

    def step() -> None:
        train_step(model, opt, x, y, 1e-4)

    def step_dead() -> None:
        model.tokens_since_fired[: int(a.dead_share * a.dict_size)] = 10 ** 12   # counted dead, AuxK on them
        train_step(model, opt, x, y, 1e-4)

    results = {name: [] for name in ("matmul", "step", "step_dead")}
    for _ in range(3):   # alternate, so drifting load hits every measurement alike
        for name, fn in (("matmul", matmul), ("step", step), ("step_dead", step_dead)):
            results[name].append(timed(fn, a.repeats, clock))
    ms = {k: statistics.median(v) for k, v in results.items()}
    print(f"d {a.d}, {a.dict_size} latents, k {a.k}, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"{a.clock} clock, aux_k {a.aux_k}")
    print(f"encoder matmul alone        {ms['matmul']:8.1f} ms")
    print(f"step, no dead latents       {ms['step']:8.1f} ms   {ms['step'] / ms['matmul']:.2f}x the matmul")
    print(f"step, {a.dead_share:.0%} latents dead     {ms['step_dead']:8.1f} ms   {ms['step_dead'] / ms['matmul']:.2f}x the matmul")


if __name__ == "__main__":
    main()

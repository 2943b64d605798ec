"""How close is a training step to its floor, the one dense matmul that picks the active set?

    python bench/step_floor.py                    # d 640, 5,120 latents, k 48, batch 1,024 (the demo's shape)
    python bench/step_floor.py --d 2304 --dict-size 18432 --repeats 5
    python bench/step_floor.py --threads 1 --clock cpu   # on a shared machine: this process's CPU time
    python bench/step_floor.py --threads 1 --clock cpu --base /tmp/old   # against another tc tree, alternating

In one process, alternating: the encoder matmul alone (batch x d times d x latents, no autograd),
and whole `train_step`s of the default transcoder (Matryoshka groups 1/8, 1/4, 1/2, 1/8, skip
path; `--no-skip` without it) on rows drawn from a fixed random sparse code, first with no dead
latents (AuxK idle), then with a given share marked dead (AuxK working on them). The rule starts
past BatchTopK's per-row first batches (a run's first 30 steps), so every step measured is a
batch-wide one. Prints medians and the ratios step / matmul. `--base SRC`: the same measurement
run in subprocesses alternating between SRC (a folder holding another `pipeline/`, e.g. a `git
archive` of an older commit) and this tree, `--rounds` times each; prints both sides' medians. `--pieces`: per-piece timers inside
steps instead (where a step goes); `--floors`: each piece a step cannot drop, timed alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline import sparsity, transcoder
from pipeline.train import default_groups, make_optimizer, train_step
from pipeline.transcoder import Transcoder

CASES = ("matmul", "step", "step_dead")
# what --pieces times inside a step: (module or class, function names); names a tree lacks are skipped
PIECES = [(transcoder.Transcoder, ["_pre", "_select", "_aux_loss", "bias", "project_decoder_grad",
                                   "normalize_decoder", "_update_stats"]),
          (sparsity, ["batch_topk_indices", "true_positions", "at_least"]),
          (transcoder, ["stable_order"])]
FUNCTIONS = ["SparseEncode", "SparseDecode", "PrefixMSE", "ColumnsEncode"]   # their forward and backward


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


def measure(a: argparse.Namespace) -> dict[str, float]:
    """Median ms of each case, alternating three times."""
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    model = Transcoder(a.d, a.d, default_groups(a.dict_size), a.k, seed=0, skip=not a.no_skip, aux_k=a.aux_k)
    model.sparsity.updates.fill_(model.sparsity.per_row_batches)   # past the per-row start
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

    results = {name: [] for name in CASES}
    for _ in range(3):   # alternate, so drifting load hits every measurement alike
        for name, fn in zip(CASES, (matmul, step, step_dead)):
            results[name].append(timed(fn, a.repeats, clock))
    return {k: statistics.median(v) for k, v in results.items()}


def timing_pieces(clock, acc: dict[str, float]) -> None:
    """Wrap each piece so its time (children included) adds up in acc[name]."""
    def wrapped(name, fn):
        def run(*args, **kw):
            t0 = clock()
            try:
                return fn(*args, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + clock() - t0
        return run
    for owner, names in PIECES:
        for name in names:
            if hasattr(owner, name):
                setattr(owner, name, wrapped(name, getattr(owner, name)))
    for cls in FUNCTIONS:
        cls = getattr(transcoder, cls, None)
        for name in ("forward", "backward") if cls is not None else ():
            setattr(cls, name, staticmethod(wrapped(f"{cls.__name__}.{name}", getattr(cls, name))))


def pieces(a: argparse.Namespace) -> None:
    """Where a step's time goes: each piece's median ms over `repeats` steps, after the optimiser step too."""
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    acc: dict[str, float] = {}
    timing_pieces(clock, acc)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = Transcoder(a.d, a.d, default_groups(a.dict_size), a.k, seed=0, skip=not a.no_skip, aux_k=a.aux_k)
    model.sparsity.updates.fill_(model.sparsity.per_row_batches)
    opt = make_optimizer(model, 1e-4, torch.device("cpu"))
    step_fn = opt.step
    opt.step = lambda *args, **kw: (acc.__setitem__("adam", acc.get("adam", 0.0) - clock()),
                                    step_fn(*args, **kw), acc.__setitem__("adam", acc["adam"] + clock()))[1]
    x, y = rows(a.batch_size, a.d)
    x, y = (x - x.mean(0)) / x.std(), (y - y.mean(0)) / y.std()
    for dead in (0.0, a.dead_share):
        per: dict[str, list[float]] = {}
        total = []
        for i in range(a.repeats + 1):
            model.tokens_since_fired[: int(dead * a.dict_size)] = 10 ** 12
            acc.clear()
            t0 = clock()
            train_step(model, opt, x, y, 1e-4)
            if i:   # the first one warms up
                total.append((clock() - t0) * 1000)
                for name, s in acc.items():
                    per.setdefault(name, []).append(s * 1000)
        print(f"step with {dead:.0%} dead: {statistics.median(total):.1f} ms; pieces (nested ones inside their callers):")
        for name, ms in sorted(per.items(), key=lambda kv: -statistics.median(kv[1])):
            print(f"  {name:34s} {statistics.median(ms):7.2f} ms")


def floors(a: argparse.Namespace) -> None:
    """Each piece a step cannot drop, alone, on a real step's tensors: what is left for the 1.5x target."""
    from pipeline.transcoder import per_sample_weight_grad, segment_offsets
    import torch.nn.functional as F
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    model = Transcoder(a.d, a.d, default_groups(a.dict_size), a.k, seed=0, skip=not a.no_skip, aux_k=a.aux_k)
    model.sparsity.updates.fill_(model.sparsity.per_row_batches)
    opt = make_optimizer(model, 1e-4, torch.device("cpu"))
    x, y = rows(a.batch_size, a.d)
    x, y = (x - x.mean(0)) / x.std(), (y - y.mean(0)) / y.std()
    train_step(model, opt, x, y, 1e-4)                      # gradients and Adam state in place
    B, L = a.batch_size, a.dict_size
    with torch.no_grad():
        pre = model._pre(x)
        rows_, cols = model._select(pre, use_threshold=False)
        vals = pre[rows_, cols]
        flat = pre.reshape(-1)
        cut = flat.index_select(0, batch_topk(flat, a.k * B)).min()
    bags = model.group_of(cols) * B + rows_
    offsets = segment_offsets(bags, len(model.groups) * B)
    order = torch.sort(cols.to(torch.int32), stable=True).indices
    col_offsets = segment_offsets(cols[order], L)
    w_dec, grad_out = model.W_dec.detach(), torch.randn(len(model.groups) * B, a.d)
    mask = torch.empty(flat.numel(), dtype=torch.bool)
    n_params = sum(p.numel() for p in model.parameters())
    pieces = {
        "encoder matmul (the floor)": lambda: torch.addmm(model.b_enc.detach(), x, model.W_enc.detach().t()),
        f"Adam, fused, {n_params / 1e6:.1f}M parameters": opt.step,
        "one pass over a copy of the parameters": lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "selection: compare pass over B x L": lambda: sparsity.at_least(flat, cut, mask)
        if hasattr(sparsity, "at_least") else torch.ge(flat, cut, out=mask),
        "selection: whole batch_topk_indices": lambda: batch_topk(flat, a.k * B),
        "decode forward (embedding bag)": lambda: F.embedding_bag(cols, w_dec, offsets, mode="sum", per_sample_weights=vals),
        "decode: activation gradients": lambda: per_sample_weight_grad(grad_out, w_dec, cols, bags, offsets),
        "decode: W_dec gradient (embedding bag)": lambda: F.embedding_bag(bags[order], grad_out, col_offsets, mode="sum",
                                                                          per_sample_weights=vals[order]),
        "encode: W_enc gradient (embedding bag)": lambda: F.embedding_bag(rows_[order], x, col_offsets, mode="sum",
                                                                          per_sample_weights=vals[order]),
        "decoder projection": model.project_decoder_grad,
        "decoder renormalisation": model.normalize_decoder,
    }
    if model.skip:
        w_skip = model.W_skip.detach()
        pieces["skip path: forward matmul"] = lambda: torch.addmm(model.b_dec.detach(), x, w_skip.t())
        pieces["skip path: W_skip gradient matmul"] = lambda: grad_out[:B].t() @ x
    print(f"pieces alone ({len(cols)} active pairs, {torch.get_num_threads()} threads, {a.clock} clock):")
    for name, fn in pieces.items():
        print(f"  {name:42s} {timed(fn, a.repeats, clock):7.2f} ms")


def batch_topk(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    return sparsity.batch_topk_indices(flat, n_keep)


def report(a: argparse.Namespace, ms: dict[str, float], label: str = "") -> None:
    print(f"{label}encoder matmul alone        {ms['matmul']:8.1f} ms")
    print(f"{label}step, no dead latents       {ms['step']:8.1f} ms   {ms['step'] / ms['matmul']:.2f}x the matmul")
    print(f"{label}step, {a.dead_share:.0%} latents dead     {ms['step_dead']:8.1f} ms   "
          f"{ms['step_dead'] / ms['matmul']:.2f}x the matmul")


def against_base(a: argparse.Namespace, argv: list[str]) -> None:
    """Alternating subprocesses: SRC's pipeline, then this tree's, `rounds` times."""
    here = str(Path(__file__).resolve().parents[1])
    trees = {"base": str(Path(a.base).resolve()), "this": here}
    runs = {name: [] for name in trees}
    for _ in range(a.rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": src}
            out = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, cwd=here,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.splitlines()[-1]))
            print(name, {k: round(v, 1) for k, v in runs[name][-1].items()}, flush=True)
    for name, got in runs.items():
        ms = {k: statistics.median(r[k] for r in got) for k in CASES}
        report(a, ms, f"{name:5s} ")
        ratios = [f"{statistics.median(r[k] / r['matmul'] for r in got):.2f}x" for k in CASES[1:]]
        print(f"{name:5s} median of the runs' own ratios: step {ratios[0]}, step with dead latents {ratios[1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=640)
    p.add_argument("--dict-size", type=int, default=5120)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dead-share", type=float, default=0.2, help="latents marked dead for the AuxK case")
    p.add_argument("--aux-k", type=int, default=512, help="AuxK's dead latents per row (tc train --aux-k)")
    p.add_argument("--no-skip", action="store_true", help="the transcoder without the skip path")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time: steadier when other jobs share the cores "
                        "(with one thread; several threads' spinning would count)")
    p.add_argument("--base", default=None, help="another tc tree to measure against, alternating")
    p.add_argument("--rounds", type=int, default=3, help="with --base: subprocess runs of each tree")
    p.add_argument("--pieces", action="store_true", help="time the pieces of a step instead (per-piece timers)")
    p.add_argument("--floors", action="store_true", help="time each piece a step cannot drop, alone")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # one line of medians (for --base)
    a = p.parse_args()
    if a.base:
        argv = sys.argv[1:]
        i = argv.index("--base")
        against_base(a, argv[:i] + argv[i + 2:])
        return
    if a.pieces or a.floors:
        (pieces if a.pieces else floors)(a)
        return
    ms = measure(a)
    if a.json:
        print(json.dumps(ms))
        return
    print(f"d {a.d}, {a.dict_size} latents, k {a.k}, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"{a.clock} clock, aux_k {a.aux_k}, skip {not a.no_skip}")
    report(a, ms)


if __name__ == "__main__":
    main()

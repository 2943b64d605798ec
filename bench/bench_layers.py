"""Several layers at once vs one at a time, in one process (docs/benchmarks.md, "A transcoder for
every layer").

cache: one `tc cache --layers L1,..,LN` (one forward per batch, stopped after the highest layer)
       vs N `tc cache --layer Li`, on the same text, the model loaded once for all of them. Each
       round runs the multi-layer cache and the N single ones back to back, the order alternating
       between rounds; the ratio is (sum of the N single caches' seconds) / (the multi cache's),
       wall and CPU (process time, all threads: less moved by other processes on a shared machine).
       The forward alone predicts it: sum_i (Li + 1) / (max Li + 1) blocks' worth.
train: one `tc train --layers` set vs N `tc train --layer Li` runs on the multi-layer store, same
       options, alternating; the ratio is set seconds / sum of the runs' seconds (target <= 1.1),
       and the (layer, chunk) reads of each (a set reads every chunk of every layer once per epoch,
       as the N runs together do, plus the token ids once instead of N times).

    python bench/bench_layers.py --model tiny --layers 0,1,2,3 --tokens 50k
    python bench/bench_layers.py --model gemma-3-270m --layers 5,11,17 --tokens 8k --seq-len 128 --rounds 2
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline import cache, forward, models, text
from pipeline.cache import CacheConfig
from pipeline.store import Store
from pipeline.train import TrainConfig, run_train
from pipeline.util import parse_count, parse_layers, pick_device


def cache_seconds(lm, cfg: CacheConfig) -> tuple[float, float]:
    """(wall, CPU) seconds of stage one from text to a complete store, the model already loaded."""
    out = cfg.resolved_out()
    shutil.rmtree(out, ignore_errors=True)
    hooks = forward.check_layer_hooks(lm, cfg.layer_list(lm.n_layers), [cfg.source, cfg.target])
    t0, c0 = time.perf_counter(), time.process_time()
    writer = cache.open_writer(cfg, out, "create", lm, hooks)
    try:
        n_rows, _ = cache.write_store(cfg, writer, lm, hooks, text.iter_documents(cfg.dataset),
                                      writer.pending_chunks(), progress=False)
        writer.finalize(n_rows)
    finally:
        writer.close()
    return time.perf_counter() - t0, time.process_time() - c0


class ReadCounter:
    """Counts Store.read_chunk calls (one per layer and chunk read)."""

    def __init__(self):
        self.n = 0
        self.original = Store.read_chunk

    def __enter__(self):
        counter = self

        def counted(store, c):
            counter.n += 1
            return counter.original(store, c)
        Store.read_chunk = counted
        return self

    def __exit__(self, *exc):
        Store.read_chunk = self.original


def train_seconds(store: Path, out: Path, layers: list[int], args, as_set: bool) -> tuple[float, float, int]:
    """(wall, CPU) seconds of training the set, or the runs one after another, and the chunk reads."""
    base = dict(cache=str(store), dict_size=args.dict_size, k=args.k, batch_size=args.batch_size, steps=args.steps,
                log_every=max(1, args.steps // 4), checkpoint_every=args.steps, sample_every=0, seed=0)
    shutil.rmtree(out, ignore_errors=True)
    with ReadCounter() as reads, contextlib.redirect_stdout(io.StringIO()):
        t0, c0 = time.perf_counter(), time.process_time()
        if as_set:
            run_train(TrainConfig(layers=",".join(map(str, layers)), out=str(out), **base))
        else:
            for layer in layers:
                run_train(TrainConfig(layer=layer, out=str(out / f"l{layer}"), **base))
        return time.perf_counter() - t0, time.process_time() - c0, reads.n


def median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--tokens", default="50k")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dict-size", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--train-batch", dest="train_batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    device = pick_device(args.device)
    lm = models.load_model(args.model, device=device)
    layers = parse_layers(args.layers, lm.n_layers)
    tmp = Path(tempfile.mkdtemp(prefix="tc-bench-layers-"))
    common = dict(model=args.model, dataset="python-docs", tokens=parse_count(args.tokens), seq_len=args.seq_len,
                  batch_size=args.batch_size, device=device)
    multi = CacheConfig(layers=",".join(map(str, layers)), out=str(tmp / "multi.zarr"), **common)
    singles = [CacheConfig(layer=L, out=str(tmp / f"l{L}.zarr"), **common) for L in layers]
    cache_seconds(lm, singles[0])   # warm-up
    rounds = []
    for r in range(args.rounds):
        order = ["multi", "singles"] if r % 2 == 0 else ["singles", "multi"]
        t = {}
        for which in order:
            runs = [cache_seconds(lm, multi)] if which == "multi" else [cache_seconds(lm, c) for c in singles]
            t[which] = [sum(x[0] for x in runs), sum(x[1] for x in runs)]
        (mw, mc), (sw, sc) = t["multi"], t["singles"]
        rounds.append({"multi_s": mw, "singles_s": sw, "ratio": sw / mw, "multi_cpu_s": mc, "singles_cpu_s": sc,
                       "cpu_ratio": sc / mc})
        print(f"cache round {r}: {len(layers)} layers in one forward {mw:.1f} s ({mc:.1f} s CPU), one at a time "
              f"{sw:.1f} s ({sc:.1f} s CPU): {sw / mw:.2f}x wall, {sc / mc:.2f}x CPU", flush=True)
    predicted = sum(L + 1 for L in layers) / (max(layers) + 1)
    result = {"model": args.model, "layers": layers, "tokens": common["tokens"], "seq_len": args.seq_len,
              "device": device, "cache_rounds": rounds,
              "cache_ratio_median": median([r["ratio"] for r in rounds]),
              "cache_cpu_ratio_median": median([r["cpu_ratio"] for r in rounds]),
              "forward_blocks_ratio_predicted": predicted}
    if not args.skip_train:
        args.batch_size = args.train_batch
        train_rounds = []
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            t = {}
            for as_set in order:
                t[as_set] = train_seconds(tmp / "multi.zarr", tmp / ("set" if as_set else "runs"), layers, args, as_set)
            (sw, sc, sr), (rw, rc, rr) = t[True], t[False]
            train_rounds.append({"set_s": sw, "runs_s": rw, "ratio": sw / rw, "set_cpu_s": sc, "runs_cpu_s": rc,
                                 "cpu_ratio": sc / rc, "set_chunk_reads": sr, "runs_chunk_reads": rr})
            print(f"train round {r}: set {sw:.1f} s ({sc:.1f} s CPU), {len(layers)} runs {rw:.1f} s ({rc:.1f} s CPU): "
                  f"{sw / rw:.2f}x wall, {sc / rc:.2f}x CPU; chunk reads {sr} vs {rr}", flush=True)
        result.update({"train_rounds": train_rounds, "dict_size": args.dict_size, "k": args.k,
                       "steps": args.steps, "train_batch": args.train_batch,
                       "train_ratio_median": median([r["ratio"] for r in train_rounds]),
                       "train_cpu_ratio_median": median([r["cpu_ratio"] for r in train_rounds])})
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

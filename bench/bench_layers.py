"""Several layers at once vs one at a time, in one process (docs/benchmarks.md, "A transcoder for
every layer").

cache: one `tc cache --layers L1,..,LN` (one forward per batch, stopped after the highest layer)
       vs N `tc cache --layer Li`, on the same text, the model loaded once for all of them. Each
       round runs the multi-layer cache and the N single ones back to back, the order alternating
       between rounds; the ratio is (sum of the N single caches' seconds) / (the multi cache's).
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


def cache_seconds(lm, cfg: CacheConfig) -> float:
    """Seconds of stage one from text to a complete store, the model already loaded."""
    out = cfg.resolved_out()
    shutil.rmtree(out, ignore_errors=True)
    hooks = forward.check_layer_hooks(lm, cfg.layer_list(lm.n_layers), [cfg.source, cfg.target])
    t0 = time.perf_counter()
    writer = cache.open_writer(cfg, out, "create", lm, hooks)
    try:
        n_rows, _ = cache.write_store(cfg, writer, lm, hooks, text.iter_documents(cfg.dataset),
                                      writer.pending_chunks(), progress=False)
        writer.finalize(n_rows)
    finally:
        writer.close()
    return time.perf_counter() - t0


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


def train_seconds(store: Path, out: Path, layers: list[int], args, as_set: bool) -> tuple[float, int]:
    base = dict(cache=str(store), dict_size=args.dict_size, k=args.k, batch_size=args.batch_size, steps=args.steps,
                log_every=max(1, args.steps // 4), checkpoint_every=args.steps, sample_every=0, seed=0)
    shutil.rmtree(out, ignore_errors=True)
    with ReadCounter() as reads, contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        if as_set:
            run_train(TrainConfig(layers=",".join(map(str, layers)), out=str(out), **base))
        else:
            for layer in layers:
                run_train(TrainConfig(layer=layer, out=str(out / f"l{layer}"), **base))
        return time.perf_counter() - t0, reads.n


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
            t[which] = cache_seconds(lm, multi) if which == "multi" else sum(cache_seconds(lm, c) for c in singles)
        rounds.append({"multi_s": t["multi"], "singles_s": t["singles"], "ratio": t["singles"] / t["multi"]})
        print(f"cache round {r}: {len(layers)} layers in one forward {t['multi']:.1f} s, one at a time "
              f"{t['singles']:.1f} s: {t['singles'] / t['multi']:.2f}x", flush=True)
    predicted = sum(L + 1 for L in layers) / (max(layers) + 1)
    result = {"model": args.model, "layers": layers, "tokens": common["tokens"], "seq_len": args.seq_len,
              "device": device, "cache_rounds": rounds,
              "cache_ratio_median": sorted(r["ratio"] for r in rounds)[len(rounds) // 2],
              "forward_blocks_ratio_predicted": predicted}
    if not args.skip_train:
        args.batch_size = args.train_batch
        train_rounds = []
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            t, reads = {}, {}
            for as_set in order:
                t[as_set], reads[as_set] = train_seconds(tmp / "multi.zarr", tmp / ("set" if as_set else "runs"),
                                                         layers, args, as_set)
            train_rounds.append({"set_s": t[True], "runs_s": t[False], "ratio": t[True] / t[False],
                                 "set_chunk_reads": reads[True], "runs_chunk_reads": reads[False]})
            print(f"train round {r}: set {t[True]:.1f} s, {len(layers)} runs {t[False]:.1f} s: "
                  f"{t[True] / t[False]:.2f}x; chunk reads {reads[True]} vs {reads[False]}", flush=True)
        result.update({"train_rounds": train_rounds, "dict_size": args.dict_size, "k": args.k,
                       "steps": args.steps, "train_batch": args.train_batch,
                       "train_ratio_median": sorted(r["ratio"] for r in train_rounds)[len(train_rounds) // 2]})
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

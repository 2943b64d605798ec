"""Stage one speed: `tc cache` end to end vs. the bare truncated forward, in one process.

Both use the same loaded model, the same sequences and the same batch size. The baseline runs
only `forward_hooks` on pre-tokenized batches; `tc cache` adds tokenization, the fp16 cast,
statistics and the (background) Zarr writes. Ratio = cache tokens/s / forward tokens/s for each
back-to-back pair; the median pair is reported (this 2-core VM drifts by tens of percent).

    python bench/bench_cache.py --model tiny --tokens 100k
    python bench/bench_cache.py --model gemma-3-270m --tokens 50k --seq-len 256 --layer 6
    python bench/bench_cache.py --model gemma-2-2b-random --layer 8 --tokens 1M --seq-len 1024 --device cuda
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import cache, forward, models, text
from pipeline.cache import CacheConfig
from pipeline.util import parse_count, pick_device


def token_batches(lm, cfg: CacheConfig) -> list[tuple[int, np.ndarray]]:
    """The forward batches the cache will run, tokenized up front."""
    n_seqs = -(-cfg.tokens // cfg.seq_len)
    seqs = text.pack_sequences(text.iter_documents(cfg.dataset), lm.tokenizer, cfg.seq_len, lm.bos_id)
    return list(cache.batches(seqs, n_seqs, cfg.batch_size))


def bare_forward(lm, cfg: CacheConfig, hooks: list[str]) -> float:
    """Tokens/s of the truncated forward alone, over the sequences the cache will write."""
    batches = token_batches(lm, cfg)
    t0 = time.perf_counter()
    for _, toks in batches:
        forward.forward_hooks(lm, torch.from_numpy(toks), cfg.layer, hooks)
    return sum(len(t) for _, t in batches) * cfg.seq_len / (time.perf_counter() - t0)


def cache_end_to_end(lm, cfg: CacheConfig, hooks: list[str]) -> tuple[float, dict]:
    """Tokens/s of stage one from text to a complete store, the model already loaded."""
    out = cfg.resolved_out()
    t0 = time.perf_counter()
    writer = cache.open_writer(cfg, out, "create", lm, {cfg.layer: hooks})
    try:
        docs = text.iter_documents(cfg.dataset)
        n_rows, _ = cache.write_store(cfg, writer, lm, {cfg.layer: hooks}, docs, writer.pending_chunks())
        writer.finalize(n_rows)
        nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        result = {"tokens": n_rows, "bytes_per_token": nbytes / n_rows}
    finally:
        writer.close()
    return result["tokens"] / (time.perf_counter() - t0), result


def side_work(lm, cfg: CacheConfig, hooks: list[str]) -> dict[str, float]:
    """Seconds of each piece of work `tc cache` adds to the forward, each run alone, one after
    another, on the same sequences: what has to hide behind the forward for the ratio to reach 1."""
    from pipeline.store import StoreWriter, to_fp16

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    batches = token_batches(lm, cfg)
    out["tokenize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acts = [forward.forward_hooks(lm, torch.from_numpy(toks), cfg.layer, hooks, on_device=True) for _, toks in batches]
    out["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    casts = [[to_fp16(a[h]) for h in hooks] for a in acts]
    out["fp16_cast"] = time.perf_counter() - t0
    src, tgt = (np.concatenate([c[i][0] for c in casts]) for i in range(2))
    over = [np.concatenate([c[i][1] for c in casts]) for i in range(2)]
    toks = np.concatenate([t.reshape(-1) for _, t in batches])
    path = cfg.resolved_out()
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    writer = StoreWriter.create(path, n_rows=len(toks), d_model=lm.d_model,
                                chunk_rows=cache.chunk_rows_for(cfg.seq_len), attrs={"config": {}})
    out["store_create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in range(writer.n_chunks):
        rows = slice(c * writer.chunk_rows, (c + 1) * writer.chunk_rows)
        writer.write_chunk(c, src[rows], tgt[rows], toks[rows], toks[rows] == lm.bos_id,
                           (over[0][rows], over[1][rows]))
    out["chunk_writes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.finalize(len(toks), models.vocab_strings(lm.tokenizer))
    writer.close()
    out["vocab_and_finalize"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--tokens", default="100k")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="back-to-back (forward, cache) pairs")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's own, all cores)")
    ap.add_argument("--breakdown", action="store_true", help="also time each piece of tc's added work alone")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load_model(args.model, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="tc-bench-cache-"))
    cfg = CacheConfig(model=args.model, dataset="python-docs", layer=args.layer, tokens=parse_count(args.tokens),
                      seq_len=args.seq_len, batch_size=args.batch_size, out=str(tmp / "s.zarr"),
                      device=device)
    hooks = forward.check_hooks(lm, cfg.layer, [cfg.source, cfg.target])
    bare_forward(lm, cfg, hooks)   # warm-up: first calls allocate
    fwd, e2e = [], []
    for _ in range(args.repeats):   # in pairs, back to back, so drift in machine load hits both alike
        fwd.append(bare_forward(lm, cfg, hooks))
        shutil.rmtree(tmp / "s.zarr", ignore_errors=True)
        rate, result = cache_end_to_end(lm, cfg, hooks)
        e2e.append(rate)
    pair_ratios = [e / f for e, f in zip(e2e, fwd)]
    raw_fp16 = 2 * 2 * lm.d_model   # source + target, 2 bytes each
    summary = {
        "model": args.model, "d_model": lm.d_model, "tokens": result["tokens"], "seq_len": args.seq_len,
        "batch_size": args.batch_size, "repeats": args.repeats,
        "forward_tok_s": float(np.median(fwd)), "cache_tok_s": float(np.median(e2e)),
        "ratio": float(np.median(pair_ratios)),   # median over back-to-back pairs
        "pair_ratios": [round(r, 3) for r in pair_ratios],
        "forward_tok_s_each": [round(r) for r in fwd], "cache_tok_s_each": [round(r) for r in e2e],
        "bytes_per_token": result["bytes_per_token"], "raw_fp16_bytes_per_token": raw_fp16,
        "bytes_vs_raw_fp16": result["bytes_per_token"] / raw_fp16,
        "torch_threads": torch.get_num_threads(), "device": device,
    }
    if args.breakdown:
        parts = side_work(lm, cfg, hooks)
        added = sum(v for k, v in parts.items() if k != "forward")
        summary["breakdown_s"] = {k: round(v, 3) for k, v in parts.items()}
        summary["added_work_vs_forward"] = added / parts["forward"]
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    print(f"\n{args.model}: cache {summary['cache_tok_s']:,.0f} tok/s vs bare forward {summary['forward_tok_s']:,.0f} "
          f"tok/s -> ratio {summary['ratio']:.2f} (median of pairs {summary['pair_ratios']}; target >= 0.90); "
          f"{summary['bytes_per_token']:.0f} bytes/token "
          f"= {summary['bytes_vs_raw_fp16']:.3f}x raw fp16")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Truncated forward: tc's early-stop hooks vs run_with_cache(stop_at_layer) vs the full forward.

    python bench/forward_paths.py --model tiny --layer 1 --batch 8 --seq-len 256 --repeats 5

Prints tokens/s of each path on the same batches in one process, and the ratio to the
run_with_cache baseline.
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.forward import check_hooks, forward_hooks
from pipeline.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    start = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    print(f"load {args.model}: {time.perf_counter() - start:.1f} s")
    names = check_hooks(lm, args.layer, ["hook_resid_mid", "hook_mlp_out"])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, min(lm.vocab_size, 50_000), (args.batch, args.seq_len), generator=gen)
    tokens[:, 0] = lm.bos_id
    n = tokens.numel()

    def with_cache():
        with torch.no_grad():
            lm.model.run_with_cache(tokens.to(lm.device), names_filter=names, stop_at_layer=args.layer + 1)

    def full():
        with torch.no_grad():
            lm.model(tokens.to(lm.device))

    paths = {"run_with_cache(stop_at_layer)": with_cache,
             "tc forward_hooks (early stop)": lambda: forward_hooks(lm, tokens, args.layer, names),
             "full forward with unembedding": full}
    # Interleave the paths round by round so that load from other processes hits them alike.
    seconds = {label: [] for label in paths}
    for fn in paths.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for label, fn in paths.items():
            start = time.perf_counter()
            fn()
            seconds[label].append(time.perf_counter() - start)
    base = min(seconds["run_with_cache(stop_at_layer)"])
    for label, times in seconds.items():
        best = min(times)
        print(f"{label:32s} {n / best:10.0f} tokens/s (best of {args.repeats})  {base / best:5.2f}x")

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

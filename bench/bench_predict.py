"""Inference speed of the transcoder, in one process: `predict` (what eval splices into the model)
and `predict_prefixes` (every Matryoshka prefix, what eval's row metrics use) against the dense
reference `encode(x) @ W_dec` (B x all latents x d).

    python bench/bench_predict.py                       # d 640, 5120 latents, k 48, 2048 rows
    python bench/bench_predict.py --rows 256 --repeats 5   # smoke

Run it in two checkouts one after the other (alternating) to compare versions: the median times
are printed as JSON with the versions. It also runs on tc 0.1 (copy it there), which had no
`predict_prefixes` and held the threshold itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from pipeline.train import default_groups
from pipeline.transcoder import Transcoder
from pipeline.util import versions


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--dict-size", type=int, default=5120)
    ap.add_argument("--k", type=int, default=48)
    ap.add_argument("--rows", type=int, default=2048, help="rows per call (eval splices batch x seq_len rows)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tc = Transcoder(a.d, a.d, default_groups(a.dict_size), a.k, seed=0).eval()
    x = torch.randn(a.rows, a.d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # a threshold that keeps about k latents per row, as a trained one does
        pre = tc._pre(tc.normalize_source(x)).flatten()
        threshold = tc.sparsity.threshold if hasattr(tc, "sparsity") else tc.threshold
        threshold.fill_(float(pre.kthvalue(pre.numel() - a.k * a.rows).values))
        dense = median_ms(lambda: tc.denormalize_target(tc.encode(x) @ tc.W_dec + tc.b_dec), a.repeats)
    predict = median_ms(lambda: tc.predict(x), a.repeats)
    prefixes = median_ms(lambda: tc.predict_prefixes(x), a.repeats) if hasattr(tc, "predict_prefixes") else None
    print(f"predict {predict:.1f} ms, predict_prefixes {prefixes or float('nan'):.1f} ms, dense reference "
          f"{dense:.1f} ms ({a.rows} rows, d {a.d}, {a.dict_size} latents, k {a.k})")
    print(json.dumps({"predict_ms": predict, "predict_prefixes_ms": prefixes, "dense_ms": dense,
                      "dense_over_predict": dense / predict, "rows": a.rows, "versions": versions()}))


if __name__ == "__main__":
    main()

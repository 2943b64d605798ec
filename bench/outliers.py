"""How far beyond the typical row do a store's rows go, and what does the outlier rule flag?

    python bench/outliers.py data/l6.zarr data/l9.zarr ... [--json out.json]

For every store: per side (source, target), the row norms of the non-BOS, unclamped rows divided by
their chunk's median (the reference the rule uses), as quantiles and counts beyond 2x, 3x, 5x and
10x, with the share of the side's variance (sum of squared deviations from the mean) those rows
hold; the ratio of BOS rows' median norm to the others'; and what `pipeline.store.outlier_mask`
flags at its default factor (rows, variance share, most common tokens). The store's own flag
bits are not used (stores made before the rule have none), so every store is measured alike.
Numbers go in docs/store.md ("Outlier rows").
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, OUTLIER_FACTOR, Store, outlier_mask   # noqa: E402

FACTORS = (2, 3, 5, 10)


def chunk_ratios(store: Store, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(norm / chunk median of the candidate rows, candidate mask, is-BOS mask), over all rows."""
    raw_flags = store.group["flags"][: store.n_rows]
    ratios, cands, bos = [], [], []
    for c in range(store.n_chunks):
        a, b = store.chunk_range(c)
        x = store.group[side][a:b].astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        f = raw_flags[a:b]
        cand = (f & (FLAG_BOS | FLAG_OVERFLOW)) == 0
        ratios.append(norms / np.median(norms[cand]))
        cands.append(cand)
        bos.append((f & FLAG_BOS) != 0)
    return np.concatenate(ratios), np.concatenate(cands), np.concatenate(bos)


def variance_share(store: Store, side: str, rows: np.ndarray, cand: np.ndarray) -> float:
    """Share of the candidate rows' total squared deviation (about their mean) held by `rows`."""
    x = store.group[side][: store.n_rows][cand].astype(np.float64)
    dev = ((x - x.mean(0)) ** 2).sum(1)
    return float(dev[rows[cand]].sum() / dev.sum())


def measure_side(store: Store, side: str) -> dict:
    r, cand, bos = chunk_ratios(store, side)
    rc = r[cand]
    out = {"p99": float(np.quantile(rc, 0.99)), "p99.9": float(np.quantile(rc, 0.999)), "max": float(rc.max()),
           "bos_median_ratio": float(np.median(r[bos])) if bos.any() else None}
    for f in FACTORS:
        beyond = cand & (r > f)
        out[f">{f}x"] = {"rows": int(beyond.sum()), "variance_share": variance_share(store, side, beyond, cand)}
    return out


def measure_rule(store: Store) -> dict:
    raw_flags = store.group["flags"][: store.n_rows]
    flagged = np.zeros(store.n_rows, bool)
    for c in range(store.n_chunks):
        a, b = store.chunk_range(c)
        flagged[a:b] = outlier_mask(store.group["source"][a:b], raw_flags[a:b])
    cand = (raw_flags & (FLAG_BOS | FLAG_OVERFLOW)) == 0
    vocab = store.vocab() if "vocab" in store.group else None
    tokens = Counter(store.tokens[flagged].tolist()).most_common(5)
    ratios = chunk_ratios(store, "source")[0]
    kept = cand & ~flagged
    return {"factor": OUTLIER_FACTOR, "rows": int(flagged.sum()), "fraction": float(flagged.sum() / cand.sum()),
            "source_variance_share": variance_share(store, "source", flagged, cand),
            "target_variance_share": variance_share(store, "target", flagged, cand),
            "smallest_flagged_ratio": float(ratios[flagged].min()) if flagged.any() else None,
            "largest_kept_ratio": float(ratios[kept].max()),
            "tokens": [[vocab[t] if vocab else t, n] for t, n in tokens]}


def measure(path: str) -> dict:
    s = Store(path).require_complete()
    return {"store": path, "model": s.attrs.get("model"), "layer": s.attrs.get("layer"), "rows": s.n_rows,
            "d_model": s.d_model, "source": measure_side(s, "source"), "target": measure_side(s, "target"),
            "rule": measure_rule(s)}


def row_text(m: dict) -> str:
    src, rule = m["source"], m["rule"]
    return (f"{m['model']:<18} L{m['layer']:<3} {m['rows']:>8,}  src p99.9 {src['p99.9']:5.2f}x max {src['max']:6.2f}x  "
            f">3x {src['>3x']['rows']:>5}  BOS {src['bos_median_ratio'] or 0:6.1f}x  | flagged {rule['rows']:>5} "
            f"({rule['fraction']:.3%}) var src {rule['source_variance_share']:.1%} tgt {rule['target_variance_share']:.1%}"
            f"  largest kept {rule['largest_kept_ratio']:.2f}x  tgt >10x {m['target']['>10x']['rows']}  "
            f"tokens {rule['tokens'][:3]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--json", help="write every number here")
    a = p.parse_args()
    results = []
    for path in a.stores:
        m = measure(path)
        results.append(m)
        print(row_text(m), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

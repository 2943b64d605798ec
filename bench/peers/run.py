"""Side by side with SAELens: both tools on the same machine, model, layer, text and token count.

    python bench/peers/run.py --tokens 51200 --steps 300 --repeats 3

1. cache: SAELens' CacheActivationsRunner (one hook, blocks.L.hook_resid_mid, fp32) vs. `tc cache`
   (two hooks, resid_mid and mlp_out, fp16): tokens/s, bytes per token on disk, peak RSS.
2. train: SAELens' Matryoshka BatchTopK SAE from its cache vs. `tc train` from its store, same
   d, dictionary, groups, k, batch, lr schedule and steps: steps/s and peak RSS; then FVU of both
   on the same held-out rows, computed by one piece of code (fvu.py).
   SAELens trains SAEs only (resid_mid -> resid_mid); tc trains a transcoder (resid_mid ->
   mlp_out), a different task, so tc is ALSO trained as an SAE (a store whose target hook is
   resid_mid) and the FVU ratio compares the two SAEs. The transcoder's FVU is reported beside it.

Every run is its own child process, measured from outside (wall time, peak RSS from wait4), one
at a time, alternating tools; medians over --repeats. SAELens lives in its own virtual environment
(made here on first use) and runs through saelens_side.py; tc never imports it.
Prints one table of ratios (tc / SAELens) and writes all raw numbers to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fvu import evaluate, load_saelens, load_tc   # noqa: E402
from measure import BenchError, Measured, dir_bytes, run_measured   # noqa: E402

SAELENS_PINS = ["torch==2.13.0", "sae-lens==6.54.12"]   # sae-lens pins transformer-lens 3.x
MODEL = "gemma-3-270m"
NORMALIZE = ["expected_average_only_in", "covariance_whitening", "none"]


# ------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tc vs. SAELens on Gemma 3 270M (CPU).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=51200, help="tokens cached by each tool (rounded up to whole "
                   "model batches of --model-batch x --seq-len, as SAELens needs)")
    p.add_argument("--steps", type=int, default=300, help="training steps of both trainers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (medians reported)")
    p.add_argument("--heldout-tokens", type=int, default=16384, help="tokens of held-out text for FVU")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--model-batch", type=int, default=8, help="sequences per LLM forward, both tools")
    p.add_argument("--dict-size", type=int, default=5120)
    p.add_argument("--groups", default="640,1280,2560,640", help="tc group sizes (SAELens gets the cumulative widths)")
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per training step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup, both tools (default steps // 10)")
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="cosine decay ends at lr x this, both tools")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--saelens-normalize", default="expected_average_only_in", choices=NORMALIZE,
                   help="SAELens input normalisation of the timed runs (its default is none; tc always "
                   "centres and scales)")
    p.add_argument("--saelens-extra", default="covariance_whitening", help="comma list of more SAELens normalisations "
                   f"({', '.join(NORMALIZE)}) each trained ONCE more, for their held-out FVU only")
    p.add_argument("--saelens-include-bos", action="store_true",
                   help="train SAELens on BOS rows too (its default; tc skips them)")
    p.add_argument("--stages", default="cache,train,eval", help="comma list of cache, train, eval; later stages "
                   "reuse the work folder and the JSON of an earlier run")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "tc-peers" / "work"),
                   help="scratch folder; the files this benchmark made there before are replaced")
    p.add_argument("--venv", default=str(Path.home() / ".cache" / "tc-peers" / "venv-saelens"),
                   help="SAELens virtual environment (created if missing)")
    p.add_argument("--tc", default=None, help="command that runs tc (default: the tc script beside this python)")
    p.add_argument("--json", default=None, help="results file (default WORK/results.json)")
    a = p.parse_args(argv)
    unit = a.model_batch * a.seq_len
    a.tokens = -(-a.tokens // unit) * unit
    a.group_list = [int(v) for v in a.groups.split(",")]
    a.widths = np.cumsum(a.group_list).tolist()
    if a.widths[-1] != a.dict_size:
        p.error(f"--groups sum to {a.widths[-1]}, not --dict-size {a.dict_size}")
    if a.warmup_steps is None:
        a.warmup_steps = a.steps // 10
    a.stage_set = set(a.stages.split(","))
    a.extra = [v for v in a.saelens_extra.split(",") if v]
    if set(a.extra) - set(NORMALIZE):
        p.error(f"--saelens-extra: unknown {sorted(set(a.extra) - set(NORMALIZE))}; use {', '.join(NORMALIZE)}")
    a.json = a.json or str(Path(a.work) / "results.json")
    return a


# ------------------------------------------------------------------------------- setup

def ensure_saelens_venv(venv: Path) -> Path:
    """The SAELens venv's python; the venv is created with the pinned versions when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sae_lens, sys; sys.exit(sae_lens.__version__ != '6.54.12')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"making the SAELens environment {venv} (pip install {' '.join(SAELENS_PINS)})...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in SAELENS_PINS:   # torch first, so sae-lens does not pull another build
        subprocess.run([str(python), "-m", "pip", "install", "-q", pin], check=True)
    subprocess.run(probe, check=True)
    return python


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    return env


def tc_command(a: argparse.Namespace) -> list[str]:
    if a.tc:
        return a.tc.split()
    return [str(Path(sys.executable).parent / "tc")]


def split_documents(tokenizer: Any, docs: list[str], train_tokens: int, heldout_tokens: int,
                    seq_len: int) -> tuple[list[str], list[str]]:
    """The first documents holding `train_tokens` (plus a margin) for training, the next ones for
    the held-out set: disjoint by construction, whatever packing each tool uses."""
    def need(tokens: int) -> int:   # stream tokens (text + one BOS per doc) to fill `tokens` packed rows
        return int(tokens * 1.05) + 2 * seq_len

    parts: list[list[str]] = [[], []]
    budgets = [need(train_tokens), need(heldout_tokens)]
    which, have = 0, 0
    for doc in docs:
        n = len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if n == 0:
            continue
        parts[which].append(doc)
        have += n + 1
        if have >= budgets[which]:
            if which == 1:
                return parts[0], parts[1]
            which, have = 1, 0
    raise BenchError(f"python-docs has too little text for {train_tokens} + {heldout_tokens} tokens")


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def prepare_text(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """tc's python-docs corpus split into training and held-out JSONL files (both tools read them)."""
    from pipeline.models import load_tokenizer
    from pipeline.text import python_docs

    train_docs, held_docs = split_documents(load_tokenizer(MODEL), python_docs(), a.tokens, a.heldout_tokens,
                                            a.seq_len)
    write_jsonl(work / "text" / "train.jsonl", train_docs)
    write_jsonl(work / "text" / "heldout.jsonl", held_docs)
    return {"corpus": "python-docs", "train_docs": len(train_docs), "heldout_docs": len(held_docs),
            "train_chars": sum(map(len, train_docs)), "heldout_chars": sum(map(len, held_docs))}


def fresh(path: Path) -> Path:
    """Remove a path this benchmark made earlier, so every timed run starts from nothing."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


# ------------------------------------------------------------------------------- the runs

class Bench:
    def __init__(self, a: argparse.Namespace, saelens_python: Path):
        self.a = a
        self.work = Path(a.work)
        self.py = str(saelens_python)
        self.side = str(HERE / "saelens_side.py")
        self.tc = tc_command(a)
        self.env = offline_env()
        self.hook = f"blocks.{a.layer}.hook_resid_mid"

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def log(self, name: str) -> Path:
        return self.path("logs", f"{name}.log")

    # -- cache

    def saelens_cache(self, r: int) -> dict[str, Any]:
        a, out, js = self.a, fresh(self.path("cache", f"saelens_r{r}")), self.path("json", f"saelens_cache_r{r}.json")
        m = run_measured([self.py, self.side, "cache", "--hook", self.hook, "--d-in", str(self.d_model()),
                          "--context", str(a.seq_len), "--model-batch", str(a.model_batch),
                          "--docs", str(self.path("text", "train.jsonl")), "--out", str(out), "--json", str(js),
                          "--model-dir", str(self.model_dir()), "--tokens", str(a.tokens)],
                         self.log(f"saelens_cache_r{r}"), self.env)
        inner = json.loads(js.read_text())
        return cache_result(m, inner["tokens"], inner["run_s"], dir_bytes(out), hooks=1, inner=inner)

    def tc_cache(self, name: str, dataset: Path, tokens: int, target: str = "hook_mlp_out") -> dict[str, Any]:
        a, out = self.a, fresh(self.path("cache", f"{name}.zarr"))
        m = run_measured([*self.tc, "cache", "--model", MODEL, "--dataset", str(dataset), "--layer", str(a.layer),
                          "--tokens", str(tokens), "--seq-len", str(a.seq_len), "--batch-size", str(a.model_batch),
                          "--source", "hook_resid_mid", "--target", target, "--device", "cpu", "--out", str(out)],
                         self.log(f"tc_cache_{name}"), self.env)
        written, run_s = parse_tc_cache_summary(m.output())
        return cache_result(m, written, run_s, dir_bytes(out), hooks=2, inner={"store": str(out)})

    # -- train

    def saelens_train(self, name: str, normalize: str) -> dict[str, Any]:
        a = self.a
        out, js = fresh(self.path("train", f"saelens_{name}")), self.path("json", f"saelens_train_{name}.json")
        cmd = [self.py, self.side, "train", "--hook", self.hook, "--d-in", str(self.d_model()),
               "--context", str(a.seq_len), "--model-batch", str(a.model_batch),
               "--docs", str(self.path("text", "train.jsonl")), "--out", str(out), "--json", str(js),
               "--cache", str(self.path("cache", "saelens_r0")), "--steps", str(a.steps), "--batch", str(a.batch_size),
               "--d-sae", str(a.dict_size), "--widths", ",".join(map(str, a.widths)), "--k", str(a.k),
               "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps), "--min-lr-ratio", str(a.min_lr_ratio),
               "--normalize", normalize, "--norm-batches", str(max(1, min(50, a.tokens // a.batch_size))),
               "--bos-id", str(self.bos_id()), "--seed", str(a.seed),
               "--no-exclude-bos" if a.saelens_include_bos else "--exclude-bos"]
        m = run_measured(cmd, self.log(f"saelens_train_{name}"), self.env)
        inner = json.loads(js.read_text())
        return train_result(m, inner["steps"], inner["loop_s"], str(out), inner)

    def tc_train(self, name: str, store: str) -> dict[str, Any]:
        a, out = self.a, fresh(self.path("train", name))
        m = run_measured([*self.tc, "train", "--cache", str(self.path("cache", store)), "--dict-size", str(a.dict_size),
                          "--groups", a.groups, "--k", str(a.k), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
                          "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
                          "--min-lr-ratio", str(a.min_lr_ratio), "--seed", str(a.seed), "--device", "cpu",
                          "--out", str(out)], self.log(f"tc_train_{name}"), self.env)
        steps, loop_s = tc_loop_seconds(out / "metrics.jsonl", a.batch_size)
        return train_result(m, steps, loop_s, str(out / "transcoder.safetensors"),
                            json.loads((out / "summary.json").read_text()))

    # -- facts about the model, read once

    def model_dir(self) -> Path:
        from pipeline.models import gemma3_folder
        return gemma3_folder()

    def d_model(self) -> int:
        return int(json.loads((self.model_dir() / "config.json").read_text())["hidden_size"])

    def bos_id(self) -> int:
        from pipeline.models import load_tokenizer
        return int(load_tokenizer(MODEL).bos_token_id)


def cache_result(m: Measured, tokens: int, run_s: float, disk: int, hooks: int, inner: dict) -> dict[str, Any]:
    return {"tokens": tokens, "hooks": hooks, "wall_s": m.wall_s, "run_s": run_s, "peak_rss_mib": m.peak_rss_mib,
            "disk_bytes": disk, "tokens_per_s_run": tokens / run_s, "tokens_per_s_wall": tokens / m.wall_s,
            "bytes_per_token": disk / tokens, "bytes_per_token_per_hook": disk / tokens / hooks,
            "log": m.log, "inner": inner}


def train_result(m: Measured, steps: int, loop_s: float, weights: str, inner: dict) -> dict[str, Any]:
    return {"steps": steps, "wall_s": m.wall_s, "loop_s": loop_s, "peak_rss_mib": m.peak_rss_mib,
            "steps_per_s_loop": steps / loop_s, "steps_per_s_wall": steps / m.wall_s, "weights": weights,
            "log": m.log, "inner": inner}


def parse_tc_cache_summary(text: str) -> tuple[int, float]:
    """(tokens written, seconds of the caching loop) from tc cache's closing line."""
    import re

    m = re.search(r"wrote ([\d,]+) tokens to .*?, ([\d,.]+) s this run", text)
    if not m:
        raise BenchError("tc cache printed no summary line ('wrote N tokens to ... s this run')")
    return int(m.group(1).replace(",", "")), float(m.group(2).replace(",", ""))


def tc_loop_seconds(metrics: Path, batch_size: int) -> tuple[int, float]:
    """(steps, seconds of the training loop) from metrics.jsonl: each logged window carries its tokens/s."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    seconds, prev = 0.0, 0
    for row in rows:
        seconds += (row["tokens"] - prev) / row["tokens_per_s"]
        prev = row["tokens"]
    return prev // batch_size, seconds


# ------------------------------------------------------------------------------- stages

def stage_cache(b: Bench, results: dict[str, Any], save: Callable[[], None]) -> None:
    a = b.a
    results["cache"] = {"saelens": [], "tc": []}
    for r in range(a.repeats):   # alternate the tools so drifting machine load hits both alike
        print(f"cache repeat {r + 1}/{a.repeats}: SAELens...", flush=True)
        results["cache"]["saelens"].append(b.saelens_cache(r))
        print(f"cache repeat {r + 1}/{a.repeats}: tc...", flush=True)
        results["cache"]["tc"].append(b.tc_cache(f"tc_r{r}", b.path("text", "train.jsonl"), a.tokens))
        save()
    print("held-out store and tc's SAE store (not timed for the comparison)...", flush=True)
    results["heldout_cache"] = b.tc_cache("heldout", b.path("text", "heldout.jsonl"), a.heldout_tokens)
    results["tc_sae_cache"] = b.tc_cache("tc_sae", b.path("text", "train.jsonl"), a.tokens, target="hook_resid_mid")
    save()


def stage_train(b: Bench, results: dict[str, Any], save: Callable[[], None]) -> None:
    a = b.a
    if not (b.path("cache", "saelens_r0").exists() and b.path("cache", "tc_sae.zarr").exists()):
        raise BenchError(f"no caches in {b.work}: run the cache stage first (--stages cache,train,eval)")
    results["train"] = {"saelens": [], "tc_transcoder": [], "tc_sae": []}
    for r in range(a.repeats):
        for key, run in (("saelens", lambda: b.saelens_train(f"r{r}", a.saelens_normalize)),
                         ("tc_transcoder", lambda: b.tc_train(f"tc_transcoder_r{r}", "tc_r0.zarr")),
                         ("tc_sae", lambda: b.tc_train(f"tc_sae_r{r}", "tc_sae.zarr"))):
            print(f"train repeat {r + 1}/{a.repeats}: {key}...", flush=True)
            results["train"][key].append(run())
            save()
    results["train"]["saelens_extra"] = {}
    for norm in a.extra:   # FVU only: one run each
        print(f"train SAELens normalize={norm} (FVU only)...", flush=True)
        results["train"]["saelens_extra"][norm] = b.saelens_train(f"extra_{norm}", norm)
        save()


def heldout_rows(store_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Held-out (resid_mid, mlp_out) rows, BOS and clamped rows dropped, as float32."""
    from pipeline.store import Store

    s = Store(store_path).require_complete()
    rows = s.read_rows(0, s.n_rows)
    keep = rows.flags == 0
    return rows.source[keep].astype(np.float32), rows.target[keep].astype(np.float32)


def stage_eval(b: Bench, results: dict[str, Any], save: Callable[[], None]) -> None:
    if "train" not in results:
        raise BenchError(f"{b.a.json} has no training results: run the train stage first")
    x, y = heldout_rows(b.path("cache", "heldout.zarr"))
    train = results["train"]
    fv = {"rows": len(x),
          "saelens_sae": [evaluate(load_saelens(t["weights"]), x, x) for t in train["saelens"]],
          "tc_sae": [evaluate(load_tc(t["weights"]), x, x) for t in train["tc_sae"]],
          "tc_transcoder": [evaluate(load_tc(t["weights"]), x, y) for t in train["tc_transcoder"]],
          "saelens_extra": {n: evaluate(load_saelens(t["weights"]), x, x)
                            for n, t in train.get("saelens_extra", {}).items()}}
    fv["own_code_check"] = own_code_check(b, x, y, train, fv)
    results["fvu"] = fv
    save()


def own_code_check(b: Bench, x: np.ndarray, y: np.ndarray, train: dict, fv: dict) -> dict[str, Any]:
    """The shared FVU code against each tool's own inference forward (they must agree)."""
    import torch
    from pipeline.transcoder import Transcoder

    rows = b.path("json", "heldout_resid_mid.npy")
    np.save(rows, x)
    js = b.path("json", "saelens_check.json")
    run_measured([b.py, b.side, "check", "--sae", train["saelens"][0]["weights"], "--rows", str(rows),
                  "--json", str(js)], b.log("saelens_check"), b.env)
    with torch.no_grad():
        pred = Transcoder.load(train["tc_transcoder"][0]["weights"]).predict(torch.from_numpy(x)).numpy()
    tc_fvu = float(((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    return {"saelens_own": json.loads(js.read_text())["fvu"],
            "saelens_shared": fv["saelens_sae"][0]["threshold"]["fvu"],
            "tc_own": tc_fvu, "tc_shared": fv["tc_transcoder"][0]["threshold"]["fvu"]}


# ------------------------------------------------------------------------------- report

def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def fvu_med(runs: list[dict], rule: str, prefix: int | None = None, key: str = "fvu") -> float:
    if prefix is not None:
        return statistics.median(r[rule]["fvu_prefix"][prefix] for r in runs)
    return statistics.median(r[rule][key] for r in runs)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    """(metric, SAELens, tc, target) rows; medians over repeats."""
    rows: list[tuple[str, float | None, float | None, str]] = []
    c = results.get("cache")
    if c:
        s, t = c["saelens"], c["tc"]
        rows += [("cache tokens/s, caching loop", med(s, "tokens_per_s_run"), med(t, "tokens_per_s_run"), ">= 1.5"),
                 ("cache tokens/s, whole command", med(s, "tokens_per_s_wall"), med(t, "tokens_per_s_wall"), ""),
                 ("cache bytes/token on disk (all hooks)", med(s, "bytes_per_token"), med(t, "bytes_per_token"), ""),
                 ("cache bytes/token per hook", med(s, "bytes_per_token_per_hook"),
                  med(t, "bytes_per_token_per_hook"), "<= 0.55"),
                 ("cache peak RSS MiB", med(s, "peak_rss_mib"), med(t, "peak_rss_mib"), "")]
    tr = results.get("train")
    if tr:
        s, t = tr["saelens"], tr["tc_transcoder"]
        rows += [("train steps/s, training loop", med(s, "steps_per_s_loop"), med(t, "steps_per_s_loop"), ">= 2"),
                 ("train steps/s, whole command", med(s, "steps_per_s_wall"), med(t, "steps_per_s_wall"), ""),
                 ("train peak RSS MiB", med(s, "peak_rss_mib"), med(t, "peak_rss_mib"), "")]
    fv = results.get("fvu")
    if fv:
        s, t = fv["saelens_sae"], fv["tc_sae"]
        norm = results["config"]["saelens_normalize"]
        rows += [(f"SAE FVU, inference rule, SAELens {norm}", fvu_med(s, "threshold"), fvu_med(t, "threshold"), "<= 1"),
                 (f"SAE FVU, BatchTopK rule, SAELens {norm}", fvu_med(s, "batch_topk"), fvu_med(t, "batch_topk"),
                  "<= 1"),
                 ("SAE FVU, first group only, inference rule", fvu_med(s, "threshold", 0),
                  fvu_med(t, "threshold", 0), ""),
                 ("SAE L0, inference rule", fvu_med(s, "threshold", key="l0"),
                  fvu_med(t, "threshold", key="l0"), ""),
                 *extra_rows(fv, t),
                 ("transcoder FVU (mlp_out), inference rule", None,
                  fvu_med(fv["tc_transcoder"], "threshold"), "")]
    return rows


def extra_rows(fv: dict, tc_runs: list[dict]) -> list[tuple[str, float | None, float | None, str]]:
    """FVU of the extra SAELens normalisations, each against the same tc SAE."""
    rows = []
    for norm, result in fv.get("saelens_extra", {}).items():
        for rule, label in (("threshold", "inference"), ("batch_topk", "BatchTopK")):
            rows.append((f"SAE FVU, {label} rule, SAELens {norm}", result[rule]["fvu"], fvu_med(tc_runs, rule), ""))
    return rows


def print_table(rows: list[tuple[str, float | None, float | None, str]]) -> None:
    header = "metric (held-out FVU: same rows, same code)"
    print(f"\n{header:<58} {'SAELens':>10} {'tc':>10} {'tc/SAELens':>11}  target")
    for name, s, t, target in rows:
        ratio = f"{t / s:>10.2f}x" if s and t is not None else f"{'-':>11}"
        fmt = lambda v: f"{'-':>10}" if v is None else f"{v:>10.4g}"   # noqa: E731
        print(f"{name:<58} {fmt(s)} {fmt(t)} {ratio}  {target}")


# ------------------------------------------------------------------------------- main

def machine() -> dict[str, Any]:
    import platform

    import torch
    from pipeline.util import versions

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "tc_versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_results(a: argparse.Namespace) -> dict[str, Any]:
    """An earlier run's results when only later stages are asked for (they reuse its files)."""
    path = Path(a.json)
    if "cache" not in a.stage_set and path.exists():
        return json.loads(path.read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    from pipeline.util import write_json_atomic

    a = parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = load_results(a)
    results["config"] = {k: v for k, v in vars(a).items() if k != "stage_set"}
    results["machine"] = machine()

    def save() -> None:
        write_json_atomic(a.json, results)

    try:
        bench = Bench(a, ensure_saelens_venv(Path(a.venv)))
        if "cache" in a.stage_set:
            results["text"] = prepare_text(a, work)
            stage_cache(bench, results, save)
        if "train" in a.stage_set:
            stage_train(bench, results, save)
        if "eval" in a.stage_set:
            stage_eval(bench, results, save)
    except BenchError as e:
        save()
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["summary"] = [dict(zip(("metric", "saelens", "tc", "target"), r)) for r in summary_rows(results)]
    save()
    print_table(summary_rows(results))
    print(f"\nraw results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

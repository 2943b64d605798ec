"""Transcoders side by side with EleutherAI sparsify: same rows, same normalisation, same schedule.

    python bench/peers/transcoders.py --train-store data/demo/gemma-3-270m_l6.zarr \
        --heldout-store data/bench/g3-l6-licenses.zarr --steps 300 --json data/bench/transcoders.json

Four trainings, one at a time, each its own child process:
  tc BatchTopK            `tc train --groups D --no-skip` (one group)
  tc TopK                 the same with `--sparsity topk` (per-token TopK, sparsify's rule)
  tc Matryoshka           `tc train --groups 640,1280,2560,640 --no-skip`
  tc Matryoshka + skip    the same with `--skip` (a linear skip path, same L0)
  sparsify TopK    sparsify's SparseCoder(transcode=True), per-token TopK with its AuxK, trained by
                   sparsify_side.py inside sparsify's own virtual environment (made here on first use)
All three get the train store's usable rows in the SAME order (the order tc's ChunkLoader hands
tc train: the driver replays the loader with tc train's seed and batch size and passes the row
ids to sparsify), tc's normalisation (per-dim mean, one scalar scale per side, from the store's
statistics), Adam at the same learning rate of every step (tc's schedule, `pipeline.train.lr_at`),
the same dictionary size, k and batch, and the same dead-latent window (--dead-tokens) for AuxK.
sparsify's AuxK is switched on with auxk_alpha = 1/32 (tc's --aux-coef): its default, 0, turns it
off, and its default dead_feature_threshold (10M tokens) is more than a short run sees.

Then ONE function (`score`) gives every tool's FVU, dead fraction and L0 on the held-out store's
usable rows (a different text), each tool predicting with its own inference rule: tc's BatchTopK
threshold (`Transcoder.predict`, `encode_rows`), sparsify's per-token TopK (its `encode`/`decode`).
Step time: ms per optimiser step, median over 10-step windows after the first 10 steps (tc: its
metrics.jsonl windows with --log-every 10; sparsify: its own loop timed the same way, batch
gathering included), also split at the step where AuxK can first act. Prints one table and writes
every raw number, the versions and the commands to --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import BenchError, run_measured   # noqa: E402
from run import fresh, machine, offline_env, tc_command   # noqa: E402

# torch first: on this machine it resolves to the local CPU wheel, and eai-sparsify (which
# does not pin torch) then keeps it instead of pulling a CUDA build from the index
SPARSIFY_PINS = ["torch==2.13.0", "eai-sparsify==1.3.3 numpy==2.4.6"]
SPARSIFY_VERSION = "1.3.3"
WINDOW = 10   # steps per timing window; the first window (start-up, allocation) is left out


# ------------------------------------------------------------------------------- arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tc transcoders vs. sparsify's TopK transcoder (CPU).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-store", required=True, help="tc store to train on (its usable rows)")
    p.add_argument("--heldout-store", required=True, help="tc store of a different text, same model and layer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--min-lr-ratio", type=float, default=0.01)
    p.add_argument("--dict-size", type=int, default=5120)
    p.add_argument("--k", type=int, default=48)
    p.add_argument("--matryoshka-groups", default="640,1280,2560,640")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsify-auxk-alpha", type=float, default=1 / 32,
                   help="sparsify's auxk_alpha (its default 0 turns AuxK off; 1/32 = tc's --aux-coef)")
    p.add_argument("--dead-tokens", type=int, default=100_000,
                   help="a latent unfired for this many training tokens is dead (AuxK trains it): tc's "
                   "--dead-tokens and sparsify's dead_feature_threshold (its default 10M is more than a "
                   "300-step run sees)")
    p.add_argument("--repeats", type=int, default=1, help="trainings of each tool, alternating; step times are "
                   "medians over them, held-out numbers come from the first")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "tc-peers" / "work-transcoders"),
                   help="scratch folder (run folders, logs, the row files while sparsify trains)")
    p.add_argument("--venv", default=str(Path.home() / ".cache" / "tc-peers" / "venv-sparsify"),
                   help="sparsify virtual environment (created if missing)")
    p.add_argument("--tc", default=None, help="command that runs tc (default: the tc script beside this python)")
    p.add_argument("--json", default=None, help="results file (default WORK/results.json)")
    a = p.parse_args(argv)
    a.groups = {"tc BatchTopK": str(a.dict_size), "tc TopK": str(a.dict_size), "tc Matryoshka": a.matryoshka_groups,
                "tc Matryoshka + skip": a.matryoshka_groups}
    if sum(int(v) for v in a.matryoshka_groups.split(",")) != a.dict_size:
        p.error(f"--matryoshka-groups must sum to --dict-size {a.dict_size}")
    if a.steps <= 2 * WINDOW:
        p.error(f"--steps must be over {2 * WINDOW} (step times leave out the first {WINDOW})")
    a.json = a.json or str(Path(a.work) / "results.json")
    return a


# ------------------------------------------------------------------------------- setup

def sparsify_probe(python: Path) -> list[str]:
    return [str(python), "-c", "import sys, torch, sparsify; "
            f"sys.exit(sparsify.__version__ != '{SPARSIFY_VERSION}' or not torch.__version__.startswith('2.13.0'))"]


def ensure_sparsify_venv(venv: Path, log: Path) -> Path:
    """The sparsify venv's python, made with the pinned versions when missing or wrong."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run(sparsify_probe(python), capture_output=True).returncode == 0:
        return python
    print(f"making the sparsify environment {venv} (log: {log})...", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)]]
    steps += [[str(python), "-m", "pip", "install", *pin.split()] for pin in SPARSIFY_PINS]
    with open(log, "w") as f:
        for cmd in [*steps, sparsify_probe(python)]:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            except OSError as e:
                code = str(e)
            if code != 0:
                raise BenchError(f"could not make the sparsify environment {venv}: `python {' '.join(cmd[1:])}` "
                                 f"failed ({code}); see {log}")
    return python


def open_store(path: str, what: str):
    """A complete tc store, or a one-line BenchError."""
    from pipeline.store import Store
    from pipeline.util import UserError

    if not Path(path).exists():
        raise BenchError(f"{what} store {path} does not exist")
    try:
        return Store(path).require_complete()
    except UserError as e:
        raise BenchError(f"{what} store: {e}") from None


def check_pair(train, held) -> None:
    """Same model, layer, hooks and width, or the held-out FVU means nothing."""
    for key in ("model", "layer"):
        if train.attrs.get(key) != held.attrs.get(key):
            raise BenchError(f"stores differ in {key}: {train.attrs.get(key)} vs {held.attrs.get(key)}")
    if train.hooks != held.hooks or train.d_model != held.d_model:
        raise BenchError(f"stores differ in hooks or width: {train.hooks} d={train.d_model} vs "
                         f"{held.hooks} d={held.d_model}")


# ------------------------------------------------------------------------------- rows

@dataclass
class Rows:
    ids: np.ndarray      # (n,) store row ids of the usable rows
    source: np.ndarray   # (n, d) float16, raw, as stored
    target: np.ndarray   # (n, d) float16


def usable_rows(store) -> Rows:
    """The store's usable rows (the store decides which: Store.usable)."""
    ids = np.flatnonzero(store.usable())
    rows = store.read_rows(0, store.n_rows)
    return Rows(ids, np.asarray(rows.source)[ids], np.asarray(rows.target)[ids])


def tc_row_order(store, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Store row ids of every training row tc train sees, in order: the project's loader, replayed
    with tc train's seed and batch size (its other settings at their defaults, as tc train uses)."""
    from pipeline.loader import ChunkLoader

    with ChunkLoader(store, batch_size, seed=seed) as loader:
        return np.concatenate([next(loader).rows.numpy() for _ in range(steps)])


def write_exchange(folder: Path, train: Rows, order: np.ndarray, held_source: np.ndarray, norm: dict,
                   lrs: list[float]) -> None:
    """The files sparsify_side.py reads: raw fp16 rows, the order as indices into them, tc's
    normalisation constants, the learning rate of every step."""
    pos = np.searchsorted(train.ids, order)
    if not np.array_equal(train.ids[np.minimum(pos, len(train.ids) - 1)], order):
        raise BenchError("tc's loader handed out a row that Store.usable() calls unusable")
    np.save(folder / "train_source.npy", train.source)
    np.save(folder / "train_target.npy", train.target)
    np.save(folder / "order.npy", pos.astype(np.int64))
    np.save(folder / "lr.npy", np.asarray(lrs, dtype=np.float64))
    np.save(folder / "heldout_source.npy", held_source)
    np.save(folder / "source_mean.npy", norm["source_mean"].numpy())
    np.save(folder / "target_mean.npy", norm["target_mean"].numpy())
    (folder / "norm.json").write_text(json.dumps({k: norm[k] for k in ("source_scale", "target_scale")}))


# ------------------------------------------------------------------------------- training

def tc_window_ms(metrics: Path) -> list[float]:
    """ms per step of each logged window of metrics.jsonl (its tokens / tokens_per_s over its steps)."""
    out, prev_step, prev_tokens = [], 0, 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        seconds = (row["tokens"] - prev_tokens) / row["tokens_per_s"]
        out.append(1000 * seconds / (row["step"] - prev_step))
        prev_step, prev_tokens = row["step"], row["tokens"]
    return out


def step_times(a: argparse.Namespace, windows: list[float]) -> dict[str, float]:
    """Median ms per step over the windows after the first, and split where AuxK can start: no latent
    can be dead before `dead_tokens` training tokens, and from then on AuxK adds its own work."""
    first_dead = a.dead_tokens // a.batch_size + 1
    before, after = windows[1:first_dead // WINDOW], windows[-(-first_dead // WINDOW):]
    med = lambda w: statistics.median(w) if w else None   # noqa: E731
    return {"step_ms": statistics.median(windows[1:]), "step_ms_before_auxk": med(before),
            "step_ms_with_auxk": med(after), "auxk_possible_from_step": first_dead}


def tc_train_command(a: argparse.Namespace, groups: str, out: Path, tool: str = "") -> list[str]:
    return [*tc_command(a), "train", "--cache", a.train_store, "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--warmup-steps", str(a.warmup_steps),
            "--min-lr-ratio", str(a.min_lr_ratio), "--dict-size", str(a.dict_size), "--k", str(a.k),
            "--groups", groups, "--dead-tokens", str(a.dead_tokens), "--seed", str(a.seed), "--device", "cpu",
            "--sample-every", "0",
            "--log-every", str(WINDOW), "--out", str(out), *TC_EXTRA.get(tool, [])]


def run_tc(a: argparse.Namespace, tool: str, r: int, work: Path) -> dict[str, Any]:
    out = fresh(work / "runs" / f"{tool.replace(' ', '_')}_r{r}")
    cmd = tc_train_command(a, a.groups[tool], out, tool)
    m = run_measured(cmd, work / "logs" / f"{out.name}.log", offline_env())
    windows = tc_window_ms(out / "metrics.jsonl")
    return {"command": cmd, "wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "log": m.log,
            "step_ms_windows": windows, **step_times(a, windows),
            "loop_s": sum(windows) * WINDOW / 1000, "weights": str(out / "transcoder.safetensors")}


def sparsify_command(a: argparse.Namespace, python: Path, folder: Path, js: Path) -> list[str]:
    return [str(python), str(HERE / "sparsify_side.py"), "--data", str(folder), "--json", str(js),
            "--num-latents", str(a.dict_size), "--k", str(a.k), "--batch-size", str(a.batch_size),
            "--auxk-alpha", repr(a.sparsify_auxk_alpha), "--dead-tokens", str(a.dead_tokens),
            "--seed", str(a.seed)]


def run_sparsify(a: argparse.Namespace, python: Path, folder: Path, r: int,
                 work: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The run's numbers, and its held-out outputs (prediction, L0 per row, ever-active latents)."""
    js = fresh(work / "runs" / f"sparsify_r{r}.json")
    cmd = sparsify_command(a, python, folder, js)
    m = run_measured(cmd, work / "logs" / f"sparsify_r{r}.log", offline_env())
    inner = json.loads(js.read_text())
    windows = inner.pop("step_ms_windows_of_10")
    outputs = {name: np.load(folder / f"{name}.npy") for name in ("pred", "l0", "ever_active")}
    run = {"command": cmd, "wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "log": m.log,
           "step_ms_windows": windows, **step_times(a, windows), "loop_s": inner["loop_s"], "inner": inner}
    return run, outputs


# ------------------------------------------------------------------------------- evaluation

@dataclass
class Predictions:
    pred: np.ndarray                  # (n, d_out) raw target units, the tool's inference rule
    l0: np.ndarray                    # (n,) active latents per row
    ever_active: np.ndarray           # (L,) bool: active on at least one held-out row
    prefixes: list[np.ndarray] | None = None   # tc only: every Matryoshka prefix's prediction


def tc_predictions(weights: str, source: np.ndarray, batch: int = 4096) -> Predictions:
    """tc's inference rule (BatchTopK's threshold, or TopK): predict for the prediction, encode_rows for
    the active latents, predict_prefixes for every prefix (its last equals predict)."""
    import torch
    from pipeline.transcoder import Transcoder

    model = Transcoder.load(weights)
    preds, l0, prefixes = [], [], []
    ever = torch.zeros(model.d_latent, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(source), batch):
            x16 = source[i:i + batch]
            x = torch.from_numpy(x16).float()
            preds.append(model.predict(x).numpy())
            prefixes.append(model.predict_prefixes(x)[0].numpy())
            on = model.encode_rows(x16) > 0
            l0.append(on.sum(1).numpy())
            ever |= on.any(0)
    stacked = np.concatenate(prefixes, axis=1)   # (G, n, d_out)
    return Predictions(np.concatenate(preds), np.concatenate(l0), ever.numpy(), list(stacked))


def fvu(pred: np.ndarray, y: np.ndarray) -> float:
    """Sum of squared error over the sum of squared deviation of y from its mean (pooled over rows)."""
    y64 = y.astype(np.float64)
    return float(((y64 - pred) ** 2).sum() / ((y64 - y64.mean(0)) ** 2).sum())


def score(p: Predictions, y: np.ndarray) -> dict[str, Any]:
    """The numbers of the table, the same code for every tool."""
    out = {"fvu": fvu(p.pred, y), "dead_fraction": float(1 - p.ever_active.mean()),
           "dead_latents": int((~p.ever_active).sum()), "l0": float(p.l0.mean()), "rows": len(y),
           "latents": len(p.ever_active)}
    if p.prefixes is not None:
        out["fvu_prefix"] = [fvu(q, y) for q in p.prefixes]
        out["predict_vs_last_prefix_max_abs"] = float(np.abs(p.prefixes[-1] - p.pred).max())
    return out


def norm_check(weights: str, norm: dict) -> float:
    """Largest difference between the normalisation constants sparsify got and those in tc's file
    (both come from the store's statistics: float32 rounding of the scales only, unless the store changed)."""
    import torch
    from safetensors.torch import load_file

    t = load_file(weights)
    return max(float((t[k].double() - torch.as_tensor(norm[k], dtype=torch.float64)).abs().max())
               for k in ("source_mean", "source_scale", "target_mean", "target_scale"))


def fvu_module_check(weights: str, x: np.ndarray, y: np.ndarray) -> float | None:
    """fvu.py's independent reading of a tc file (plain tensors, threshold rule): must match score().
    None for a rule without a threshold (TopK)."""
    from safetensors import safe_open

    from fvu import evaluate, load_tc

    with safe_open(weights, "pt") as f:
        if "threshold" not in f.keys():
            return None

    return evaluate(load_tc(weights), x.astype(np.float32), y.astype(np.float32))["threshold"]["fvu"]


# ------------------------------------------------------------------------------- report

TOOLS = ["tc BatchTopK", "tc TopK", "tc Matryoshka", "tc Matryoshka + skip", "sparsify TopK"]
TC_TOOLS = [t for t in TOOLS if t.startswith("tc ")]
TC_EXTRA = {"tc BatchTopK": ["--no-skip"], "tc TopK": ["--no-skip", "--sparsity", "topk"],   # beyond the shared
            "tc Matryoshka": ["--no-skip"], "tc Matryoshka + skip": ["--skip"]}


def table_rows(results: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None, float, float]]:
    """(tool, FVU, dead %, L0, step ms, step ratio to sparsify); step ms are medians over repeats."""
    step = {t: statistics.median(r["step_ms"] for r in results["runs"][t]) for t in TOOLS}
    rows = []
    for t in TOOLS:
        s = results["scores"][t]
        rows.append((t, s["fvu"], 100 * s["dead_fraction"], s["l0"], step[t], step[t] / step["sparsify TopK"]))
    m = results["scores"]["tc Matryoshka"]["fvu_prefix"]
    first = results["config"]["matryoshka_groups"].split(",")[0]
    rows.insert(TOOLS.index("tc Matryoshka") + 1, (f"tc Matryoshka, first group ({first}) alone", m[0], None, None,
                                                 None, None))
    return rows


def phase_rows(results: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(tool, step ms before AuxK can act, step ms with AuxK), medians over repeats."""
    def med(runs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    return [(t, med(results["runs"][t], "step_ms_before_auxk"), med(results["runs"][t], "step_ms_with_auxk"))
            for t in TOOLS]


def print_table(rows: list, held_rows: int) -> None:
    def cell(v, fmt: str, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{fmt}}"

    print(f"\n{'tool':<40} {'FVU held-out':>12} {'dead %':>7} {'L0':>6} {'step ms':>8} {'step / sparsify':>15}")
    for name, fv, dead, l0, ms, ratio in rows:
        print(f"{name:<40} {cell(fv, '.4f', 12)} {cell(dead, '.1f', 7)} {cell(l0, '.1f', 6)} {cell(ms, '.0f', 8)} "
              f"{cell(ratio, '.2f', 14)}{'x' if ratio is not None else ' '}")
    print(f"\nFVU, dead % (never active), L0: {held_rows:,} usable held-out rows, each tool's own inference rule "
          "(tc: the BatchTopK threshold, or per-token TopK; sparsify: per-token TopK).\nstep ms: ms per optimiser step, median of "
          f"{WINDOW}-step windows after the first {WINDOW} steps (tc: metrics.jsonl; sparsify: its loop, batch "
          "gathering included); CPU shared with other work, so noisy.")


def print_phases(rows: list, from_step: int) -> None:
    print(f"\nstep ms by phase (no latent can be dead before step {from_step}, so AuxK adds nothing before it):")
    print(f"{'tool':<40} {'before AuxK':>12} {'with AuxK':>10}")
    for name, before, after in rows:
        fmt = lambda v: f"{'-':>10}" if v is None else f"{v:>10.0f}"   # noqa: E731
        print(f"{name:<40} {fmt(before):>12} {fmt(after)}")


DEFINITIONS = {
    "fvu": "sum over held-out usable rows and dims of (y - pred)^2 / sum of (y - mean_rows(y))^2, raw target units",
    "dead_fraction": "latents with no active value (> 0) on any held-out usable row, under the tool's inference rule",
    "l0": "mean over held-out usable rows of the number of active (> 0) latents, inference rule",
    "step_ms": f"ms per optimiser step: median of {WINDOW}-step window means, leaving out the first window; tc from "
               "metrics.jsonl (tokens / tokens_per_s per window: its loop incl. waiting for the loader), sparsify "
               "from sparsify_side.py's perf_counter around each whole iteration (batch gather + normalise + "
               "forward + backward + Adam). sparsify's per-step median after the first 10 is in runs[...].inner",
    "fvu_prefix": "tc only: FVU of each Matryoshka prefix (latents < m_i plus b_dec), Transcoder.predict_prefixes",
    "row_order": "all tools: the row ids tc's ChunkLoader yields for tc train's seed and batch size",
}


# ------------------------------------------------------------------------------- main

def prepare(a: argparse.Namespace, folder: Path) -> tuple[dict[str, Any], dict, np.ndarray, np.ndarray]:
    """Stores opened and checked, sparsify's files written; returns (facts, normalisation constants,
    held-out source, held-out target)."""
    from pipeline.train import lr_at
    from pipeline.transcoder import norm_constants

    train_store, held_store = open_store(a.train_store, "training"), open_store(a.heldout_store, "held-out")
    check_pair(train_store, held_store)
    print("reading rows and replaying tc's row order...", flush=True)
    train, held = usable_rows(train_store), usable_rows(held_store)
    order = tc_row_order(train_store, a.batch_size, a.steps, a.seed)
    norm = norm_constants(train_store.stats())
    lrs = [lr_at(s, a.steps, a.lr, a.warmup_steps, a.min_lr_ratio) for s in range(a.steps)]
    write_exchange(folder, train, order, held.source, norm, lrs)
    facts = {"train_rows": len(train.ids), "train_store_rows": train_store.n_rows,
             "heldout_rows": len(held.ids), "heldout_store_rows": held_store.n_rows,
             "training_rows_seen": len(order), "distinct_training_rows_seen": int(len(np.unique(order))),
             "hooks": train_store.hooks, "d_model": train_store.d_model,
             "source_scale": norm["source_scale"], "target_scale": norm["target_scale"]}
    return facts, norm, held.source, held.target


def run_all(a: argparse.Namespace, results: dict[str, Any], save) -> None:
    work = Path(a.work)
    python = ensure_sparsify_venv(Path(a.venv), work / "logs" / "venv-sparsify.log")
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="rows-") as tmp:
        folder = Path(tmp)
        results["rows"], norm, held_x, held_y = prepare(a, folder)
        results["runs"] = {t: [] for t in TOOLS}
        for r in range(a.repeats):   # one at a time, alternating, so drifting load hits every tool alike
            for tool in TOOLS:
                print(f"repeat {r + 1}/{a.repeats}: {tool}...", flush=True)
                if tool.startswith("sparsify"):
                    run, outputs = run_sparsify(a, python, folder, r, work)
                    if r == 0:   # held-out numbers come from the first repeat
                        sparsify_out = outputs
                else:
                    run = run_tc(a, tool, r, work)
                results["runs"][tool].append(run)
                save()
    print("scoring on the held-out rows...", flush=True)
    preds = {t: tc_predictions(results["runs"][t][0]["weights"], held_x) for t in TC_TOOLS}
    preds["sparsify TopK"] = Predictions(sparsify_out["pred"], sparsify_out["l0"], sparsify_out["ever_active"])
    results["scores"] = {t: score(p, held_y) for t, p in preds.items()}
    for t in TC_TOOLS:
        weights = results["runs"][t][0]["weights"]
        results["scores"][t]["fvu_py_check"] = fvu_module_check(weights, held_x, held_y)
        results["scores"][t]["norm_vs_sparsify_max_abs"] = norm_check(weights, norm)
    save()


def main(argv: list[str] | None = None) -> int:
    from pipeline.util import versions, write_json_atomic

    a = parse_args(argv)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(a).items()}, "machine": machine(),
                               "driver_command": [sys.executable, *sys.argv], "definitions": DEFINITIONS}
    start = time.perf_counter()

    def save() -> None:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(a.json, results)

    try:
        run_all(a, results, save)
    except BenchError as e:
        save()
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["sparsify_pins"] = SPARSIFY_PINS
    results["versions"] = {"tc": versions(), "sparsify": results["runs"]["sparsify TopK"][0]["inner"]["versions"]}
    rows = table_rows(results)
    results["table"] = [dict(zip(("tool", "fvu", "dead_pct", "l0", "step_ms", "step_ratio_to_sparsify"), r))
                        for r in rows]
    results["total_s"] = time.perf_counter() - start
    save()
    print_table(rows, results["rows"]["heldout_rows"])
    phases = phase_rows(results)
    results["step_phases"] = [dict(zip(("tool", "step_ms_before_auxk", "step_ms_with_auxk"), r)) for r in phases]
    save()
    print_phases(phases, results["runs"]["tc BatchTopK"][0]["auxk_possible_from_step"])
    print(f"\nraw results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

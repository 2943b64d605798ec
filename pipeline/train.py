"""`tc train`: train a Matryoshka BatchTopK transcoder from a store (run folder layout in docs/transcoder.md).

RUN/
  config.json              resolved TrainConfig (flat) + store identity, total_steps, versions
  metrics.jsonl            one JSON object per logged step (step, loss, fvu, fvu_levels, l0, ...)
  checkpoints/step_XXXXXX/ transcoder.safetensors, config.json, state.pt (everything to resume)
  checkpoints/latest       name of the newest complete checkpoint (replaced atomically)
  transcoder.safetensors   the final transcoder (documented layout)
  plots/*.png              curves of the logged metrics
  summary.json             final metrics; written last, so its presence marks a finished run
  activation_samples/      feature samples, written by the samples collector (pipeline/samples.py)

Resume (`--resume RUN`) continues from checkpoints/latest; on CPU the result is bit-identical to an
uninterrupted run. Options left at their default take the run's saved value; an option given with a
different value than the run's is refused, except the ones in RESUME_FREE (they do not change the
weights). Changing --steps/--tokens is refused too: the schedule depends on the total.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from pipeline.loader import ChunkLoader
from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, Store
from pipeline.transcoder import Transcoder, TranscoderOutput, norm_constants
from pipeline.util import (UserError, fault_point, opt, parse_count, parse_int_list, pick_device, to_jsonable,
                           versions, write_config_toml, write_file_atomic, write_json_atomic)

KILL_ENV = "TC_TRAIN_KILL_AT_STEP"   # testing hook: SIGKILL this process right after that step
RESUME_FREE = {"resume", "out", "cache", "device", "log_every", "checkpoint_every", "keep_checkpoints",
               "wandb_project"}
CHECKPOINTS = "checkpoints"


def _opt_count(text: str | int | None) -> int | None:
    return None if text in (None, "", "none", "None") else parse_count(text)


def _count_option(option: str):
    """A parser for an optional count option whose errors name the option."""
    def parse(text: str | int | None) -> int | None:
        try:
            return _opt_count(text)
        except UserError as e:
            raise UserError(f"{option}: {e}") from None
    return parse


def _opt_list(text: str | list | None) -> list[int] | None:
    return None if text in (None, "", "none", "None") else parse_int_list(text)


@dataclass
class TrainConfig:
    # Data
    cache: str | None = opt(None, "Activation store written by `tc cache` (required unless --resume).", "Data")
    batch_size: int = opt(1024, "Rows (tokens) per optimiser step.", "Data")
    steps: int | None = opt(None, "Optimiser steps (default: one pass over the store's usable rows).", "Data",
                            parse=_count_option("--steps"))
    tokens: int | None = opt(None, "Train on this many tokens instead of giving --steps (e.g. 5M).", "Data",
                             parse=_count_option("--tokens"))
    include_bos: bool = opt(False, "Train on BOS rows too (skipped by default: their norms dwarf the rest).", "Data")
    seed: int = opt(0, "Seed of the initialisation and of the shuffled chunk order.", "Data")
    # Dictionary
    dict_size: int = opt(18432, "Number of latents (the dictionary size).", "Dictionary")
    groups: list[int] | None = opt(None, "Matryoshka group sizes, summing to --dict-size, e.g. 2304,4608,9216,2304 "
                                   "(default: 1/8, 1/4, 1/2, 1/8 of it; one size = plain BatchTopK).",
                                   "Dictionary", parse=_opt_list)
    k: int = opt(48, "Active latents per token, on average over the batch (BatchTopK).", "Dictionary")
    dead_tokens: int = opt(100_000, "A latent that has not fired for this many training tokens is dead.",
                           "Dictionary", parse=_count_option("--dead-tokens"))
    aux_k: int = opt(512, "Dead latents per token used by the AuxK loss (0 turns it off).", "Dictionary")
    aux_coef: float = opt(1 / 32, "Weight of the AuxK loss.", "Dictionary")
    # Optimiser
    lr: float = opt(3e-4, "Peak learning rate (Adam).", "Optimiser")
    warmup_steps: int = opt(200, "Linear warmup from 0 to --lr over this many steps.", "Optimiser")
    min_lr_ratio: float = opt(0.01, "Cosine decay ends at lr x this at the last step.", "Optimiser")
    # Logging & checkpoints
    out: str | None = opt(None, "Run folder (default: checkpoints/transcoder/<model>/<model>_<hooks>_<dict>_"
                          "<arch>_<k>_<lr>_<time>).", "Logging & checkpoints")
    resume: str | None = opt(None, "Continue the run in this folder from its latest checkpoint.",
                             "Logging & checkpoints")
    log_every: int = opt(100, "Log metrics every this many steps.", "Logging & checkpoints")
    checkpoint_every: int = opt(500, "Write a resumable checkpoint every this many steps.", "Logging & checkpoints")
    keep_checkpoints: int = opt(3, "Keep the newest N checkpoints (0 keeps all).", "Logging & checkpoints")
    wandb_project: str | None = opt(None, "Also log to this Weights & Biases project (WANDB_MODE=offline works).",
                                    "Logging & checkpoints")
    device: str = opt("auto", "auto, cpu or cuda.", "Logging & checkpoints")
    # Samples
    sample_every: int = opt(100, "Collect feature samples from the training batch every N steps (0 = off).", "Samples")
    max_samples_per_feature: int = opt(100, "Samples kept per feature (the strongest).", "Samples")
    sample_threshold: float = opt(0.1, "Only activations above this are kept as samples.", "Samples")
    sample_context: int = opt(20, "Tokens of context per sample, ending at the activating token.", "Samples")
    top_features: int = opt(100, "Features written to activation_samples/ at the end.", "Samples")
    samples_per_feature: int = opt(10, "Samples written per feature at the end.", "Samples")


class Collector(Protocol):
    """What the trainer needs from a feature-sample collector (pipeline/samples.py implements it)."""

    def observe(self, step: int, out: TranscoderOutput, row_ids: torch.Tensor) -> None:
        """Called every `sample_every` steps with that step's forward output (BatchTopK active
        pairs: out.rows, out.cols, out.vals) and the batch's store rows (B,) int64 on the device."""

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / numbers only (loaded with torch.load(weights_only=True))."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, run_dir: Path, store: Store, cfg: TrainConfig) -> Any: ...


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimiser step `step` (0-based) of `total_steps`: linear from 0 at step 0
    to lr at step `warmup_steps`, then cosine to exactly lr * min_lr_ratio at the last step.
    A run not longer than the warmup warms up over its first half instead."""
    min_lr = lr * min_lr_ratio
    last = total_steps - 1
    if last <= 0:
        return lr
    warm = warmup_steps if warmup_steps < last else last // 2
    if step < warm:
        return lr * step / warm
    progress = min(1.0, (step - warm) / (last - warm))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- config checks

def default_groups(dict_size: int) -> list[int]:
    """The reference proportions 1/8, 1/4, 1/2, 1/8 (2304, 4608, 9216, 2304 for 18432)."""
    g = [dict_size // 8, dict_size // 4, dict_size // 2]
    return g + [dict_size - sum(g)]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill derived defaults (groups); parse text values a caller may pass."""
    cfg = dataclasses.replace(cfg)
    cfg.groups = _opt_list(cfg.groups)
    cfg.steps = _opt_count(cfg.steps)
    cfg.tokens = _opt_count(cfg.tokens)
    cfg.dead_tokens = parse_count(cfg.dead_tokens)
    if cfg.groups is None and cfg.dict_size >= 8:
        cfg.groups = default_groups(cfg.dict_size)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every check that needs no disk: one UserError naming the option."""
    positive = ["batch_size", "dict_size", "k", "dead_tokens", "log_every", "checkpoint_every",
                "max_samples_per_feature", "sample_context", "top_features", "samples_per_feature"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("aux_k", "warmup_steps", "keep_checkpoints", "sample_every", "seed"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must be between 0 and 1, got {cfg.min_lr_ratio}")
    if cfg.aux_coef < 0:
        raise UserError(f"--aux-coef must be 0 or more, got {cfg.aux_coef}")
    for name in ("steps", "tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.tokens is not None:
        raise UserError("give --steps or --tokens, not both")
    if cfg.groups is None:
        raise UserError(f"--dict-size {cfg.dict_size} is too small for the default groups: pass --groups")
    if any(g <= 0 for g in cfg.groups):
        raise UserError(f"--groups sizes must be positive, got {','.join(map(str, cfg.groups))}")
    if sum(cfg.groups) != cfg.dict_size:
        raise UserError(f"--groups {','.join(map(str, cfg.groups))} sum to {sum(cfg.groups)}, not --dict-size "
                        f"{cfg.dict_size}: give group sizes that add up to the dictionary")
    if cfg.k > cfg.dict_size:
        raise UserError(f"--k {cfg.k} is larger than --dict-size {cfg.dict_size}: pick k <= dict size")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb-project needs the wandb package: pip install wandb")
    if cfg.resume is None and not cfg.cache:
        raise UserError("no store given: pass --cache STORE (made by `tc cache`), or --resume RUN")


def store_identity(store: Store) -> dict[str, Any]:
    a = store.attrs
    stats = a.get("stats", {})
    return {"path": str(Path(store.path).resolve()), "model": a.get("model"), "layer": a.get("layer"),
            "hooks": a.get("hooks"), "d_model": store.d_model, "seq_len": store.seq_len, "n_rows": store.n_rows,
            "chunk_rows": store.chunk_rows, "stat_rows": stats.get("source", {}).get("count"),
            # fingerprints of the content: two stores of the same shape differ here
            "source_mean_norm": stats.get("source", {}).get("mean_norm"),
            "target_mean_norm": stats.get("target", {}).get("mean_norm")}


def open_store(path: str) -> Store:
    if not Path(path).exists():
        raise UserError(f"store {path} does not exist: make it with `tc cache --out {path}`")
    return Store(path).require_complete()


def architecture(groups: list[int]) -> str:
    return "matryoshka-transcoder" if len(groups) > 1 else "batchtopk-transcoder"


def auto_run_dir(cfg: TrainConfig, store: Store) -> Path:
    model = str(store.attrs.get("model", "model")).rstrip("/").split("/")[-1]
    hooks = store.hooks
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (f"{model}_{hooks['source']}_to_{hooks['target']}_{cfg.dict_size}_{architecture(cfg.groups)}"
            f"_{cfg.k}_{cfg.lr:g}_{stamp}")
    base = Path("checkpoints") / "transcoder" / model
    path, n = base / name, 1
    while path.exists():
        n += 1
        path = base / f"{name}-{n}"
    return path


def merge_resume(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The run's saved config, with the options the user changed: RESUME_FREE ones are taken,
    others must equal the saved value (an option left at its default takes the saved value)."""
    defaults = TrainConfig()
    merged = {}
    changed = []
    for f in dataclasses.fields(TrainConfig):
        mine, theirs, default = getattr(cfg, f.name), saved.get(f.name), getattr(defaults, f.name)
        if f.name in RESUME_FREE:
            merged[f.name] = mine if mine != default else theirs
        elif mine != default and mine != theirs:
            changed.append(f"--{f.name.replace('_', '-')} {mine} (run: {theirs})")
            merged[f.name] = theirs
        else:
            merged[f.name] = theirs if f.name in saved else mine
    if changed:
        raise UserError(f"cannot resume {run_dir} with a different configuration: {'; '.join(changed)}; "
                        "drop those options or start a new run")
    merged["resume"] = str(run_dir)
    merged["out"] = str(run_dir)
    return resolve(TrainConfig(**merged))


def check_store_matches(store: Store, saved_store: dict[str, Any], run_dir: Path) -> None:
    mine = store_identity(store)
    if mine["d_model"] != saved_store.get("d_model"):
        raise UserError(f"store {store.path} has d_model {mine['d_model']} but run {run_dir} was trained with "
                        f"d_model {saved_store.get('d_model')}: resume with the run's store")
    keys = [k for k in mine if k != "path" and mine[k] != saved_store.get(k)]
    if keys:
        raise UserError(f"store {store.path} is not the store run {run_dir} was trained on (differs in "
                        f"{', '.join(keys)}): resume with --cache {saved_store.get('path')}")


# ----------------------------------------------------------------------------- checkpoints

def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / "latest"
    if not pointer.exists():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(run_dir: Path, step: int, model: Transcoder, state: dict[str, Any],
                     config: dict[str, Any], keep: int) -> Path:
    """checkpoints/step_XXXXXX written in a temp folder, renamed into place, then `latest` replaced:
    a kill at any moment leaves `latest` naming a complete checkpoint."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp_{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "transcoder.safetensors")
    write_json_atomic(tmp / "config.json", config)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():   # left by a run killed after the rename; same step, same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_file_atomic(root / "latest", name)
    _fsync_dir(root)
    prune_checkpoints(root, keep, name)
    return final


def prune_checkpoints(root: Path, keep: int, latest: str) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": [kind, int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Window sums of the step metrics (on the device: no sync per step) and the metrics.jsonl file."""

    def __init__(self, path: Path, n_groups: int, device: torch.device):
        self.path = path
        self.sums = torch.zeros(4 + n_groups, dtype=torch.float64, device=device)  # loss, fvu, l0, aux, levels
        self.count = 0
        self.window_start = time.perf_counter()
        self.window_tokens = 0

    def add(self, out: TranscoderOutput, batch_size: int) -> None:
        with torch.no_grad():
            vals = torch.cat([torch.stack([out.loss.detach(), out.fvu, out.l0.to(out.fvu.device),
                                           out.aux_loss.detach()]), out.fvu_levels])
            self.sums += vals.double()
        self.count += 1
        self.window_tokens += batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "count": self.count}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.sums.copy_(d["sums"])
        self.count = int(d["count"])

    def flush(self, step: int, batch_size: int, lr: float, model: Transcoder) -> dict[str, Any]:
        m = (self.sums / max(self.count, 1)).tolist()
        seconds = time.perf_counter() - self.window_start
        dead = int(model.dead_mask().sum())
        row = {"step": step, "tokens": step * batch_size, "loss": m[0], "fvu": m[1], "fvu_levels": m[4:],
               "l0": m[2], "aux_loss": m[3], "dead_features": dead, "dead_fraction": dead / model.d_latent,
               "lr": lr, "threshold": float(model.threshold),
               "tokens_per_s": self.window_tokens / seconds if seconds > 0 else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.sums.zero_()
        self.count = 0
        self.window_start = time.perf_counter()
        self.window_tokens = 0
        return row


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines up to `step` (and drop a line cut short by a kill): no duplicates on resume."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", math.inf) <= step:
            keep.append(line)
    write_file_atomic(path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plots(run_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """PNG curves of the logged metrics in RUN/plots/."""
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    steps = [r["step"] for r in rows]
    written = []
    for key, log_y in (("loss", True), ("fvu", True), ("l0", False), ("dead_features", False), ("lr", False)):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r[key] for r in rows], label=key if key != "fvu" else "full")
        if key == "fvu":
            for i in range(len(rows[0].get("fvu_levels", []))):
                ax.plot(steps, [r["fvu_levels"][i] for r in rows], label=f"prefix {i + 1}", alpha=0.7)
            ax.legend()
        if log_y and all(r[key] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} ({run_dir.name[:60]})", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class WandbLogger:
    def __init__(self, cfg: TrainConfig, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb-project needs the wandb package: pip install wandb") from None
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=to_jsonable(cfg))

    def log(self, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if k != "fvu_levels" and v is not None}
        flat.update({f"fvu_level_{i + 1}": v for i, v in enumerate(row["fvu_levels"])})
        self.run.log(flat, step=row["step"])

    def finish(self) -> None:
        self.run.finish()


def make_sample_collector(cfg: TrainConfig, d_latent: int, device: torch.device, store: Store) -> Collector | None:
    """The samples helper's collector, when pipeline/samples.py provides one and sampling is on."""
    if cfg.sample_every <= 0:
        return None
    try:
        from pipeline.samples import make_collector
    except ImportError as e:
        if e.name in ("pipeline.samples",) or "make_collector" in str(e):
            return None
        raise
    return make_collector(cfg, d_latent, device, store=store)


# ----------------------------------------------------------------------------- the run

@dataclass
class Setup:
    cfg: TrainConfig
    run_dir: Path
    store: Store
    config: dict[str, Any]      # what config.json holds
    checkpoint: Path | None     # resume from here


def prepare(cfg: TrainConfig) -> Setup:
    """All checks before anything is written; returns the resolved plan."""
    checkpoint = None
    if cfg.resume is None:
        cfg = resolve(cfg)
        validate(cfg)
    else:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume {run_dir}: not a tc train run folder (no config.json)")
        if cfg.out and Path(cfg.out).resolve() != run_dir.resolve():
            raise UserError(f"--out {cfg.out} and --resume {run_dir} name different folders: drop --out")
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--resume {run_dir}: its config.json is not valid JSON ({e})") from None
        cfg = merge_resume(cfg, saved, run_dir)
        validate(cfg)
        store = open_store(cfg.cache)
        check_store_matches(store, saved.get("store", {}), run_dir)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            with safe_metadata(checkpoint / "transcoder.safetensors") as meta:
                if int(meta["d_in"]) != store.d_model:
                    raise UserError(f"store {store.path} has d_model {store.d_model} but the checkpoint "
                                    f"{checkpoint} has d_in {meta['d_in']}: resume with the run's store")
        return Setup(cfg, run_dir, store, saved, checkpoint)
    store = open_store(cfg.cache)
    run_dir = Path(cfg.out) if cfg.out else auto_run_dir(cfg, store)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"--out {run_dir} exists and is not empty: pick a new folder, or --resume {run_dir}")
    cfg.out = str(run_dir)
    cfg.cache = str(Path(cfg.cache).resolve())
    total = total_steps(cfg, store)
    config = {**to_jsonable(cfg), "total_steps": total, "architecture": architecture(cfg.groups),
              "store": store_identity(store), "versions": versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Setup(cfg, run_dir, store, config, None)


class safe_metadata:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> dict[str, str]:
        from safetensors import safe_open
        self.f = safe_open(str(self.path), "pt")
        return self.f.metadata() or {}

    def __exit__(self, *exc) -> None:
        del self.f


def skip_flags(cfg: TrainConfig) -> int:
    return FLAG_OVERFLOW if cfg.include_bos else FLAG_BOS | FLAG_OVERFLOW


def usable_rows(store: Store, cfg: TrainConfig) -> int:
    return int(((store.flags & skip_flags(cfg)) == 0).sum())


def total_steps(cfg: TrainConfig, store: Store) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.tokens is not None:
        return -(-cfg.tokens // cfg.batch_size)
    usable = usable_rows(store, cfg)
    if usable == 0:
        raise UserError(f"{store.path} has no usable rows (all flagged): cache more text")
    return max(1, usable // cfg.batch_size)


def build_model(cfg: TrainConfig, store: Store, device: torch.device) -> Transcoder:
    d = store.d_model
    meta = {"model": store.attrs.get("model"), "layer": store.attrs.get("layer"), "hooks": store.hooks,
            "store": str(Path(store.path).resolve())}
    model = Transcoder(d, d, cfg.groups, cfg.k, aux_k=cfg.aux_k, aux_coef=cfg.aux_coef,
                       dead_tokens=cfg.dead_tokens, meta=meta, seed=cfg.seed)
    n = norm_constants(store.stats())
    model.set_normalization(n["source_mean"], n["source_scale"], n["target_mean"], n["target_scale"])
    return model.to(device)


def make_optimizer(model: Transcoder, lr: float, device: torch.device) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)   # one kernel per step, CPU or GPU
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model: Transcoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float) -> TranscoderOutput:
    """One optimiser step on a normalised batch; decoder rows stay unit norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    model.project_decoder_grad()
    optimizer.step()
    model.normalize_decoder()
    return out


def run_train(cfg: TrainConfig) -> Path:
    """Train (or resume) a transcoder; returns the run folder."""
    setup = prepare(cfg)
    cfg, run_dir, store = setup.cfg, setup.run_dir, setup.store
    if cfg.resume is not None and (run_dir / "summary.json").exists():
        print(f"run {run_dir} has finished already: nothing to do")
        return run_dir
    device = torch.device(pick_device(cfg.device))
    total = int(setup.config["total_steps"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume is None:
        write_json_atomic(run_dir / "config.json", setup.config)   # from here on the folder is a run
        fault_point("train_config_written")
    if not (run_dir / "tc-train.toml").exists():   # a run killed between the two writes gets it on resume
        write_config_toml(run_dir / "tc-train.toml", dataclasses.replace(cfg, resume=None))
    verb = "resuming" if setup.checkpoint is not None else "training"
    print(f"{verb} {run_dir} ({total:,} steps of {cfg.batch_size:,} tokens); "
          f"if interrupted: tc train --resume {run_dir}", flush=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(cfg, store, device)
    optimizer = make_optimizer(model, cfg.lr, device)
    metrics = Metrics(run_dir / "metrics.jsonl", len(cfg.groups), device)
    collector = make_sample_collector(cfg, model.d_latent, device, store)
    step, position = 0, 0
    if setup.checkpoint is not None:
        step, position = load_checkpoint(setup.checkpoint, model, optimizer, metrics, collector, device)
    truncate_metrics(metrics.path, step)

    wandb = WandbLogger(cfg, run_dir) if cfg.wandb_project else None
    loader = ChunkLoader(store, cfg.batch_size, seed=cfg.seed, position=position, norm=norm_constants(store.stats()),
                         device=device, skip_flags=skip_flags(cfg))
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    bar = tqdm(total=total, initial=step, unit="step", desc="train", dynamic_ncols=True)
    try:
        model.train()
        while step < total:
            lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            batch = next(loader)
            out = train_step(model, optimizer, batch.x, batch.y, lr)
            step += 1
            metrics.add(out, cfg.batch_size)
            if collector is not None and step % cfg.sample_every == 0:
                collector.observe(step, out, batch.rows)
            if step % cfg.log_every == 0 or step == total:
                row = metrics.flush(step, cfg.batch_size, lr, model)
                bar.set_postfix(loss=f"{row['loss']:.4g}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=row["dead_features"])
                if wandb:
                    wandb.log(row)
            if step % cfg.checkpoint_every == 0 or step == total:
                state = {"step": step, "loader_position": loader.position, "optimizer": optimizer.state_dict(),
                         "tokens_since_fired": model.tokens_since_fired.cpu(),
                         "threshold_updates": model.threshold_updates.cpu(), "metrics": metrics.state_dict(),
                         "rng": rng_state(), "collector": collector.state_dict() if collector else None,
                         "total_steps": total}
                write_checkpoint(run_dir, step, model, state, setup.config, cfg.keep_checkpoints)
            bar.update(1)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        loader.close()
    finish(run_dir, model, cfg, store, collector, metrics)
    if wandb:
        wandb.finish()
    return run_dir


def load_checkpoint(path: Path, model: Transcoder, optimizer: torch.optim.Optimizer, metrics: Metrics,
                    collector: Collector | None, device: torch.device) -> tuple[int, int]:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "transcoder.safetensors"))
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(model, name).copy_(value)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    model.tokens_since_fired.copy_(state["tokens_since_fired"])
    model.threshold_updates.copy_(state["threshold_updates"])
    optimizer.load_state_dict(state["optimizer"])
    metrics.load_state_dict(state["metrics"])
    set_rng_state(state["rng"])
    if collector is not None and state.get("collector") is not None:
        collector.load_state_dict(state["collector"])
    return int(state["step"]), int(state["loader_position"])


def finish(run_dir: Path, model: Transcoder, cfg: TrainConfig, store: Store, collector: Collector | None,
           metrics: Metrics) -> None:
    """Final transcoder, plots, samples; summary.json last (marks the run finished)."""
    model.save(run_dir / "transcoder.safetensors")
    rows = read_metrics(metrics.path)
    write_plots(run_dir, rows)
    if collector is not None:
        collector.finish(run_dir, store, cfg)
    last = rows[-1] if rows else {}
    write_json_atomic(run_dir / "summary.json", {
        "steps": last.get("step"), "tokens": last.get("tokens"), "fvu": last.get("fvu"),
        "fvu_levels": last.get("fvu_levels"), "l0": last.get("l0"), "dead_features": last.get("dead_features"),
        "dead_fraction": last.get("dead_fraction"), "threshold": float(model.threshold),
        "transcoder": "transcoder.safetensors", "versions": versions()})


# ----------------------------------------------------------------------------- reading a run folder
# (for the stages after training: samples, export, eval)

def require_run(run: str | Path | None) -> Path:
    if run is None or not str(run).strip():
        raise UserError("no run folder given: pass --run RUN (the folder `tc train` wrote)")
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist: pass the folder `tc train` wrote (--run RUN)")
    if not (run / "config.json").exists():
        raise UserError(f"{run} is not a tc run folder (no config.json): pass the folder `tc train` wrote")
    return run


def run_config(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{run}/config.json is not valid JSON ({e})") from None


def open_run_store(run: Path, cache: str | None = None) -> Store:
    """The store a run was trained on (recorded as `cache` in its config.json), or `cache`."""
    path = cache or run_config(run).get("cache")
    if not path:
        raise UserError(f"{run}/config.json records no store: pass --cache STORE")
    if not Path(path).exists():
        raise UserError(f"the store {path} of run {run} is not there: pass --cache STORE")
    return Store(path).require_complete()


def load_transcoder(run: Path, device: str | torch.device = "cpu") -> Transcoder:
    path = run / "transcoder.safetensors"
    if not path.exists():
        raise UserError(f"{run} has no final transcoder ({path.name}): finish training first "
                        f"(`tc train --resume {run}`)")
    return Transcoder.load(path).to(device).eval()

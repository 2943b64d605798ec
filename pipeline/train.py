"""`tc train`: train a Matryoshka BatchTopK transcoder from a store, into a run folder.

The folder's layout and every question about it belong to pipeline/run.py; checkpoints to
pipeline/checkpoints.py; metrics, plots and W&B to pipeline/metrics.py; the feature-sample
collector is handed in (pipeline/collector.py makes the default one). This module holds the
config, its checks, the schedule and the loop.

Resume (`--resume RUN`) continues from the latest checkpoint; on CPU the result is bit-identical to an
uninterrupted run. An option the user gave (on the command line or in a --config file, default
value or not) must equal the run's saved value, except the ones in RESUME_FREE (they do not change
the weights); options not given take the run's values. Changing --steps/--tokens is refused too:
the schedule depends on the total.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from pipeline.checkpoints import (checkpoint_meta, newest_intact, read_checkpoint, rng_state, set_rng_state,
                                  write_checkpoint)
from pipeline.collector import SampleSettings, make_collector
from pipeline import dist
from pipeline.config import checked
from pipeline.ddp import Sync
from pipeline.loader import ChunkLoader, SetLoader
from pipeline.metrics import Metrics, WandbLogger, read_metrics, truncate_metrics, write_plots
from pipeline.run import RUN_LOCK, TRANSCODER, Run, RunSet, is_set
from pipeline.sparsity import RULES
from pipeline.storage import Location, is_remote, resolved
from pipeline.store import Store
from pipeline.transcoder import ENCODER_INIT_SCALE, Transcoder, TranscoderOutput, norm_constants
from pipeline.util import (FolderLock, UserError, check_free_space, fault_point, file_checksum, format_layers,
                           layer_spec, opt, parse_count, parse_int_list, parse_layers, pick_device, resume_hint,
                           short_count, to_jsonable, versions, write_config_toml, write_json_atomic)

KILL_ENV = "TC_TRAIN_KILL_AT_STEP"   # testing hook: SIGKILL this process right after that step
RESUME_FREE = {"resume", "out", "cache", "device", "log_every", "checkpoint_every", "checkpoint_minutes",
               "keep_checkpoints", "wandb_project"}
# What a run saved before an option existed did, so that resuming it goes on doing that
BEFORE_OPTION = {"include_outliers": True, "encoder_init": 0.1, "skip": False, "sparsity": "batchtopk"}


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
    cache: str | None = opt(None, "Activation store written by `tc cache`: a path or an s3:// or gs:// URL (required unless --resume).", "Data")
    layer: int | None = opt(None, "The layer to train, in a store of several layers (`tc cache --layers`).", "Data")
    layers: str | None = opt(None, "Train a SET, one transcoder per layer of a store of several, from one pass "
                             "over it: all, 6,8 or 0-3 (--out gets a run folder per layer; docs/transcoder.md).",
                             "Data", parse=layer_spec)
    batch_size: int = opt(1024, "Rows (tokens) per optimiser step (under torchrun: of the whole job, each rank "
                          "training on an equal slice; docs/distributed.md).", "Data")
    steps: int | None = opt(None, "Optimiser steps (default: one pass over the store's usable rows).", "Data",
                            parse=_count_option("--steps"))
    tokens: int | None = opt(None, "Train on this many tokens instead of giving --steps (e.g. 5M).", "Data",
                             parse=_count_option("--tokens"))
    include_bos: bool = opt(False, "Train on BOS rows too (skipped by default: their norms dwarf the rest).", "Data")
    include_outliers: bool = opt(False, "Train on outlier rows too (source norm far above their chunk's median; "
                                 "skipped by default, see docs/store.md).", "Data")
    seed: int = opt(0, "Seed of the initialisation and of the shuffled chunk order.", "Data")
    # Dictionary
    dict_size: int = opt(18432, "Number of latents (the dictionary size).", "Dictionary")
    groups: list[int] | None = opt(None, "Matryoshka group sizes, summing to --dict-size, e.g. 2304,4608,9216,2304 "
                                   "(default: 1/8, 1/4, 1/2, 1/8 of it; one size = plain BatchTopK).",
                                   "Dictionary", parse=_opt_list)
    k: int = opt(48, "Active latents per token, on average over the batch (BatchTopK).", "Dictionary")
    sparsity: str = opt("batchtopk", "Sparsity rule: batchtopk (k per token on average over the batch, a "
                        "learnt threshold at inference) or topk (exactly k per token, in training and at "
                        "inference; docs/benchmarks.md).", "Dictionary")
    dead_tokens: int = opt(100_000, "A latent that has not fired for this many training tokens is dead.",
                           "Dictionary", parse=_count_option("--dead-tokens"))
    aux_k: int = opt(512, "Dead latents per token used by the AuxK loss (0 turns it off).", "Dictionary")
    aux_coef: float = opt(1 / 32, "Weight of the AuxK loss.", "Dictionary")
    encoder_init: float = opt(ENCODER_INIT_SCALE, "Initial norm of the encoder rows (decoder rows are unit): "
                              "smaller starts faster but leaves more latents dead, larger keeps them alive "
                              "(docs/benchmarks.md).", "Dictionary")
    skip: bool = opt(True, "A linear skip path (W_skip, d_out x d_in, zero at init) in every prefix's "
                     "prediction: a skip transcoder (measured better FVU and fewer dead latents, "
                     "docs/benchmarks.md); --no-skip for a plain one.", "Dictionary")
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
    checkpoint_minutes: float = opt(5.0, "Also write one when this many minutes have passed since the last, so an "
                                    "interrupt loses little on a slow machine (0: by steps only).",
                                    "Logging & checkpoints")
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

    def sample_settings(self) -> SampleSettings:
        return SampleSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SampleSettings)})


class Collector(Protocol):
    """What the trainer needs from a feature-sample collector (pipeline/collector.py makes one)."""

    def observe(self, step: int, out: TranscoderOutput, row_ids: torch.Tensor) -> None:
        """Called every `sample_every` steps with that step's forward output (active pairs:
        out.rows, out.cols, out.vals) and the batch's store rows (B,) int64 on the device."""

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors / numbers only (loaded with torch.load(weights_only=True))."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def finish(self, run: Run, store: Store) -> Any: ...


CollectorFactory = Callable[[SampleSettings, int, torch.device, Store], Collector]


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
    """The config with its derived defaults filled: the groups."""
    if cfg.groups is None and cfg.dict_size >= 8:
        return dataclasses.replace(cfg, groups=default_groups(cfg.dict_size))
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every check that needs no disk: one UserError naming the option."""
    positive = ["batch_size", "dict_size", "k", "dead_tokens", "log_every", "checkpoint_every",
                "max_samples_per_feature", "sample_context", "top_features", "samples_per_feature", "encoder_init"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("aux_k", "warmup_steps", "keep_checkpoints", "sample_every", "seed"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.checkpoint_minutes >= 0 or not math.isfinite(cfg.checkpoint_minutes):
        raise UserError(f"--checkpoint-minutes must be 0 or more, got {cfg.checkpoint_minutes}")
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
    if cfg.sparsity not in RULES:
        raise UserError(f"--sparsity {cfg.sparsity!r} is not a rule tc knows: pick one of {', '.join(RULES)}")
    if cfg.k > cfg.dict_size:
        raise UserError(f"--k {cfg.k} is larger than --dict-size {cfg.dict_size}: pick k <= dict size")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb-project needs the wandb package: pip install wandb")
    if cfg.resume is None and not cfg.cache:
        raise UserError("no store given: pass --cache STORE (made by `tc cache`), or --resume RUN")
    if cfg.layer is not None and cfg.layers is not None:
        raise UserError("give --layer (one transcoder) or --layers (a set), not both")
    if cfg.layer is not None and cfg.layer < 0:
        raise UserError(f"--layer must be 0 or more, got {cfg.layer}")
    if cfg.layers is not None and cfg.layers.strip() != "all":
        parse_layers(cfg.layers)


def check_local_run_folder(cfg: TrainConfig) -> None:
    """Checkpoints are replaced by rename and the run is locked by a lock file: a run folder is local."""
    for name in ("out", "resume"):
        value = getattr(cfg, name)
        if value and is_remote(value):
            raise UserError(f"--{name} {value}: a run folder is a local path (only the store, --cache, may be on "
                            "an object store): pick a local folder")


def store_identity(store: Store) -> dict[str, Any]:
    a = store.attrs
    stats = a.get("stats", {})
    return {"path": resolved(store.path), "model": a.get("model"), "layer": a.get("layer"),
            "hooks": a.get("hooks"), "d_model": store.d_model, "seq_len": store.seq_len, "n_rows": store.n_rows,
            "chunk_rows": store.chunk_rows, "stat_rows": stats.get("source", {}).get("count"),
            # fingerprints of the content: two stores of the same shape differ here
            "source_mean_norm": stats.get("source", {}).get("mean_norm"),
            "target_mean_norm": stats.get("target", {}).get("mean_norm")}


def open_store(path: str, layer: int | None = None) -> Store:
    """The complete store to train on; for a store of several layers, `layer` of it."""
    if not Location(path).exists():
        raise UserError(f"store {path} does not exist: make it with `tc cache --out {path}`")
    store = Store(path, layer).require_complete()
    if store.prefix is None:
        raise UserError(f"{path} holds layers {format_layers(store.layers)}: pass --layer L to train one of them, "
                        f"or --layers all (or a list such as {store.layers[0]},{store.layers[-1]}) for a set")
    return store


def architecture(groups: list[int], skip: bool = False, sparsity: str = "batchtopk") -> str:
    kind = sparsity if len(groups) == 1 else "matryoshka" if sparsity == "batchtopk" else f"matryoshka-{sparsity}"
    return f"{kind}-skip-transcoder" if skip else f"{kind}-transcoder"


def auto_run_dir(cfg: TrainConfig, store: Store) -> Path:
    model = str(store.attrs.get("model", "model")).rstrip("/").split("/")[-1]
    hooks = store.hooks
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (f"{model}_{hooks['source']}_to_{hooks['target']}_{cfg.dict_size}_{architecture(cfg.groups, cfg.skip, cfg.sparsity)}"
            f"_{cfg.k}_{cfg.lr:g}_{stamp}")
    base = Path("checkpoints") / "transcoder" / model
    path, n = base / name, 1
    while path.exists():
        n += 1
        path = base / f"{name}-{n}"
    return path


def merge_resume(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path,
                 given: set[str] | None = None) -> TrainConfig:
    """The run's saved config, with what the user gave: RESUME_FREE options are taken, the others
    must equal the saved value. `given`: the options the user typed (command line or config file);
    a Python caller that passes None is taken to have given the options that differ from the defaults."""
    defaults = TrainConfig()
    if given is None:
        given = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(defaults, f.name)}
    merged = {}
    changed = []
    for f in dataclasses.fields(TrainConfig):
        mine, theirs = getattr(cfg, f.name), saved.get(f.name)
        if f.name in RESUME_FREE:
            merged[f.name] = mine if f.name in given or f.name not in saved else theirs
        elif f.name in given and mine != theirs:
            changed.append(f"--{f.name.replace('_', '-')} {mine} (run: {theirs})")
            merged[f.name] = theirs
        elif f.name in saved:
            merged[f.name] = theirs
        else:
            merged[f.name] = BEFORE_OPTION.get(f.name, mine)
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


# ----------------------------------------------------------------------------- the run

@dataclass
class Setup:
    cfg: TrainConfig
    run: Run
    store: Store
    config: dict[str, Any]      # what config.json holds
    checkpoint: Path | None     # resume from here
    notes: list[str] = dataclasses.field(default_factory=list)   # damaged checkpoints passed over


def prepare(cfg: TrainConfig, given: set[str] | None = None) -> Setup:
    """All checks before anything is written; returns the resolved plan."""
    cfg = checked(cfg)
    check_local_run_folder(cfg)
    if cfg.resume is not None:
        return prepare_resume(cfg, given)
    cfg = resolve(cfg)
    validate(cfg)
    store = open_store(cfg.cache, cfg.layer)
    run = Run(cfg.out) if cfg.out else Run(auto_run_dir(cfg, store))
    if run.path.exists() and (not run.path.is_dir() or any(p.name != RUN_LOCK for p in run.path.iterdir())):
        raise UserError(f"--out {run.path} exists and is not empty: pick a new folder, or --resume {run.path}")
    cfg.out = str(run.path)
    cfg.cache = resolved(cfg.cache)
    check_batch_fits(cfg, store)
    note_dictionary_size(cfg, store)
    total = total_steps(cfg, store)
    config = {**to_jsonable(cfg), "total_steps": total, "architecture": architecture(cfg.groups, cfg.skip, cfg.sparsity),
              "store": store_identity(store), "versions": versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Setup(cfg, run, store, config, None)


def prepare_resume(cfg: TrainConfig, given: set[str] | None) -> Setup:
    run = Run(cfg.resume)
    if not run.exists:
        raise UserError(f"--resume {run.path}: not a tc train run folder (no config.json)")
    if cfg.out and Path(cfg.out).resolve() != run.path.resolve():
        raise UserError(f"--out {cfg.out} and --resume {run.path} name different folders: drop --out")
    saved = run.config()
    cfg = merge_resume(cfg, saved, run.path, given)
    validate(cfg)
    store = open_store(cfg.cache, cfg.layer)
    check_store_matches(store, saved.get("store", {}), run.path)
    checkpoint, notes = newest_intact(run)
    if notes:
        fallback = f"resuming from {checkpoint.name} instead" if checkpoint else "starting again from step 0"
        notes = [f"{note}: {fallback}" for note in notes]
    if checkpoint is not None:
        d_in = int(checkpoint_meta(checkpoint)["d_in"])
        if d_in != store.d_model:
            raise UserError(f"store {store.path} has d_model {store.d_model} but the checkpoint "
                            f"{checkpoint} has d_in {d_in}: resume with the run's store")
    return Setup(cfg, run, store, saved, checkpoint, notes)


def disk_needed(cfg: TrainConfig, store: Store, total: int, resuming: bool) -> int:
    """Bytes a run will write: its checkpoints (weights and the two Adam moments), one more while
    a new one is written, the final transcoder and the feature samples."""
    d = store.d_model
    params = cfg.dict_size * (2 * d + 1) + d + (d * d if cfg.skip else 0)
    checkpoint = 3 * 4 * params + 8 * cfg.dict_size
    n_checkpoints = -(-total // cfg.checkpoint_every)
    kept = min(cfg.keep_checkpoints or n_checkpoints, n_checkpoints)
    samples = 16 * cfg.dict_size * cfg.max_samples_per_feature if cfg.sample_every else 0
    return (1 if resuming else kept + 1) * checkpoint + 4 * params + samples


def train_resume_hint(run: Run, cfg: TrainConfig) -> str:
    last = run.latest_step_name()
    if last:
        return f"continue from {last} with `tc train --resume {run.path}`"
    return (f"no checkpoint was written yet (the first is at step {cfg.checkpoint_every:,}): "
            f"`tc train --resume {run.path}` starts it again")


WIDE_DICTIONARY = 64   # latents per model dimension beyond which a dictionary is unusually wide


def note_dictionary_size(cfg: TrainConfig, store: Store) -> None:
    """A word when the dictionary is far wider than usual for the store (the default 18,432 latents is
    8x Gemma-2-2B's 2,304 dimensions; on a small model it is hundreds of times d_model)."""
    ratio = cfg.dict_size / store.d_model
    if ratio > WIDE_DICTIONARY:
        print(f"note: --dict-size {cfg.dict_size:,} is {ratio:,.0f}x the store's d_model {store.d_model} (the "
              f"reference is 8x); most latents may stay dead: consider --dict-size {8 * store.d_model:,} to "
              f"{32 * store.d_model:,}", flush=True)


def check_batch_fits(cfg: TrainConfig, store: Store) -> None:
    """A batch larger than the store's usable rows would repeat every row within one step."""
    usable = store.n_usable(cfg.include_bos, cfg.include_outliers)
    if cfg.batch_size > usable:
        raise UserError(f"--batch-size {cfg.batch_size:,} is larger than the {usable:,} usable rows of "
                        f"{store.path}: every row would repeat within a step; lower --batch-size or cache more text")


def total_steps(cfg: TrainConfig, store: Store) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.tokens is not None:
        return -(-cfg.tokens // cfg.batch_size)
    usable = store.n_usable(cfg.include_bos, cfg.include_outliers)
    if usable == 0:
        raise UserError(f"{store.path} has no usable rows (all flagged): cache more text")
    return max(1, usable // cfg.batch_size)


def build_model(cfg: TrainConfig, store: Store, device: torch.device) -> Transcoder:
    d = store.d_model
    meta = {"model": store.attrs.get("model"), "layer": store.attrs.get("layer"), "hooks": store.hooks,
            "store": resolved(store.path)}
    model = Transcoder(d, d, cfg.groups, sparsity=RULES[cfg.sparsity](cfg.k), aux_k=cfg.aux_k, aux_coef=cfg.aux_coef,
                       dead_tokens=cfg.dead_tokens, meta=meta, seed=cfg.seed, skip=cfg.skip,
                       encoder_init=cfg.encoder_init)
    n = norm_constants(store.stats())
    model.set_normalization(n["source_mean"], n["source_scale"], n["target_mean"], n["target_scale"])
    return model.to(device)


def make_optimizer(model: Transcoder, lr: float, device: torch.device) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)   # one kernel per step, CPU or GPU
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model: Transcoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float, sync: Sync | None = None) -> TranscoderOutput:
    """One optimiser step on a normalised batch; decoder rows stay unit norm. Under torchrun
    (`sync`) the gradients are the job's, and the dead counters and threshold are left to
    `sync.agree`, which learns them from the whole job's batch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(x, y, update_stats=None if sync is None else False)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if sync is not None:
        sync.reduce_grads(model)
    model.project_decoder_grad()
    optimizer.step()
    model.normalize_decoder()
    return out


def start_run_folder(setup: Setup) -> None:
    """config.json first (from then on the folder is a run), then the TOML that repeats the command."""
    run, cfg = setup.run, setup.cfg
    run.path.mkdir(parents=True, exist_ok=True)
    if cfg.resume is None:
        write_json_atomic(run.config_file, setup.config)
        fault_point("train_config_written")
    if not run.config_toml.exists():   # a run killed between the two writes gets it on resume
        write_config_toml(run.config_toml, dataclasses.replace(cfg, resume=None))


def run_train(cfg: TrainConfig, given: set[str] | None = None,
              collector_factory: CollectorFactory = make_collector) -> Path:
    """Train (or resume) a transcoder, or a set of them (--layers); returns the run (or set) folder.
    `given`: the options the user typed (see merge_resume); `collector_factory` makes the
    feature-sample collector (sampling on)."""
    cfg = checked(cfg)
    job = dist.from_env()
    if job.world > 1:
        return run_job(cfg, given, collector_factory, job)
    if cfg.layers is not None or (cfg.resume is not None and is_set(cfg.resume)):
        return run_set(cfg, given, collector_factory)
    setup = prepare(cfg, given)
    cfg, run = setup.cfg, setup.run
    if cfg.resume is not None and run.finished:
        print(f"run {run.path} has finished already: nothing to do")
        return run.path
    device = torch.device(pick_device(cfg.device))
    run.path.mkdir(parents=True, exist_ok=True)
    with FolderLock(run.path, RUN_LOCK):   # one process per run folder; a dead one's lock is taken over
        return train_locked(setup, device, collector_factory)


SET_UNDER_TORCHRUN = ("tc train --layers (a transcoder set) does not run under torchrun: train one set (or one "
                      "layer) per GPU instead, each as a plain process, e.g. CUDA_VISIBLE_DEVICES=0 tc train "
                      "--layers 0-8 ... and CUDA_VISIBLE_DEVICES=1 tc train --layers 9-17 ... (docs/distributed.md)")


def run_job(cfg: TrainConfig, given: set[str] | None, collector_factory: CollectorFactory, job: dist.Job) -> Path:
    """`tc train` as one job of several processes under torchrun (docs/distributed.md): every rank
    trains on its slice of each global batch, rank 0 alone writes the run folder."""
    job = dist.join(job)
    try:
        with dist.quiet_stdout(job):
            return train_job(cfg, given, collector_factory, job)
    finally:
        dist.leave(job)


def job_plan(cfg: TrainConfig, given: set[str] | None, world: int) -> tuple | None:
    """Rank 0's checks and plan, for every rank: (cfg, config, checkpoint, notes), None when done."""
    if cfg.layers is not None or (cfg.resume is not None and is_set(cfg.resume)):
        raise UserError(SET_UNDER_TORCHRUN)
    setup = prepare(cfg, given)
    if setup.cfg.resume is not None and setup.run.finished:
        print(f"run {setup.run.path} has finished already: nothing to do")
        return None
    if setup.cfg.batch_size % world:
        raise UserError(f"--batch-size {setup.cfg.batch_size:,} does not divide among the job's {world} processes "
                        f"(each trains on an equal slice of every batch): pick a multiple of {world}")
    return setup.cfg, setup.config, setup.checkpoint, setup.notes


def train_job(cfg: TrainConfig, given: set[str] | None, collector_factory: CollectorFactory, job: dist.Job) -> Path:
    plan = job.on_main(lambda: job_plan(cfg, given, job.world))
    if plan is None:
        return Path(cfg.resume)
    cfg, config, checkpoint, notes = plan
    job.hint = (f"continue with `tc train --resume {cfg.out}` (from its last checkpoint, with any number of "
                "processes that divides --batch-size)")
    store = job.on_all(lambda: open_store(cfg.cache, cfg.layer))
    setup = Setup(cfg, Run(cfg.out), store, config, checkpoint, notes)
    device = torch.device(job.device(pick_device(cfg.device)))
    with contextlib.ExitStack() as lock:
        def take_lock() -> None:   # one job per run folder: rank 0 holds the lock for all
            setup.run.path.mkdir(parents=True, exist_ok=True)
            lock.enter_context(FolderLock(setup.run.path, RUN_LOCK))
        job.on_main(take_lock)
        live = start_live(setup, device, collector_factory, Sync(job, device))
        loader = ChunkLoader(store, cfg.batch_size, seed=cfg.seed, position=live.position,
                             norm=norm_constants(store.stats()), device=device, include_bos=cfg.include_bos,
                             include_outliers=cfg.include_outliers, share=(job.rank, job.world),
                             exchange=live.sync.exchange_rows)
        try:
            train_loop(live, loader)
        finally:
            loader.close()
        end_live(live)
    print(f"done: the transcoder is {setup.run.transcoder_file} ({job.world} processes); next: `tc samples collect "
          f"--run {setup.run.path}`", flush=True)
    return setup.run.path


@dataclass
class Live:
    """One transcoder in training: what its steps change (a run trains one, a set one per layer)."""
    setup: Setup
    model: Transcoder
    optimizer: torch.optim.Optimizer
    metrics: Metrics
    collector: Collector | None
    wandb: WandbLogger | None
    step: int
    total: int
    position: int               # loader rows handed out before `step` (every rank's rows, under torchrun)
    last_saved: float = 0.0     # time.monotonic() of the last checkpoint
    sync: Sync | None = None    # under torchrun: what the ranks agree on (pipeline/ddp.py)
    fresh: dict | None = None   # an empty collector's state: a rank other than 0 starts again from it

    @property
    def main(self) -> bool:
        """This process writes the run folder (rank 0, or the only process)."""
        return self.sync is None or self.sync.job.main


def start_live(setup: Setup, device: torch.device, collector_factory: CollectorFactory,
               sync: Sync | None = None) -> Live:
    """Space checked, the folder begun, the model built from the seed, its checkpoint restored.
    Under torchrun (`sync`) rank 0 alone touches the run folder and reads the checkpoint, which it
    hands to the others."""
    cfg, run, store = setup.cfg, setup.run, setup.store
    total = int(setup.config["total_steps"])
    job = sync.job if sync is not None else dist.Job()
    job.on_main(lambda: begin_run(setup, total))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model(cfg, store, device)
    optimizer = make_optimizer(model, cfg.lr, device)
    metrics = Metrics(run.metrics_file if job.main else Path(os.devnull), len(cfg.groups), device)
    collector = collector_factory(cfg.sample_settings(), model.d_latent, device, store) if cfg.sample_every > 0 else None
    fresh = None
    if collector is not None and not job.main:   # copies: a CPU state_dict shares the live tensors
        fresh = {k: v.clone() for k, v in collector.state_dict().items()}
    step, position = 0, 0
    if setup.checkpoint is not None:
        loaded = job.on_main(lambda: read_checkpoint(setup.checkpoint))
        step, position = restore(loaded, model, optimizer, metrics, collector if job.main else None)
    wandb = None
    if job.main:
        truncate_metrics(metrics.path, step)
        if cfg.wandb_project:
            wandb = WandbLogger(cfg.wandb_project, run.path.name, run.path, run.wandb_id_file, cfg)
    if sync is not None:
        sync.attach(model)
    return Live(setup, model, optimizer, metrics, collector, wandb, step, total, position, time.monotonic(),
                sync, fresh)


def begin_run(setup: Setup, total: int) -> None:
    """What one process does before training starts: notes, the space check, the folder begun."""
    cfg, run = setup.cfg, setup.run
    for note in setup.notes:
        print(note, flush=True)
    check_free_space(run.path, disk_needed(cfg, setup.store, total, setup.checkpoint is not None),
                     f"run {run.path}", "free some space, or write the run elsewhere (--out), or keep fewer "
                     "checkpoints (--keep-checkpoints)")
    resume_hint.set(lambda: train_resume_hint(run, cfg))
    start_run_folder(setup)
    verb = "resuming" if setup.checkpoint is not None else "training"
    print(f"{verb} {run.path} ({total:,} steps of {cfg.batch_size:,} tokens); "
          f"if interrupted: tc train --resume {run.path}", flush=True)


def end_live(live: Live) -> None:
    """The final transcoder, plots, samples and summary.json of a transcoder whose steps are done."""
    if live.sync is not None:
        live.sync.merge_samples(live.collector, None)
    if not live.main:
        return
    run = live.setup.run
    finish(run, live.model, live.setup.store, live.collector, live.metrics)
    if live.wandb:
        live.wandb.finish()


def train_locked(setup: Setup, device: torch.device, collector_factory: CollectorFactory) -> Path:
    cfg, run, store = setup.cfg, setup.run, setup.store
    live = start_live(setup, device, collector_factory)
    loader = ChunkLoader(store, cfg.batch_size, seed=cfg.seed, position=live.position,
                         norm=norm_constants(store.stats()), device=device, include_bos=cfg.include_bos,
                         include_outliers=cfg.include_outliers)
    try:
        train_loop(live, loader)
    finally:
        loader.close()
    end_live(live)
    print(f"done: the transcoder is {run.transcoder_file}; next: `tc samples collect --run {run.path}`, then "
          f"`tc samples export --run {run.path}` (feature browser) and `tc eval --run {run.path}`", flush=True)
    return run.path


def train_loop(live: Live, loader: ChunkLoader) -> None:
    """Steps `live.step`..`live.total`: log every log_every steps, checkpoint every checkpoint_every and at the end."""
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    bar = tqdm(total=live.total, initial=live.step, unit="step", desc="train", dynamic_ncols=True,
               disable=not live.main)
    try:
        live.model.train()
        while live.step < live.total:
            batch = next(loader)
            row = advance(live, batch, loader.position)
            if row is not None:
                bar.set_postfix(postfix(row, live.setup.cfg))
            bar.update(1)
            if live.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()


def postfix(row: dict[str, Any], cfg: TrainConfig) -> dict[str, str]:
    return {"loss": f"{row['loss']:.4g}", "fvu": f"{row['fvu']:.3f}", "l0": f"{row['l0']:.1f}",
            f"dead/{short_count(cfg.dead_tokens)}": row["dead_features"]}


def advance(live: Live, batch: Any, position: int) -> dict[str, Any] | None:
    """One optimiser step of `live` on `batch` (`position`: the loader's rows handed out after it);
    logs and checkpoints when due. Returns the logged metrics row, if this step logged."""
    cfg, setup = live.setup.cfg, live.setup
    lr = lr_at(live.step, live.total, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
    due = bool(cfg.checkpoint_minutes) and time.monotonic() - live.last_saved >= 60 * cfg.checkpoint_minutes
    if live.sync is None:
        out = shown = train_step(live.model, live.optimizer, batch.x, batch.y, lr)
    else:   # this rank's slice; the metrics and the decision are the job's
        out = train_step(live.model, live.optimizer, batch.x, batch.y, lr, sync=live.sync)
        shown, due = live.sync.agree(live.model, out, batch.y, due)
    live.step += 1
    step, model = live.step, live.model
    live.metrics.add(shown, cfg.batch_size)
    if live.collector is not None and step % cfg.sample_every == 0:
        live.collector.observe(step, out, batch.rows)
    row = None
    if step % cfg.log_every == 0 or step == live.total:
        row = live.metrics.flush(step, cfg.batch_size, lr, model)
        if not math.isfinite(row["loss"]):
            stop(live, diverged(setup.run, step, f"the loss is {row['loss']}"))
        if live.wandb:
            live.wandb.log(row)
    if step % cfg.checkpoint_every == 0 or step == live.total or due:
        if not model.is_finite():   # a NaN/inf weight is never saved, so a resume never loads one
            stop(live, diverged(setup.run, step, "a weight is NaN or inf"))
        if live.sync is not None:
            live.sync.check_same_weights(model, step)
            live.sync.merge_samples(live.collector, live.fresh)
        if live.main:
            state = checkpoint_state(step, live.total, position, live.optimizer, model, live.metrics,
                                     live.collector)
            write_checkpoint(setup.run, step, model, state, setup.config, cfg.keep_checkpoints)
        fault_point("checkpoint_written")
        live.last_saved = time.monotonic()
    return row


def stop(live: Live, error: UserError) -> None:
    """Raise `error`; under torchrun every rank finds it at the same step (the weights and metrics
    are the job's), and rank 0 alone says it."""
    if not live.main:
        dist.quiet_exit()
    raise error


def diverged(run: Run, step: int | None, what: str) -> UserError:
    last = run.latest_step_name()
    saved = f"the last checkpoint ({last}) is intact" if last else "no checkpoint was written"
    when = f"at step {step:,}" if step is not None else "at the end"
    return UserError(f"training of {run.path} stopped {when}: {what}; nothing from this step on was "
                     f"saved and the run is not finished ({saved}); try a lower --lr in a new run, and check the "
                     f"store with `tc info --verify STORE`")


def checkpoint_state(step: int, total: int, position: int, optimizer: torch.optim.Optimizer,
                     model: Transcoder, metrics: Metrics, collector: Collector | None) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs (state.pt)."""
    return {"step": step, "loader_position": position, "optimizer": optimizer.state_dict(),
            "tokens_since_fired": model.tokens_since_fired.cpu(),
            "sparsity": {k: v.cpu() for k, v in model.sparsity.state_dict().items()},
            "metrics": metrics.state_dict(), "rng": rng_state(),
            "collector": collector.state_dict() if collector else None, "total_steps": total}


def restore(loaded: tuple[dict, dict], model: Transcoder, optimizer: torch.optim.Optimizer, metrics: Metrics,
            collector: Collector | None) -> tuple[int, int]:
    """Load a checkpoint (`read_checkpoint`'s tensors and state) into the live objects; returns
    (step, loader position)."""
    tensors, state = loaded
    model.load_file_tensors(tensors)
    model.tokens_since_fired.copy_(state["tokens_since_fired"])
    if "sparsity" in state:
        model.sparsity.load_state_dict(state["sparsity"])
    else:   # a tc 0.1 checkpoint: BatchTopK, its update count under its own name
        model.sparsity.updates.copy_(state["threshold_updates"])
    optimizer.load_state_dict(state["optimizer"])
    metrics.load_state_dict(state["metrics"])
    set_rng_state(state["rng"])
    if collector is not None and state.get("collector") is not None:
        collector.load_state_dict(state["collector"])
    return int(state["step"]), int(state["loader_position"])


def finish(run: Run, model: Transcoder, store: Store, collector: Collector | None, metrics: Metrics) -> None:
    """Final transcoder, plots, samples; summary.json last (marks the run finished)."""
    if not model.is_finite():
        raise diverged(run, None, "a weight is NaN or inf")
    model.save(run.transcoder_file)
    rows = read_metrics(metrics.path)
    write_plots(run.plots_dir, rows, run.path.name)
    if collector is not None:
        collector.finish(run, store)
    last = rows[-1] if rows else {}
    write_json_atomic(run.summary_file, {
        "steps": last.get("step"), "tokens": last.get("tokens"), "fvu": last.get("fvu"),
        "fvu_levels": last.get("fvu_levels"), "l0": last.get("l0"), "dead_features": last.get("dead_features"),
        "dead_fraction": last.get("dead_fraction"), "dead_window_tokens": model.dead_tokens,
        **model.sparsity.summary(),
        "transcoder": TRANSCODER, "transcoder_checksum": file_checksum(run.transcoder_file),
        "versions": versions()})


# ----------------------------------------------------------------------------- a set: one transcoder per layer

@dataclass
class SetSetup:
    cfg: TrainConfig            # the set's (layers given, layer None)
    runset: RunSet
    store: Store                # the multi-layer store (no layer chosen)
    layers: list[int]
    members: list[Setup]        # one per layer, as `tc train --layer L --out SET/layer_L` would prepare it
    manifest: dict[str, Any]


def set_layers(cfg: TrainConfig, store: Store) -> list[int]:
    """--layers resolved against the store: `all` is every layer it holds."""
    if cfg.layers.strip() == "all":
        return list(store.layers)
    layers = parse_layers(cfg.layers)
    missing = [L for L in layers if L not in store.layers]
    if missing:
        raise UserError(f"{store.path} holds layers {format_layers(store.layers)}, not {format_layers(missing)}: "
                        "pick --layers among them (or all)")
    return layers


def open_set_store(path: str | None) -> Store:
    if not path or not Location(path).exists():
        raise UserError(f"store {path} does not exist: make it with `tc cache --layers ... --out {path}`")
    store = Store(path).require_complete()
    if not store.multi_layer:
        raise UserError(f"{path} is a one-layer store (layer {store.layer}): --layers needs a store made with "
                        "`tc cache --layers`; train it without --layers")
    return store


def prepare_set(cfg: TrainConfig, given: set[str] | None) -> SetSetup:
    """All checks before anything is written, for every member."""
    if cfg.resume is not None:
        runset = RunSet(cfg.resume)
        if cfg.out and Path(cfg.out).resolve() != runset.path.resolve():
            raise UserError(f"--out {cfg.out} and --resume {runset.path} name different folders: drop --out")
        manifest = runset.manifest()
        cfg = merge_resume(cfg, manifest["config"], runset.path, given)
        validate(cfg)
    else:
        cfg = resolve(cfg)
        validate(cfg)
        manifest = None
    store = open_set_store(cfg.cache)
    layers = set_layers(cfg, store)
    if cfg.resume is None:
        first = store.layer_view(layers[0])
        runset = RunSet(cfg.out or f"{auto_run_dir(cfg, first)}_set-L{format_layers(layers).replace(',', '_')}")
        if runset.path.exists() and (not runset.path.is_dir() or any(p.name != RUN_LOCK for p in runset.path.iterdir())):
            raise UserError(f"--out {runset.path} exists and is not empty: pick a new folder, or --resume {runset.path}")
        cfg.out, cfg.cache = str(runset.path), resolved(cfg.cache)
        manifest = {"kind": "tc transcoder set", "layers": layers, "config": to_jsonable(cfg),
                    "store": cfg.cache, "runs": {str(L): runset.layer_run(L).path.name for L in layers},
                    "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    elif layers != runset.layers():
        raise UserError(f"{runset.path} is a set of layers {format_layers(runset.layers())}, its store now gives "
                        f"{format_layers(layers)}: resume with the set's store")
    free = (given or set()) & RESUME_FREE - {"resume", "out", "cache"}
    members = [member_setup(cfg, runset, L, free) for L in layers]
    return SetSetup(cfg, runset, store, layers, members, manifest)


def member_setup(cfg: TrainConfig, runset: RunSet, layer: int, free: set[str]) -> Setup:
    """Layer `layer`'s run, prepared exactly as `tc train --cache STORE --layer L --out SET/layer_L`
    (or its --resume) would be, so the set's transcoder is that run's."""
    run = runset.layer_run(layer)
    mine = dataclasses.replace(cfg, layers=None, layer=layer, out=str(run.path), resume=None)
    if run.exists:
        return prepare_resume(dataclasses.replace(mine, resume=str(run.path)), free | {"resume", "out"})
    return prepare(mine, None)


def run_set(cfg: TrainConfig, given: set[str] | None, collector_factory: CollectorFactory) -> Path:
    """Train (or resume) a set: every layer's transcoder from one pass over the store."""
    import contextlib

    sset = prepare_set(cfg, given)
    todo = [m for m in sset.members if not m.run.finished]
    if not todo:
        print(f"set {sset.runset.path} has finished already: nothing to do")
        return sset.runset.path
    device = torch.device(pick_device(sset.cfg.device))
    need = sum(disk_needed(m.cfg, m.store, int(m.config["total_steps"]), m.checkpoint is not None) for m in todo)
    check_free_space(sset.runset.path, need, f"the set {sset.runset.path}", "free some space, or write the set "
                     "elsewhere (--out), or keep fewer checkpoints (--keep-checkpoints)")
    sset.runset.path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        locks.enter_context(FolderLock(sset.runset.path, RUN_LOCK))
        if not sset.runset.exists:   # first: from then on the folder is a set, resumable as one
            write_json_atomic(sset.runset.manifest_file, sset.manifest)
        if not sset.runset.config_toml.exists():
            write_config_toml(sset.runset.config_toml, dataclasses.replace(sset.cfg, resume=None))
        for m in todo:
            m.run.path.mkdir(parents=True, exist_ok=True)
            locks.enter_context(FolderLock(m.run.path, RUN_LOCK))
        lives = [start_live(m, device, collector_factory) for m in todo]
        resume_hint.set(lambda: f"continue with `tc train --resume {sset.runset.path}`")
        print(f"training the set {sset.runset.path}: layers {format_layers([m.cfg.layer for m in todo])} from one "
              f"pass over {sset.store.path}; if interrupted: tc train --resume {sset.runset.path}", flush=True)
        c = sset.cfg
        loader = SetLoader([m.store for m in todo], c.batch_size, positions=[lv.position for lv in lives],
                           limits=[lv.total * c.batch_size for lv in lives], seed=c.seed,
                           norms=[norm_constants(m.store.stats()) for m in todo], device=device,
                           include_bos=c.include_bos, include_outliers=c.include_outliers)
        try:
            set_loop(lives, loader)
        finally:
            loader.close()
        for live in lives:
            end_live(live)
    print(f"done: the set {sset.runset.path} holds layers {format_layers(sset.layers)} (a run folder each); "
          f"next: `tc export circuit-tracer --run {sset.runset.path} --out DIR`", flush=True)
    return sset.runset.path


def set_loop(lives: list[Live], loader: SetLoader) -> None:
    """Every member's steps, each batch of the one pass handed to its layer's transcoder."""
    kill_at = int(os.environ.get(KILL_ENV, "-1"))
    bar = tqdm(total=sum(lv.total for lv in lives), initial=sum(lv.step for lv in lives), unit="step",
               desc=f"train {len(lives)} layers", dynamic_ncols=True)
    try:
        for live in lives:
            live.model.train()
        while any(lv.step < lv.total for lv in lives):
            for i, batch in next(loader).items():
                advance(lives[i], batch, loader.positions[i])
                bar.update(1)
            if min(lv.step for lv in lives) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()

"""The run folder: its layout, and every question a stage asks about a run (layout: docs/transcoder.md).

RUN/
  config.json              resolved TrainConfig (flat) + store identity, total_steps, versions
  tc-train.toml            the same config as `--config` input, so the command can be repeated
  metrics.jsonl            one JSON object per logged step
  checkpoints/step_XXXXXX/ transcoder.safetensors, config.json, state.pt (everything to resume)
  checkpoints/latest       name of the newest complete checkpoint (replaced atomically)
  transcoder.safetensors   the final transcoder
  plots/*.png              curves of the logged metrics
  summary.json             final metrics; written last, so its presence marks a finished run
  activation_samples/      samples kept during training (samples.safetensors, features.json, summary.json)
  samples/                 the exact collect (samples.safetensors, collect.json written last, state while running)
  export/                  the JSON or HTML export
  eval.json, eval_fvu_per_prefix.png, tc-eval.toml

A SET of transcoders (`tc train --layers`, one per layer of a multi-layer store) is a folder of
ordinary run folders plus its manifest:

SET/
  set.json                 the set's TrainConfig, its layers, its store, versions (written first)
  tc-train.toml            the command, repeatable with --config
  layer_{L}/               an ordinary run folder per layer (everything above)
  eval.json, eval_fvu_per_layer.png, tc-eval.toml   `tc eval --run SET`: every layer, and all spliced at once

Only this module knows these names; train, checkpoints, metrics, samples, export, eval, info and the
demo ask a `Run` for paths and answers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.storage import Location, resolved
from pipeline.store import Store
from pipeline.transcoder import Transcoder
from pipeline.util import UserError, file_checksum

CONFIG = "config.json"
SUMMARY = "summary.json"
TRANSCODER = "transcoder.safetensors"
CHECKPOINT_STATE = "state.pt"
SAMPLES_FILE = "samples.safetensors"   # in both sample folders
COLLECT_META = "collect.json"          # written last by `tc samples collect`: marks it finished
COLLECT_STATE = "state.safetensors"    # resumable state of an unfinished collect
RUN_LOCK = ".tc-run.lock"              # held by the one process training in the folder
SET_MANIFEST = "set.json"


class Run:
    """A run folder, existing or about to be made. Paths are properties; reading is lazy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._config: dict[str, Any] | None = None

    def __str__(self) -> str:
        return str(self.path)

    # -- paths

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def config_toml(self) -> Path:
        return self.path / "tc-train.toml"

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def transcoder_file(self) -> Path:
        return self.path / TRANSCODER

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest_pointer(self) -> Path:
        return self.checkpoints_dir / "latest"

    @property
    def wandb_id_file(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def training_samples_dir(self) -> Path:
        return self.path / "activation_samples"

    @property
    def training_samples_summary(self) -> Path:
        return self.training_samples_dir / SUMMARY

    @property
    def training_samples_features(self) -> Path:
        return self.training_samples_dir / "features.json"

    @property
    def exact_samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_plot(self) -> Path:
        return self.path / "eval_fvu_per_prefix.png"

    @property
    def eval_toml(self) -> Path:
        return self.path / "tc-eval.toml"

    # -- state

    @property
    def exists(self) -> bool:
        """config.json is written first (atomically): from then on the folder is a run."""
        return self.config_file.is_file()

    @property
    def finished(self) -> bool:
        return self.summary_file.exists()

    def config(self) -> dict[str, Any]:
        if self._config is None:
            try:
                self._config = json.loads(self.config_file.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{self.config_file} is not valid JSON ({e})") from None
        return self._config

    def latest_step_name(self) -> str | None:
        """What `latest` names (step_XXXXXX), complete or not."""
        return self.latest_pointer.read_text().strip() if self.latest_pointer.exists() else None

    def trained_on(self) -> str | None:
        """The path of the store the run trained on, as its config records it."""
        config = self.config()
        return config.get("cache") or config.get("config", {}).get("cache")

    def store_path(self, cache: str | None = None) -> str:
        """The store to read: `cache` when given, else the one the run trained on."""
        path = cache or self.trained_on()
        if not path:
            raise UserError(f"{self.config_file} records no store: pass --cache STORE")
        if not Location(path).exists():
            raise UserError(f"the store {path} of run {self.path} is not there (moved or deleted?): "
                            "pass --cache STORE")
        return str(path)

    def store_layer(self) -> int | None:
        """The layer of a multi-layer store the run trained on (None: a one-layer store's run)."""
        layer = self.config().get("layer")
        return layer if isinstance(layer, int) else None

    def store(self, cache: str | None = None) -> Store:
        """The store (complete) a stage after training reads: `cache`, or the training store; for a
        run of one layer of a multi-layer store, that layer of it."""
        return Store(self.store_path(cache), self.store_layer()).require_complete()

    def training_store(self, fallback: Store) -> Store:
        """The store the run trained on; `fallback` when that one is gone or is the same."""
        path = self.trained_on()
        if not path or not Location(path).exists() or resolved(path) == resolved(fallback.path):
            return fallback
        return Store(path, self.store_layer()).require_complete()

    def transcoder(self, device: Any = "cpu") -> Transcoder:
        """The final transcoder, in eval mode; a UserError when training has not finished."""
        if not self.transcoder_file.exists():
            raise UserError(f"{self.path} has no final transcoder ({TRANSCODER}): finish training first "
                            f"(`tc train --resume {self.path}`)")
        problem = self.transcoder_problem()
        if problem:
            raise UserError(problem)
        return Transcoder.load(self.transcoder_file).to(device).eval()

    def transcoder_problem(self) -> str | None:
        """Why the final transcoder cannot be trusted (its checksum in summary.json differs), or None."""
        want = self.summary().get("transcoder_checksum") if self.finished else None
        if want is None or file_checksum(self.transcoder_file) == want:
            return None
        last = self.latest_step_name()
        fix = (f"copy {self.checkpoints_dir / last / TRANSCODER} over it (the last checkpoint holds the same "
               "weights)") if last else "train it again"
        return f"{self.transcoder_file} is damaged (it does not match the checksum in {SUMMARY}): {fix}"

    def summary(self) -> dict[str, Any]:
        try:
            return json.loads(self.summary_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.summary_file} is damaged ({type(e).__name__}): it marks the run finished; "
                            "resume the run with `tc train --resume` after moving it away") from None


def is_run(path: str | Path) -> bool:
    return Run(path).exists


def open_run(path: str | Path | None) -> Run:
    """The run folder a stage after training was pointed at (`--run`); one line if it is not one."""
    if path is None or not str(path).strip():
        raise UserError("no run folder given: pass --run RUN (the folder `tc train` wrote)")
    run = Run(path)
    if not run.path.is_dir():
        raise UserError(f"run folder {str(path)!r} does not exist: pass the folder `tc train` wrote (--run RUN)")
    if not run.exists:
        raise UserError(f"{run.path} is not a tc run folder (no {CONFIG}): pass the folder `tc train` wrote")
    return run


class RunSet:
    """A set folder: one run folder per layer and the manifest (module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def manifest_file(self) -> Path:
        return self.path / SET_MANIFEST

    @property
    def config_toml(self) -> Path:
        return self.path / "tc-train.toml"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_plot(self) -> Path:
        return self.path / "eval_fvu_per_layer.png"

    @property
    def eval_toml(self) -> Path:
        return self.path / "tc-eval.toml"

    @property
    def exists(self) -> bool:
        """set.json is written first (atomically): from then on the folder is a set."""
        return self.manifest_file.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.manifest_file} is damaged ({type(e).__name__}): it says which runs make the "
                            "set; train the set again into a new folder") from None

    def layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest()["layers"]]

    def layer_run(self, layer: int) -> Run:
        return Run(self.path / f"layer_{layer}")

    def runs(self) -> list[Run]:
        return [self.layer_run(layer) for layer in self.layers()]

    @property
    def finished(self) -> bool:
        return all(run.finished for run in self.runs())


def is_set(path: str | Path) -> bool:
    return RunSet(path).exists


def open_set_layer(path: str | Path, layer: int | None) -> Run:
    """`--run` for a stage that takes one run: a run folder, or a set folder with `layer` (one line
    when it is missing or not in the set)."""
    if not is_set(path):
        run = open_run(path)
        if layer is not None and run.store_layer() not in (None, layer):
            raise UserError(f"{run.path} is the run of layer {run.store_layer()}, not layer {layer}: drop --layer")
        return run
    runset = RunSet(path)
    if layer is None:
        raise UserError(f"{runset.path} is a set of transcoders (layers {','.join(map(str, runset.layers()))}): "
                        "pass --layer L for one of them")
    if layer not in runset.layers():
        raise UserError(f"{runset.path} has no transcoder of layer {layer}: its layers are "
                        f"{','.join(map(str, runset.layers()))}")
    return open_run(runset.layer_run(layer).path)

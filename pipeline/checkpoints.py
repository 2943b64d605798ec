"""Training checkpoints: write one atomically, prune old ones, read one back, and the RNG state.

A checkpoint is a folder RUN/checkpoints/step_XXXXXX holding the transcoder file, the run's
config.json and state.pt (optimizer, counters, loader position, RNG, collector, metrics window).
It is written in a temporary folder, renamed into place, and only then named by `latest`, so a
kill at any moment leaves `latest` naming a complete checkpoint (Run.latest_checkpoint reads it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.run import CHECKPOINT_STATE, CONFIG, TRANSCODER, Run
from pipeline.transcoder import Transcoder
from pipeline.util import write_file_atomic, write_json_atomic


def fsync_dir(path: Path) -> None:
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


def write_checkpoint(run: Run, step: int, model: Transcoder, state: dict[str, Any],
                     config: dict[str, Any], keep: int) -> Path:
    """checkpoints/step_XXXXXX written in a temp folder, renamed into place, then `latest` replaced."""
    root = run.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp, final = root / f".tmp_{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / TRANSCODER)
    write_json_atomic(tmp / CONFIG, config)
    with open(tmp / CHECKPOINT_STATE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():   # left by a run killed after the rename; same step, same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_file_atomic(run.latest_pointer, name)
    fsync_dir(root)
    prune_checkpoints(root, keep, name)
    return final


def prune_checkpoints(root: Path, keep: int, latest: str) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in steps[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The transcoder tensors (by file name) and the state dict of a checkpoint folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / TRANSCODER))
    state = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    return tensors, state


def checkpoint_meta(path: Path) -> dict[str, str]:
    """The metadata of a checkpoint's transcoder file (d_in, groups, ...), without its tensors."""
    from safetensors import safe_open

    with safe_open(str(path / TRANSCODER), "pt") as f:
        return f.metadata() or {}


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_rest": [kind, int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state((kind, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))

"""Training checkpoints: write one atomically, prune old ones, read one back, and the RNG state.

A checkpoint is a folder RUN/checkpoints/step_XXXXXX holding the transcoder file, the run's
config.json and state.pt (optimizer, counters, loader position, RNG, collector, metrics window).
It is written in a temporary folder, renamed into place, and only then named by `latest`, so a
kill at any moment leaves `latest` naming a complete checkpoint.
Its checksums.json (CRC-32 and size of each file, written last) lets a resume tell a damaged
checkpoint from an intact one and fall back to the newest intact one (newest_intact).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.run import CHECKPOINT_STATE, CONFIG, TRANSCODER, Run
from pipeline.transcoder import Transcoder
from pipeline.util import UserError, file_checksum, write_file_atomic, write_json_atomic

CHECKSUMS = "checksums.json"


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
    write_json_atomic(tmp / CHECKSUMS, {n: file_checksum(tmp / n) for n in (TRANSCODER, CONFIG, CHECKPOINT_STATE)})
    if final.exists():   # left by a run killed after the rename; same step, same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_file_atomic(run.latest_pointer, name)
    fsync_dir(root)
    prune_checkpoints(root, keep, name)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing or damaged file), or None if intact.
    A checkpoint written before tc recorded checksums is taken as intact when its files are there."""
    if not (path / CHECKPOINT_STATE).is_file() or not (path / TRANSCODER).is_file():
        return "a file is missing"
    if not (path / CHECKSUMS).is_file():
        return None
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} is damaged"
    for name, want in expected.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if file_checksum(path / name) != want:
            return f"{name} does not match its checksum"
    return None


def newest_intact(run: Run) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that is intact, starting from the one `latest` names, and a line for
    each newer one passed over because it is damaged."""
    root = run.checkpoints_dir
    latest = run.latest_step_name()
    if latest is None or not root.is_dir():
        return None, []
    names = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    skipped = []
    for name in (n for n in names if n <= latest):
        problem = checkpoint_problem(root / name)
        if problem is None:
            return root / name, skipped
        skipped.append(f"checkpoint {name} is damaged ({problem})")
    return None, skipped


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

    try:
        tensors = load_file(str(path / TRANSCODER))
        state = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    except Exception as e:   # a checkpoint made before checksums, damaged
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): delete that folder and resume "
                        "again to fall back to an older checkpoint") from None
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

"""Training metrics: window sums on the device, the metrics.jsonl file, its plots, and W&B.

metrics.jsonl holds one JSON object per logged step (step, tokens, loss, fvu, fvu_levels, l0,
aux_loss, dead_features, dead_fraction, lr, the sparsity rule's scalars such as threshold,
tokens_per_s). A resumed run first drops the lines after its checkpoint, so none is written twice.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.transcoder import Transcoder, TranscoderOutput
from pipeline.util import UserError, to_jsonable, write_file_atomic


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
               "l0": m[2], "aux_loss": m[3],
               # training's "dead": not fired in the last dead_tokens training tokens (eval's: never
               # active on its rows); the same counter, named by its window everywhere it is shown
               "dead_features": dead, "dead_fraction": dead / model.d_latent, "dead_window_tokens": model.dead_tokens,
               "lr": lr, **model.sparsity.summary(),
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


def write_plots(out_dir: Path, rows: list[dict[str, Any]], title: str) -> list[Path]:
    """PNG curves of the logged metrics in `out_dir`."""
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_title(f"{key} ({title[:60]})", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


class WandbLogger:
    """The same rows to a Weights & Biases run; its id is kept in `id_file`, so a resume continues it."""

    def __init__(self, project: str, name: str, folder: Path, id_file: Path, config: Any):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb-project needs the wandb package: pip install wandb") from None
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(folder),
                              config=to_jsonable(config))

    def log(self, row: dict[str, Any]) -> None:
        flat = {k: v for k, v in row.items() if k != "fvu_levels" and v is not None}
        flat.update({f"fvu_level_{i + 1}": v for i, v in enumerate(row["fvu_levels"])})
        self.run.log(flat, step=row["step"])

    def finish(self) -> None:
        self.run.finish()

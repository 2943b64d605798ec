"""A run's feature samples as one set of arrays, whichever stage made them: the exact collect
(RUN/samples, preferred once it finished) or the training collector (RUN/activation_samples).
Read by the export, the browser and `tc samples show`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from pipeline.run import COLLECT_META, SAMPLES_FILE, Run, open_run
from pipeline.util import UserError


@dataclass
class FeatureSamples:
    """Samples of a run, from the exact pass when it finished, else from training. Arrays over F
    features; stats the source lacks are None."""
    source: str                    # "exact" or "training"
    top_vals: np.ndarray           # (F, N) float32, sorted descending
    top_rows: np.ndarray           # (F, N) int64, -1 = empty
    fires: np.ndarray              # (F,) int64: rows where the feature fired (above threshold for training)
    act_sum: np.ndarray            # (F,) float64
    rows_total: int                # usable rows scanned (exact) or rows observed (training)
    act_max: np.ndarray            # (F,)
    hist: np.ndarray | None = None             # (F, H) int64 over equal-width bins of [0, act_max]
    interval_vals: np.ndarray | None = None    # (F, Q, S) float32
    interval_rows: np.ndarray | None = None    # (F, Q, S) int64, -1 = empty
    meta: dict[str, Any] | None = None

    @property
    def d_latent(self) -> int:
        return len(self.fires)

    def density(self) -> np.ndarray:
        return self.fires / max(self.rows_total, 1)

    def mean_activation(self) -> np.ndarray:
        return np.where(self.fires > 0, self.act_sum / np.maximum(self.fires, 1), 0.0)


def load_samples(run: Run | str | Path) -> FeatureSamples:
    """The run's samples: exact (RUN/samples) if a collect finished, else the training ones."""
    run = run if isinstance(run, Run) else open_run(run)
    exact = run.exact_samples_dir
    if (exact / COLLECT_META).exists() and (exact / SAMPLES_FILE).exists():
        meta = json.loads((exact / COLLECT_META).read_text())
        t = {k: v.numpy() for k, v in load_file(str(exact / SAMPLES_FILE)).items()}
        f, q = len(t["fires"]), meta["config"]["intervals"]
        return FeatureSamples("exact", t["top_vals"], t["top_rows"], t["fires"], t["act_sum"],
                              meta["summary"]["usable_rows"], t["act_max"], t["hist"],
                              t["interval_vals"].reshape(f, q, -1), t["interval_rows"].reshape(f, q, -1), meta)
    train = run.training_samples_dir / SAMPLES_FILE
    if train.exists():
        t = {k: v.numpy() for k, v in load_file(str(train)).items()}
        summary_file = run.training_samples_summary
        meta = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        kept = t["top_rows"] >= 0
        act_max = np.where(kept[:, 0], t["top_vals"][:, 0], 0.0).astype(np.float32)
        return FeatureSamples("training", t["top_vals"], t["top_rows"], t["observed"], t["act_sum"],
                              int(t["counters"][0]), act_max, meta=meta)
    raise UserError(f"{run} has no feature samples: run `tc samples collect --run {run}` "
                    "(or train with sampling on, --sample-every > 0)")

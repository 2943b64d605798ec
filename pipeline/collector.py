"""The during-training sample collector: per feature, the strongest activations of the batches it sees.

Every `sample_every` steps the trainer hands it the step's active pairs (TranscoderOutput rows,
cols, vals) and the batch's store rows; it keeps per feature the `n` strongest activations above
the threshold (a TopBuffer on the training device) and, when training ends, writes
RUN/activation_samples/: samples.safetensors (its state), features.json (the top features with
their contexts) and summary.json. The trainer only knows the `Collector` protocol (pipeline/train.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.contexts import contexts_for, top_tokens
from pipeline.run import SAMPLES_FILE, Run
from pipeline.store import Store
from pipeline.topn import NEG, TopBuffer
from pipeline.util import replaced_atomically, versions, write_json_atomic


@dataclass
class SampleSettings:
    """What the collector needs from the training config (TrainConfig.sample_settings() makes it)."""
    sample_every: int              # observe every N steps (0 = off)
    max_samples_per_feature: int   # kept per feature (the strongest)
    sample_threshold: float        # only activations above this
    sample_context: int            # tokens of context per written sample
    top_features: int              # features written to features.json
    samples_per_feature: int       # samples written per feature
    include_bos: bool              # BOS rows may be samples
    include_outliers: bool = False # outlier rows may be samples


def active_entries(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch position, latent, value) of every active latent: from the transcoder's
    TranscoderOutput (`rows`, `cols`, `vals`: the BatchTopK active pairs) or a dense (B, d_latent)
    tensor of activations."""
    if not isinstance(out, torch.Tensor):
        return out.rows, out.cols, out.vals
    acts = out
    pos, lat = acts.nonzero(as_tuple=True)
    return pos, lat, acts[pos, lat]


class SampleCollector:
    """During training: per feature the `n` strongest activations above `threshold` seen in the
    observed batches, as tensors on the training device. A row seen again (a second epoch) is kept
    once, with its largest activation."""

    def __init__(self, d_latent: int, n: int, threshold: float, device: str | torch.device = "cpu",
                 excluded: torch.Tensor | None = None, n_rows: int | None = None):
        self.d_latent, self.n, self.threshold = d_latent, n, float(threshold)
        self.device = torch.device(device)
        self.top = TopBuffer(d_latent, n, self.device)
        self.observed = torch.zeros(d_latent, dtype=torch.int64, device=self.device)  # fires above threshold
        self.act_sum = torch.zeros(d_latent, dtype=torch.float64, device=self.device)
        self.rows_observed = 0
        self.batches = 0
        self.last_step = -1
        # (n_rows,) bool on the device: rows never kept nor counted (BOS unless asked for); None: none
        self.excluded = excluded.to(self.device) if excluded is not None else None
        # rows that ever had a sample: a batch without any of them cannot repeat a kept row, so
        # its merge skips the (costlier) duplicate check. Unknown store size: always check.
        self.seen = torch.zeros(n_rows, dtype=torch.bool, device=self.device) if n_rows else None
        self.settings: SampleSettings | None = None   # what finish() writes by (set by make_collector)

    def observe(self, step: int, out: Any, row_ids: torch.Tensor) -> None:
        """Merge one batch. `out`: the forward output (or dense acts (B, d_latent));
        row_ids (B,) int64: the store row of each batch position."""
        with torch.no_grad():
            pos, lat, val = active_entries(out)
            row_ids = row_ids.to(self.device)
            n_rows = len(row_ids)
            if self.excluded is not None:
                n_rows -= int(self.excluded[row_ids].sum())
            self.add(row_ids[pos.to(self.device)], lat.to(self.device), val.to(self.device).float(), n_rows)
        self.last_step = int(step)

    def add(self, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, n_rows: int) -> None:
        """Entries (E,): store row, latent, activation, from a batch of n_rows usable rows."""
        keep = values > self.threshold
        if self.excluded is not None:
            keep &= ~self.excluded[rows]
        rows, latents, values = rows[keep], latents[keep], values[keep]
        self.observed += torch.bincount(latents, minlength=self.d_latent)
        self.act_sum.index_add_(0, latents, values.double())
        repeat = True
        if self.seen is not None:
            repeat = bool(self.seen[rows].any())
            self.seen[rows] = True
        self.top.merge(latents, values, rows, values, dedupe=repeat)
        self.rows_observed += n_rows
        self.batches += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain CPU tensors (safetensors- and torch.save-friendly)."""
        counters = torch.tensor([self.rows_observed, self.batches, self.last_step], dtype=torch.int64)
        top = self.top.state_dict("top_")
        del top["top_keys"]                       # the keys are the values here: not saved twice
        out = {**top, "observed": self.observed.cpu(), "act_sum": self.act_sum.cpu(), "counters": counters}
        if self.seen is not None:
            out["seen"] = self.seen.cpu()
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        keys = d["top_vals"].masked_fill(d["top_rows"] < 0, NEG)
        self.top.load_state_dict({**d, "top_keys": keys}, "top_")
        self.observed.copy_(d["observed"])
        self.act_sum.copy_(d["act_sum"])
        self.rows_observed, self.batches, self.last_step = (int(v) for v in d["counters"].tolist())
        if self.seen is not None:
            if "seen" in d and d["seen"].shape == self.seen.shape:
                self.seen.copy_(d["seen"])
            else:
                self.seen = None      # saved without it: fall back to always checking

    def merge_state(self, d: dict[str, torch.Tensor]) -> None:
        """Add another collector's state (another rank's, pipeline/ddp.py): its kept samples compete
        with these (a row kept by both once, with its larger activation), its counts add up."""
        rows, vals = d["top_rows"].to(self.device), d["top_vals"].to(self.device)
        kept = rows >= 0
        slots = torch.arange(self.d_latent, device=self.device)[:, None].expand_as(rows)[kept]
        self.top.merge(slots, vals[kept], rows[kept], vals[kept], dedupe=True)
        self.observed += d["observed"].to(self.device)
        self.act_sum += d["act_sum"].to(self.device)
        self.rows_observed += int(d["counters"][0])   # batches and last_step: every rank counts the same
        if self.seen is not None and "seen" in d:
            self.seen |= d["seen"].to(self.device)

    def finish(self, run: Run | str | Path, store: Store, settings: SampleSettings | None = None) -> Path:
        """Write RUN/activation_samples/: all kept samples (safetensors), the top features with
        their contexts (features.json) and the summary (summary.json)."""
        settings = settings or self.settings
        if settings is None:
            raise ValueError("finish() needs the sample settings (make_collector records them)")
        return write_training_samples(self, run if isinstance(run, Run) else Run(run), store, settings)


def make_collector(settings: SampleSettings, d_latent: int, device: str | torch.device,
                   store: Store | None = None) -> SampleCollector:
    """The collector the trainer is handed. With `store`, rows the settings exclude (BOS and
    outlier rows unless asked for) are never kept, even if the trainer feeds them."""
    excluded = None
    if store is not None:
        excluded = torch.from_numpy(~store.usable(settings.include_bos, settings.include_outliers))
    col = SampleCollector(d_latent, settings.max_samples_per_feature, settings.sample_threshold, device,
                          excluded, n_rows=store.n_rows if store is not None else None)
    col.settings = settings
    return col


def write_training_samples(col: SampleCollector, run: Run, store: Store, settings: SampleSettings) -> Path:
    out = run.training_samples_dir
    out.mkdir(parents=True, exist_ok=True)
    state = col.state_dict()
    with replaced_atomically(out / SAMPLES_FILE) as tmp:
        save_file(state, str(tmp))
    vals, rows = state["top_vals"], state["top_rows"]                     # (F, n)
    n_kept = (rows >= 0).sum(1)                                           # (F,)
    vmax = vals[:, 0].masked_fill(n_kept == 0, 0.0)
    # the features the researcher reads first: most samples, then strongest
    order = sorted(range(col.d_latent), key=lambda f: (-int(n_kept[f]), -float(vmax[f]), f))
    chosen = [f for f in order[:settings.top_features] if n_kept[f] > 0]
    vocab = store.vocab()
    features, all_ctx = [], []
    for f in chosen:
        k = min(int(n_kept[f]), settings.samples_per_feature)
        ctx = contexts_for(rows[f, :k].tolist(), store, settings.sample_context, vocab)
        for c, v in zip(ctx, vals[f, :k].tolist()):
            c["activation"] = v
        all_ctx += ctx
        features.append({"feature": f, "samples_kept": int(n_kept[f]), "fires_observed": int(state["observed"][f]),
                         "max_activation": float(vmax[f]),
                         "top_tokens": top_tokens(store.tokens[rows[f, :int(n_kept[f])].numpy()], vocab),
                         "samples": ctx})
    summary = training_summary(col, state, n_kept, all_ctx, features)
    meta = {"config": asdict(settings), "versions": versions(), "store": store.path}
    write_json_atomic(run.training_samples_features, {**meta, "features": features})
    write_json_atomic(run.training_samples_summary, {**meta, **summary})
    return out


def training_summary(col: SampleCollector, state: dict[str, torch.Tensor], n_kept: torch.Tensor,
                     contexts: list[dict[str, Any]], features: list[dict[str, Any]]) -> dict[str, Any]:
    kept = state["top_vals"][state["top_rows"] >= 0]
    unique = len({tuple(c["token_ids"]) for c in contexts})
    return {
        "samples_collected": int(state["observed"].sum()),   # activations above threshold observed
        "samples_kept": int(n_kept.sum()),
        "features_with_samples": int((n_kept > 0).sum()),
        "d_latent": col.d_latent,
        "batches_observed": col.batches, "rows_observed": col.rows_observed, "last_step": col.last_step,
        "activation_range": [float(kept.min()), float(kept.max())] if kept.numel() else None,
        "samples_written": len(contexts),
        "unique_contexts": unique,
        "context_diversity": unique / len(contexts) if contexts else 0.0,
        "top_tokens": {str(f["feature"]): [t["token"] for t in f["top_tokens"]] for f in features},
    }

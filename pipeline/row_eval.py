"""The store-row side of eval, without the model: FVU overall and per Matryoshka prefix, variance
explained, L0 (mean, quantiles, histogram), dead and dense latents, over whole store chunks spread
evenly across the store. Predictions come from the transcoder's own `predict_prefixes`.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.store import Store, usable_mask
from pipeline.transcoder import Transcoder
from pipeline.util import UserError


class Stopped(Exception):
    """row_metrics was asked to stop (its caller no longer wants the numbers)."""


class RowTotals:
    """Streaming sums for FVU per prefix, L0 and feature firing over store rows (float64)."""

    def __init__(self, d_out: int, d_latent: int, n_groups: int):
        self.n = 0
        self.y_sum = np.zeros(d_out)                 # per-dim sums of the target, for its variance
        self.y_sq = np.zeros(d_out)
        self.err_sq = np.zeros(n_groups)             # squared error of each prefix's prediction
        self.fired = np.zeros(d_latent, np.int64)    # rows on which each latent fired
        self.l0_hist = np.zeros(d_latent + 1, np.int64)   # rows with exactly n active latents
        self.group_active = np.zeros(n_groups)       # active latents per group, summed over rows

    def fvu(self) -> np.ndarray:
        """(G,) fraction of the target's variance (about its mean over these rows) each prefix leaves."""
        total = float((self.y_sq - self.y_sum ** 2 / max(self.n, 1)).sum())
        return self.err_sq / max(total, 1e-30)


def pick_chunks(n_chunks: int, chunk_rows: int, rows: int) -> list[int]:
    """Whole chunks, evenly spread over the store, holding about `rows` rows (never fancy indexing)."""
    want = min(n_chunks, max(1, -(-rows // chunk_rows)))
    return sorted({int(round(c)) for c in np.linspace(0, n_chunks - 1, want)})


@torch.no_grad()
def row_metrics(transcoder: Transcoder, store: Store, rows: int, device: str, dense_threshold: float,
                include_bos: bool = False, batch_rows: int = 4096, progress: bool = True,
                stop: threading.Event | None = None) -> dict[str, Any]:
    """FVU per prefix, variance explained, L0, dead and dense fractions over sampled store rows.

    Rows flagged as clamped to the fp16 range are always skipped, BOS rows unless include_bos
    (the transcoder never trained on them). Outlier rows are left out of the main numbers too, and
    measured on their own ("outliers"), so a reader sees how the transcoder does on them.
    Memory: one chunk plus (G, batch_rows, d) predictions. Raises Stopped before the next chunk
    once `stop` is set (eval computes these in a thread beside the model load, which may fail).
    """
    G = len(transcoder.groups)
    tot = RowTotals(transcoder.d_out, transcoder.d_latent, G)
    outliers = RowTotals(transcoder.d_out, transcoder.d_latent, G)
    chunks = pick_chunks(store.n_chunks, store.chunk_rows, rows)
    bar = tqdm(total=sum(b - a for a, b in map(store.chunk_range, chunks)), unit="row",
               unit_scale=True, desc="eval: store rows", disable=not progress)
    for c in chunks:
        if stop is not None and stop.is_set():
            bar.close()
            raise Stopped
        block = store.read_chunk(c)
        keep = usable_mask(block.flags, include_bos)
        outlier = usable_mask(block.flags, include_bos, include_outliers=True) & ~keep
        for totals, mask in ((tot, keep), (outliers, outlier)):
            add_block(totals, transcoder, block.source[mask], block.target[mask], device, batch_rows)
        bar.update(len(block.flags))
    bar.close()
    out = summarize_rows(tot, transcoder, dense_threshold, chunks, store)
    out["outliers"] = {"n_rows": outliers.n, "fvu": float(outliers.fvu()[-1]) if outliers.n > 1 else None}
    return out


def add_block(tot: RowTotals, transcoder: Transcoder, source: np.ndarray, target: np.ndarray,
              device: str, batch_rows: int) -> None:
    for a in range(0, len(source), batch_rows):
        x = torch.from_numpy(source[a:a + batch_rows]).float().to(device)   # (B, d_in)
        y = torch.from_numpy(target[a:a + batch_rows]).float().to(device)   # (B, d_out)
        add_rows(tot, transcoder, x, y)


def add_rows(tot: RowTotals, transcoder: Transcoder, x: torch.Tensor, y: torch.Tensor) -> None:
    B = x.shape[0]
    preds, rows, cols = transcoder.predict_prefixes(x)                      # (G, B, d_out)
    tot.n += B
    yd = y.double()
    tot.y_sum += yd.sum(0).cpu().numpy()
    tot.y_sq += (yd * yd).sum(0).cpu().numpy()
    # Each row's squared error summed in float32 (d_out terms), the rows in float64: the same
    # FVU to float32 round-off, without (G, B, d) float64 copies (a fifth of this phase's time).
    err = preds.sub_(y)                                                      # preds is not used after
    tot.err_sq += torch.linalg.vecdot(err, err).double().sum(1).cpu().numpy()
    tot.fired += torch.bincount(cols, minlength=transcoder.d_latent).cpu().numpy()
    l0 = torch.bincount(rows, minlength=B)                                      # (B,)
    tot.l0_hist += torch.bincount(l0, minlength=transcoder.d_latent + 1).cpu().numpy()[: transcoder.d_latent + 1]
    tot.group_active += torch.bincount(transcoder.group_of(cols), minlength=len(transcoder.groups)).double().cpu().numpy()


def summarize_rows(tot: RowTotals, transcoder: Transcoder, dense_threshold: float, chunks: list[int], store: Store) -> dict[str, Any]:
    if tot.n == 0:
        raise UserError(f"{store.path} has no usable rows in the sampled chunks (all BOS or clamped): "
                        "check the store, or pass --include-bos")
    fvu = tot.fvu()
    explained = 1.0 - fvu
    density = tot.fired / tot.n
    n = np.arange(len(tot.l0_hist))
    last = int(np.flatnonzero(tot.l0_hist)[-1]) if tot.l0_hist.any() else 0
    cdf = np.cumsum(tot.l0_hist) / tot.n
    quant = {f"p{q}": int(np.searchsorted(cdf, q / 100)) for q in (1, 10, 50, 90, 99)}
    dead = density == 0
    dense = density > dense_threshold
    return {
        "n_rows": tot.n, "chunks": chunks, "rows_are_training_rows": None,
        "groups": transcoder.groups, "prefix_ends": transcoder.boundaries,
        "fvu": float(fvu[-1]), "fvu_per_prefix": fvu.tolist(),
        "variance_explained_per_prefix": explained.tolist(),
        # what each group adds on top of the prefix before it
        "variance_explained_per_group": np.diff(np.concatenate([[0.0], explained])).tolist(),
        "l0": float((n * tot.l0_hist).sum() / tot.n), "l0_quantiles": quant,
        "l0_histogram": tot.l0_hist[: last + 1].tolist(),
        "l0_per_group": (tot.group_active / tot.n).tolist(),
        "dead_fraction": float(dead.mean()), "dead_features": int(dead.sum()),
        "dense_fraction": float(dense.mean()), "dense_features": int(dense.sum()),
        "dense_threshold": dense_threshold,
        "dead_per_group": [int(dead[a:b].sum()) for a, b in zip([0] + transcoder.boundaries[:-1], transcoder.boundaries)],
        "density_log10_histogram": density_histogram(density),
        **transcoder.sparsity.summary(),
    }


def density_histogram(density: np.ndarray) -> dict[str, list]:
    """Firing densities of the live latents on a log10 scale (bins of 0.5 decade from 1e-7 to 1)."""
    edges = np.arange(-7.0, 0.01, 0.5)
    live = density[density > 0]
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"log10_edges": edges.tolist(), "counts": counts.tolist()}

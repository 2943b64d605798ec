"""One evaluation for both tools' dictionaries: FVU, per-prefix FVU and L0 on the same held-out rows.

Both files are read as plain tensors (safetensors) and put in one common form, so the SAME code
encodes and decodes both; neither tool's own forward is used here (run.py cross-checks this
against each tool's own inference code).

Common form, raw (un-normalised) units, L latents:
    pre  = ((x - in_shift) / in_scale) @ W_enc + b_enc           (B, L)
    acts = pre where pre > threshold else 0   (inference rule)   or   BatchTopK(relu(pre), k * B)
    pred = (acts[:, :m] @ W_dec[:m] + b_dec) * out_scale + out_shift   for a prefix of m latents
FVU = sum ||y - pred||^2 / sum ||y - mean(y)||^2 over all held-out rows (pooled).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class Dictionary:
    W_enc: Tensor        # (d_in, L)
    b_enc: Tensor        # (L,)
    W_dec: Tensor        # (L, d_out)
    b_dec: Tensor        # (d_out,)
    threshold: Tensor    # (L,) or () inference cutoff on pre
    in_shift: Tensor     # (d_in,) or ()
    in_scale: float
    out_shift: Tensor    # (d_out,) or ()
    out_scale: float
    boundaries: list[int]   # cumulative Matryoshka prefix ends, the last == L
    k: int


def load_saelens(folder: str | Path) -> Dictionary:
    """A SAELens inference SAE folder (cfg.json + sae_weights.safetensors, saved as JumpReLU)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("architecture") != "jumprelu" or cfg.get("normalize_activations") != "none":
        raise ValueError(f"{folder}: expected a JumpReLU SAE with folded normalisation, got {cfg.get('architecture')}"
                         f" / {cfg.get('normalize_activations')}")
    w = load_file(str(folder / "sae_weights.safetensors"))
    details = cfg["metadata"]["training_architecture_details"]
    zero = torch.zeros(())
    return Dictionary(W_enc=w["W_enc"].float(), b_enc=w["b_enc"].float(), W_dec=w["W_dec"].float(),
                      b_dec=w["b_dec"].float(), threshold=w["threshold"].float(),
                      # SAELens subtracts b_dec from the input when apply_b_dec_to_input is set
                      in_shift=w["b_dec"].float() if cfg.get("apply_b_dec_to_input") else zero, in_scale=1.0,
                      out_shift=zero, out_scale=1.0,
                      boundaries=[int(v) for v in details["matryoshka_widths"]], k=int(details["k"]))


def load_tc(path: str | Path) -> Dictionary:
    """A tc transcoder file (docs/transcoder.md layout: W_enc (L, d_in), W_dec (L, d_out), norm constants)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    w = load_file(str(path))
    groups = json.loads(meta["groups"])
    return Dictionary(W_enc=w["W_enc"].float().t().contiguous(), b_enc=w["b_enc"].float(),
                      W_dec=w["W_dec"].float(), b_dec=w["b_dec"].float(), threshold=w["threshold"].float(),
                      in_shift=w["source_mean"].float(), in_scale=float(w["source_scale"]),
                      out_shift=w["target_mean"].float(), out_scale=float(w["target_scale"]),
                      boundaries=list(np.cumsum(groups).tolist()), k=int(meta["k"]))


def pre_acts(d: Dictionary, x: Tensor) -> Tensor:
    """(B, d_in) raw -> (B, L) pre-activations."""
    return ((x - d.in_shift) / d.in_scale) @ d.W_enc + d.b_enc


def threshold_acts(d: Dictionary, pre: Tensor) -> Tensor:
    return torch.where(pre > d.threshold, pre, torch.zeros_like(pre)).clamp(min=0)


def batch_topk_acts(pre: Tensor, k: int) -> Tensor:
    """Keep the k * B largest positive values of the batch (the training-time rule of both tools)."""
    flat = pre.clamp(min=0).reshape(-1)
    keep = torch.topk(flat, k * pre.shape[0], sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(pre.shape)


def decode(d: Dictionary, acts: Tensor, m: int) -> Tensor:
    """Raw prediction from the first m latents only."""
    return (acts[:, :m] @ d.W_dec[:m] + d.b_dec) * d.out_scale + d.out_shift


@torch.no_grad()
def evaluate(d: Dictionary, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> dict:
    """FVU (full and per prefix) and L0 of `d` predicting y from x, for both encoding rules.

    x: (n, d_in), y: (n, d_out) float32 raw rows. Batches of `batch` rows in order (BatchTopK
    selects within each batch, as in training)."""
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    total = float(((yt - yt.mean(0)) ** 2).sum())
    out = {}
    for rule in ("threshold", "batch_topk"):
        err = np.zeros(len(d.boundaries))
        active = 0
        for i in range(0, len(xt), batch):
            pre = pre_acts(d, xt[i:i + batch])
            acts = threshold_acts(d, pre) if rule == "threshold" else batch_topk_acts(pre, d.k)
            active += int((acts > 0).sum())
            for j, m in enumerate(d.boundaries):
                err[j] += float(((yt[i:i + batch] - decode(d, acts, m)) ** 2).sum())
        fvus = (err / total).tolist()
        out[rule] = {"fvu": fvus[-1], "fvu_prefix": fvus, "l0": active / len(xt)}
    out["rows"] = len(xt)
    out["boundaries"] = d.boundaries
    return out

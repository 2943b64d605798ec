"""Why a short tc run ends with many latents that never fire, and which change fixes it.

Trains the Gemma 3 270M layer-6 transcoder (resid_mid -> mlp_out, d 640, 5,120 latents, k 48)
for 300 steps x 1,024 rows with a minimal copy of tc's training step (Transcoder.forward on
normalised rows, loss.backward, project_decoder_grad, Adam with pipeline.train.lr_at, then
normalize_decoder), one configuration at a time, each changing one thing from tc's defaults.
All rows are held in memory (float32) and shuffled with a fixed seed, so every configuration on
the same rows sees the same batches.

For each configuration it measures, on the held-out store (licence texts, another distribution):
- fvu       whole-dictionary FVU with the model's inference rule (model.predict, raw units:
            SSE / sum of squared deviations from the held-out mean)
- fvu_g1    FVU of the first Matryoshka group alone (model.predict_prefixes)
- fvu_640   the same for the first 640 latents of a one-group dictionary (groups re-cut to 640, rest)
- dead_ho   latents never active at inference on the held-out rows
- l0_ho     mean active latents per held-out row at inference
and on the training side:
- dead_100k latents whose tokens_since_fired >= 100k at the end (tc's own counter)
- dead_tr   latents never active at inference on CAL_ROWS training rows
- ms/step   mean wall time of a training step
Diagnostics of the inference threshold (no retraining: other cutoffs for the same weights):
- btk_only  latents BatchTopK picks on held-out batches of 1,024 that never pass the threshold
- cal       one global cutoff recomputed from the final weights so that L0 = k on CAL_ROWS
            training rows (a quantile, no EMA lag)
- lat       one cutoff per latent so that each latent fires on CAL_ROWS training rows as often as
            BatchTopK made it fire there (L0 = k on those rows too)
- topk      per-row TopK(k) at inference, and batch = BatchTopK over held-out batches of 1,024

Run from the repository root; each configuration takes 1.5-3.5 minutes on 2 CPU cores shared with
other jobs (--threads 1 was faster than 2 under that load), so pick configurations with --only:
    .venv/bin/python bench/dead_latents.py --threads 1 --only plain,mat   # names: --list
    .venv/bin/python bench/dead_latents.py --threads 1                    # every configuration (~1 h)
    .venv/bin/python bench/dead_latents.py --table                        # the table from the JSON
Results merge into data/bench/dead_latents.json (one record per configuration name); final weights
go to data/bench/dead_latents/NAME.safetensors.

Rows used: not BOS, not fp16-clamped, and (unless a configuration keeps them) not outliers, i.e.
not rows whose source L2 norm is above 2.5x the median source norm of their chunk's other rows.
The rule and the normalisation statistics are computed here from the rows themselves, so the
results do not depend on which version of the store code reads the store.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.sparsity import BatchTopK, batch_topk_indices
from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, Store
from pipeline.train import lr_at, make_optimizer
from pipeline.transcoder import Transcoder, norm_constants

TRAIN_STORE = "data/demo/gemma-3-270m_l6.zarr"        # what `tc demo` caches
HELD_OUT_STORE = "data/bench/g3-l6-licenses.zarr"      # bench/run_all.sh caches it (licence texts)
OUT = "data/bench/dead_latents.json"
WEIGHTS = Path("data/bench/dead_latents")   # the final weights of each configuration
OUTLIER_FACTOR = 2.5
D_LATENT, K, BATCH, STEPS = 5120, 48, 1024, 300
MATRYOSHKA = [640, 1280, 2560, 640]
DEAD_WINDOW = 100_000     # the "dead in training" count always uses tc's default window
CAL_ROWS = 20_480         # training rows used to recalibrate cutoffs and to count dead-at-inference
EVAL_BATCH = 1024         # held-out rows per inference call (= training batch: the "batch" rule)


@dataclass
class Config:
    """One training run. Defaults are tc 0.1's (encoder init 0.1, no skip path), without outlier rows."""
    name: str
    groups: list[int] = field(default_factory=lambda: list(MATRYOSHKA))
    outliers: bool = False        # keep outlier rows in training (and in the statistics)
    norm: str = "kept"            # statistics from the rows trained on ("kept") or all usable rows ("all")
    init: str = "tied"            # tied | untied | kaiming (nn.Linear's default, decoder = its unit rows)
    init_scale: float = 0.1       # encoder row norm for tied/untied (tc 0.1: 0.1; now 0.5, --encoder-init)
    b_enc: str = "zero"           # zero | uniform (nn.Linear's default bias) | cut (minus the first cutoff)
    rule: str = "batchtopk"       # batchtopk | topk (per-row TopK in training and at inference)
    aux_k: int = 512
    aux_coef: float = 1 / 32
    dead_tokens: int = 100_000
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.01
    prefix_weights: list[float] | None = None   # None: tc's mean of the prefix MSEs
    unit_decoder: bool = True     # tc keeps decoder rows at unit norm; sparsify's transcoder does not
    topk_steps: int = 0           # BatchTopK's per_row_batches: per-row TopK for this many first steps
    row_min: int = 0              # BatchTopK in training, but every row keeps at least its row_min largest
    seed: int = 0


def plain(name: str, **kw) -> Config:
    return Config(name, groups=[D_LATENT], **kw)


def mat(name: str, **kw) -> Config:
    return Config(name, **kw)


# Run in this order: baselines, then one change at a time (mostly on plain BatchTopK, where the
# dead count is largest), then combinations. Names ending in -o keep the outlier rows.
CONFIGS = [
    plain("plain-o", outliers=True, norm="all"),
    mat("mat-o", outliers=True, norm="all"),
    plain("plain"),
    mat("mat"),
    plain("plain-normall", norm="all"),
    plain("plain-init0.3", init_scale=0.3),
    plain("plain-init0.5", init_scale=0.5),
    plain("plain-init0.7", init_scale=0.7),
    plain("plain-init1", init_scale=1.0),
    plain("plain-kaiming", init="kaiming"),
    plain("plain-untied", init="untied"),
    plain("plain-aux1/8", aux_coef=1 / 8),
    plain("plain-aux1/2", aux_coef=1 / 2),
    plain("plain-auxk256", aux_k=256),
    plain("plain-auxk1024", aux_k=1024),
    plain("plain-dead10k", dead_tokens=10_000),
    plain("plain-dead20k", dead_tokens=20_000),
    plain("plain-dead50k", dead_tokens=50_000),
    plain("plain-topk", rule="topk"),
    mat("mat-topk", rule="topk"),
    plain("plain-freedec", unit_decoder=False),
    # sparsify's recipe inside tc's code: per-row TopK, nn.Linear init, free decoder norms, and AuxK
    # that never starts in 300 steps (its 10M-token dead threshold)
    plain("plain-sparsifylike", rule="topk", init="kaiming", unit_decoder=False, dead_tokens=10_000_000),
    plain("plain-benc", b_enc="uniform"),
    plain("plain-init1-bcut", init_scale=1.0, b_enc="cut"),
    plain("plain-kaiming-bcut", init="kaiming", b_enc="cut"),
    mat("mat-init1-bcut", init_scale=1.0, b_enc="cut"),
    # combinations
    mat("mat-init0.5", init_scale=0.5),
    mat("mat-init0.7", init_scale=0.7),
    mat("mat-init1", init_scale=1.0),
    plain("plain-init1-dead10k", init_scale=1.0, dead_tokens=10_000),
    plain("plain-init1-topk", init_scale=1.0, rule="topk"),
    mat("mat-init1-dead10k", init_scale=1.0, dead_tokens=10_000),
    plain("plain-topk-dead10k", rule="topk", dead_tokens=10_000),
    mat("mat-init1-topk", init_scale=1.0, rule="topk"),
    plain("plain-lr1e-3", lr=1e-3),
    plain("plain-lr5e-3", lr=5e-3),
    # at the default init (0.5): a smaller AuxK (aux_k 64 costs about a tenth of 512's pairs), and
    # per-token TopK (the "topk" sparsity rule, tc train --sparsity topk)
    plain("plain-init0.5-auxk64", init_scale=0.5, aux_k=64),
    mat("mat-init0.5-auxk64", init_scale=0.5, aux_k=64),
    plain("plain-init0.5-topk", init_scale=0.5, rule="topk"),
    mat("mat-init0.5-topk", init_scale=0.5, rule="topk"),
    plain("plain-init0.7-topk", init_scale=0.7, rule="topk"),
    # why plain BatchTopK trails per-token TopK at init 0.5: the batch-wide budget early in training
    plain("plain-init0.5-tk30", init_scale=0.5, topk_steps=30),
    plain("plain-init0.5-tk100", init_scale=0.5, topk_steps=100),
    plain("plain-init0.5-tk200", init_scale=0.5, topk_steps=200),
    plain("plain-init0.3-tk100", init_scale=0.3, topk_steps=100),
    plain("plain-init0.1-tk100", init_scale=0.1, topk_steps=100),
    plain("plain-init0.5-rowmin16", init_scale=0.5, row_min=16),
    plain("plain-init0.5-dead10k", init_scale=0.5, dead_tokens=10_000),
    plain("plain-init0.5-warm100", init_scale=0.5, warmup=100),
    plain("plain-init0.6-tk30", init_scale=0.6, topk_steps=30),
    plain("plain-init0.7-tk30", init_scale=0.7, topk_steps=30),
    plain("plain-init0.7-tk100", init_scale=0.7, topk_steps=100),
    plain("plain-init0.7-rowmin16", init_scale=0.7, row_min=16),
    plain("plain-init0.5-tk10", init_scale=0.5, topk_steps=10),
    plain("plain-init0.7-tk10", init_scale=0.7, topk_steps=10),
    mat("mat-init0.5-tk30", init_scale=0.5, topk_steps=30),
    mat("mat-init0.7-tk30", init_scale=0.7, topk_steps=30),
    mat("mat-init0.6-tk30", init_scale=0.6, topk_steps=30),
    plain("plain-init0.6", init_scale=0.6),
]


# ----------------------------------------------------------------------------- data

def chunk_outliers(source: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Usable rows of one chunk whose source norm exceeds OUTLIER_FACTOR x the chunk's median."""
    norms = np.linalg.norm(source.astype(np.float32), axis=1)
    if not usable.any():
        return np.zeros(len(usable), dtype=bool)
    return usable & (norms > OUTLIER_FACTOR * np.median(norms[usable]))


def load_rows(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All usable rows of a store as float32 (source, target), and which of them are outliers."""
    store = Store(path)
    # the raw flag array: BOS and clamped rows out; the outlier rule is applied below, ourselves
    flags = store.group["flags"][: store.n_rows]
    usable = (flags & (FLAG_BOS | FLAG_OVERFLOW)) == 0
    xs, ys, outs = [], [], []
    for c in range(store.n_chunks):
        rows = store.read_chunk(c)
        use = usable[rows.start: rows.start + len(rows.flags)]
        outs.append(chunk_outliers(rows.source, use)[use])
        xs.append(rows.source[use].astype(np.float32))
        ys.append(rows.target[use].astype(np.float32))
    return (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
            torch.from_numpy(np.concatenate(outs)))


def row_stats(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-dim mean and variance of both sides, in the shape Store.stats() has (for norm_constants)."""
    out = {}
    for side, a in (("source", x), ("target", y)):
        a = a.double()
        out[side] = {"mean": a.mean(0).numpy(), "var": a.var(0, unbiased=False).numpy()}
    return out


# ----------------------------------------------------------------------------- sparsity rules

def row_topk_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of each row's k largest positive pre-activations."""
    top = pre.topk(k, dim=1)
    base = torch.arange(pre.shape[0], device=pre.device)[:, None] * pre.shape[1]
    flat = (base + top.indices)[top.values > 0]
    return flat.sort().values


class Probe(BatchTopK):
    """tc's BatchTopK, unchanged in training (or per-row TopK when per_row), whose inference cutoff
    can be switched (`mode`) so several cutoffs are measured on the same weights."""

    def __init__(self, k: int, per_row: bool = False, row_min: int = 0, per_row_batches: int = 0):
        super().__init__(k, per_row_batches=per_row_batches)
        self.per_row = per_row
        self.row_min = row_min
        self.mode = "topk" if per_row else "ema"
        self.last_cut = 0.0          # the last training batch's smallest kept activation
        self.global_cut = None       # () recalibrated cutoff ("cal")
        self.latent_cut = None       # (L,) per-latent cutoffs ("lat")

    def training_indices(self, pre: torch.Tensor) -> torch.Tensor:
        if self.per_row:
            return row_topk_indices(pre, self.k)
        if self.row_min:
            # every row's row_min largest, then the rest of the batch budget batch-wide
            base = row_topk_indices(pre, self.row_min)
            flat = pre.reshape(-1).clone()
            flat[base] = -1.0
            rest = batch_topk_indices(flat, (self.k - self.row_min) * pre.shape[0])
            self.rest_cut = flat[rest].min() if len(rest) else flat.new_zeros(())
            return torch.cat([base, rest]).sort().values
        return super().training_indices(pre)

    def observe(self, vals: torch.Tensor) -> None:
        if self.row_min:             # the threshold learns the batch-wide part's cutoff only
            vals = vals[vals >= self.rest_cut]
        super().observe(vals)        # tc's EMA, so the "ema" cutoff is exactly what tc would save
        if len(vals):
            self.last_cut = float(vals.min())

    def inference_indices(self, pre: torch.Tensor) -> torch.Tensor:
        if self.mode == "ema":
            return super().inference_indices(pre)
        if self.mode == "topk":
            return row_topk_indices(pre, self.k)
        if self.mode == "batch":
            return batch_topk_indices(pre.reshape(-1), self.k * pre.shape[0])
        cut = self.global_cut if self.mode == "cal" else self.latent_cut
        return (pre > cut).reshape(-1).nonzero().squeeze(1)


# ----------------------------------------------------------------------------- model

def build(cfg: Config, stats: dict, d: int) -> Transcoder:
    rule = Probe(K, per_row=cfg.rule == "topk", row_min=cfg.row_min, per_row_batches=cfg.topk_steps)
    model = Transcoder(d, d, cfg.groups, aux_k=cfg.aux_k, aux_coef=cfg.aux_coef, dead_tokens=cfg.dead_tokens,
                       seed=cfg.seed, sparsity=rule, encoder_init=cfg.init_scale)
    reinit(model, cfg)
    n = norm_constants(stats)
    model.set_normalization(n["source_mean"], n["source_scale"], n["target_mean"], n["target_scale"])
    return model


@torch.no_grad()
def reinit(model: Transcoder, cfg: Config) -> None:
    """The init variants that Transcoder's constructor does not offer."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bound = 1 / math.sqrt(model.d_in)   # nn.Linear's default (Kaiming-uniform, a = sqrt(5)) bound
    if cfg.init == "untied":
        w = torch.randn(model.W_enc.shape, generator=gen)
        model.W_enc.copy_(w / w.norm(dim=1, keepdim=True) * cfg.init_scale)
    elif cfg.init == "kaiming":
        # sparsify's init: encoder rows of norm ~0.58, decoder = the same directions at unit norm
        w = torch.empty(model.W_enc.shape).uniform_(-bound, bound, generator=gen)
        model.W_enc.copy_(w)
        model.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
    if cfg.b_enc == "uniform":
        model.b_enc.uniform_(-bound, bound, generator=gen)


@torch.no_grad()
def bias_at_first_cut(model: Transcoder, x_raw: torch.Tensor) -> None:
    """b_enc = minus the BatchTopK cutoff of one batch at init: the same latents are picked (a shared
    bias does not change the ranking) but their first values start near 0, so a large encoder init
    does not start with large random codes (the noise that makes a large init learn slowly)."""
    pre = model._pre(model.normalize_source(x_raw))
    kept = batch_topk_indices(pre.reshape(-1), K * len(x_raw))
    model.b_enc.fill_(-float(pre.reshape(-1)[kept].min()))


# ----------------------------------------------------------------------------- training

def batch_order(n_rows: int, seed: int) -> torch.Tensor:
    """STEPS x BATCH row indices: passes over the rows, each a fresh seeded permutation."""
    passes = -(-STEPS * BATCH // n_rows)
    perms = [torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000 + p))
             for p in range(passes)]
    return torch.cat(perms)[: STEPS * BATCH].view(STEPS, BATCH)


def step_loss(model: Transcoder, out, cfg: Config) -> torch.Tensor:
    if cfg.prefix_weights is None:
        return out.loss           # tc's loss: mean of prefix MSEs + aux_coef * AuxK
    w = torch.tensor(cfg.prefix_weights)
    return (w * out.mse).sum() + model.aux_coef * out.aux_loss


def train(model: Transcoder, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> dict:
    """tc's train_step, STEPS times; returns step times and a coarse training curve."""
    opt = make_optimizer(model, cfg.lr, torch.device("cpu"))   # tc's Adam (fused where available)
    order = batch_order(len(x), seed=0)
    ever = torch.zeros(model.d_latent, dtype=torch.bool)
    times, curve = [], []
    model.train()
    for step in range(STEPS):
        t0 = time.perf_counter()
        lr = lr_at(step, STEPS, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = order[step]
        out = model(model.normalize_source(x[idx]), model.normalize_target(y[idx]))
        opt.zero_grad(set_to_none=True)
        step_loss(model, out, cfg).backward()
        if cfg.unit_decoder:
            model.project_decoder_grad()
        opt.step()
        if cfg.unit_decoder:
            model.normalize_decoder()
        times.append(time.perf_counter() - t0)
        ever[out.cols] = True
        if (step + 1) % 50 == 0 or step == 0:
            curve.append(curve_point(model, out, step + 1, ever))
    return {"step_s": times, "curve": curve}


def curve_point(model: Transcoder, out, step: int, ever: torch.Tensor) -> dict:
    return {"step": step, "fvu": float(out.fvu), "aux": float(out.aux_loss.detach()),
            "threshold": float(model.sparsity.threshold), "batch_cut": model.sparsity.last_cut,
            "dead_100k": int((model.tokens_since_fired >= DEAD_WINDOW).sum()),
            "ever_fired": int(ever.sum())}


# ----------------------------------------------------------------------------- cutoffs from final weights

@torch.no_grad()
def calibrate(model: Transcoder, x_cal: torch.Tensor) -> dict:
    """BatchTopK over CAL_ROWS training rows in training-size batches with the final weights; from it a
    global cutoff (L0 = k on these rows) and per-latent cutoffs (each latent's BatchTopK firing count)."""
    pre = torch.cat([model._pre(model.normalize_source(x_cal[a:a + BATCH]))
                     for a in range(0, len(x_cal), BATCH)])                     # (N, L)
    n, L = pre.shape
    counts = torch.zeros(L, dtype=torch.int64)
    for a in range(0, n, BATCH):
        idx = batch_topk_indices(pre[a:a + BATCH].reshape(-1), K * min(BATCH, n - a))
        counts += torch.bincount(idx % L, minlength=L)
    flat = pre.reshape(-1)
    global_cut = flat.kthvalue(flat.numel() - K * n).values              # K*n values lie above it
    # per latent: the (count+1)-th largest value, so `count` rows lie above it
    desc = np.sort(pre.t().contiguous().numpy(), axis=1)[:, ::-1]
    latent_cut = torch.from_numpy(desc[np.arange(L), np.minimum(counts.numpy(), n - 1)].copy())
    # the model's own inference rule on these rows: tc's EMA cutoff, or per-row TopK
    if model.sparsity.per_row:
        own = torch.zeros_like(pre, dtype=torch.bool).view(-1)
        own[row_topk_indices(pre, K)] = True
        own = own.view(n, L)
    else:
        own = pre > model.sparsity.threshold
    return {"global_cut": global_cut, "latent_cut": latent_cut, "btk_counts": counts,
            "own_active": own.any(0), "own_l0": float(own.sum()) / n}


# ----------------------------------------------------------------------------- held-out evaluation

class Totals:
    """Sums for one inference rule over the held-out rows."""

    def __init__(self, L: int):
        self.sse = self.sse_g1 = 0.0
        self.nnz = 0
        self.fires = torch.zeros(L, dtype=torch.int64)

    def add(self, y: torch.Tensor, pred: torch.Tensor, pred_g1: torch.Tensor, cols: torch.Tensor) -> None:
        self.sse += float((y - pred).double().pow(2).sum())
        self.sse_g1 += float((y - pred_g1).double().pow(2).sum())
        self.nnz += len(cols)
        self.fires += torch.bincount(cols, minlength=len(self.fires))

    def summary(self, total_var: float, n_rows: int) -> dict:
        L = len(self.fires)
        return {"fvu": self.sse / total_var, "fvu_g1": self.sse_g1 / total_var, "l0": self.nnz / n_rows,
                "dead": int((self.fires == 0).sum()) / L, "rare": int((self.fires < 10).sum()) / L}


@torch.no_grad()
def rule_predictions(model: Transcoder, pre: torch.Tensor, B: int):
    """(full, first group, cols) for the probe's current mode, decoded by the model's decode_prefixes
    from pre-activations already computed (the same steps as predict_prefixes)."""
    rows, cols = model._select(pre, use_threshold=True)
    preds = model.denormalize_target(model.decode_prefixes(rows, cols, pre[rows, cols], B))
    return preds[-1], preds[0], cols


@torch.no_grad()
def evaluate(model: Transcoder, x: torch.Tensor, y: torch.Tensor, alt_modes: list[str]) -> dict:
    """The model's own rule through predict / predict_prefixes, other cutoffs from shared pre."""
    probe, L = model.sparsity, model.d_latent
    own = probe.mode
    totals = {m: Totals(L) for m in [own] + alt_modes}
    for a in range(0, len(x), EVAL_BATCH):
        xb, yb = x[a:a + EVAL_BATCH], y[a:a + EVAL_BATCH]
        full = model.predict(xb)
        prefixes, _, cols = model.predict_prefixes(xb)
        totals[own].add(yb, full, prefixes[0], cols)
        pre = model._pre(model.normalize_source(xb))
        for m in alt_modes:
            probe.mode = m
            totals[m].add(yb, *rule_predictions(model, pre, len(xb)))
        probe.mode = own
    total_var = float((y.double() - y.double().mean(0)).pow(2).sum())
    out = {m: t.summary(total_var, len(x)) for m, t in totals.items()}
    batch = totals.get("batch")
    if batch is not None and own == "ema":
        out["btk_only"] = int(((batch.fires > 0) & (totals["ema"].fires == 0)).sum())
    return out


@torch.no_grad()
def first_latents_fvu(model: Transcoder, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """FVU of a one-group dictionary's first n latents alone (what a Matryoshka first group is
    compared with), through predict_prefixes with the groups re-cut to [n, rest]."""
    groups = model.groups
    model.set_groups([n, model.d_latent - n])
    sse = 0.0
    for a in range(0, len(x), EVAL_BATCH):
        preds, _, _ = model.predict_prefixes(x[a:a + EVAL_BATCH])
        sse += float((y[a:a + EVAL_BATCH] - preds[0]).double().pow(2).sum())
    model.set_groups(groups)
    return sse / float((y.double() - y.double().mean(0)).pow(2).sum())


# ----------------------------------------------------------------------------- one configuration

def run_config(cfg: Config, data: dict) -> dict:
    x, y = data["train_all"] if cfg.outliers else data["train_kept"]
    stats = data["stats_all"] if cfg.norm == "all" else data["stats_kept"]
    torch.manual_seed(cfg.seed)
    model = build(cfg, stats, x.shape[1])
    if cfg.b_enc == "cut":
        bias_at_first_cut(model, x[batch_order(len(x), seed=0)[0]])
    t0 = time.perf_counter()
    log = train(model, x, y, cfg)
    train_s = time.perf_counter() - t0
    model.eval()
    cal = calibrate(model, data["cal"])
    model.sparsity.global_cut, model.sparsity.latent_cut = cal["global_cut"], cal["latent_cut"]
    alt = ["ema", "cal", "lat", "batch"] if cfg.rule == "topk" else ["cal", "lat", "topk", "batch"]
    held = evaluate(model, *data["held_out"], alt)
    r = summarize(cfg, model, log, cal, held, train_s)
    # a plain dictionary's first MATRYOSHKA[0] latents, for comparison with a first group
    r["fvu_first"] = (first_latents_fvu(model, *data["held_out"], MATRYOSHKA[0]) if len(cfg.groups) == 1
                      else r["fvu_g1"])
    model.save(WEIGHTS / (cfg.name.replace("/", "_") + ".safetensors"))   # for later analysis
    return r


def summarize(cfg: Config, model: Transcoder, log: dict, cal: dict, held: dict, train_s: float) -> dict:
    own = held[model.sparsity.mode]
    dead_100k = model.tokens_since_fired >= DEAD_WINDOW
    norms = model.W_enc.detach().norm(dim=1)
    never = cal["btk_counts"] == 0
    return {"config": dataclasses.asdict(cfg), "fvu": own["fvu"], "fvu_g1": own["fvu_g1"],
            "dead_ho": own["dead"], "rare_ho": own["rare"], "l0_ho": own["l0"],
            "dead_100k": float(dead_100k.float().mean()),
            "dead_tr": float((~cal["own_active"]).float().mean()), "l0_tr": cal["own_l0"],
            "dead_btk_tr": float(never.float().mean()),
            "threshold": float(model.sparsity.threshold), "last_batch_cut": model.sparsity.last_cut,
            "global_cut": float(cal["global_cut"]),
            "enc_norm_alive": float(norms[~dead_100k].median()) if (~dead_100k).any() else None,
            "enc_norm_dead": float(norms[dead_100k].median()) if dead_100k.any() else None,
            "rules": held, "btk_only": held.get("btk_only"),
            "ms_step": 1000 * float(np.mean(log["step_s"])), "train_s": train_s, "curve": log["curve"]}


# ----------------------------------------------------------------------------- table and files

COLUMNS = [("config", 15, lambda r: r["config"]["name"]), ("fvu", 6, lambda r: f"{r['fvu']:.4f}"),
           ("fvu_g1", 6, lambda r: f"{r['fvu_g1']:.4f}"),
           ("fvu_640", 7, lambda r: f"{r['fvu_first']:.4f}" if "fvu_first" in r else "-"), ("dead_ho", 7, lambda r: pct(r["dead_ho"])),
           ("dead_tr", 7, lambda r: pct(r["dead_tr"])), ("dead100k", 8, lambda r: pct(r["dead_100k"])),
           ("l0_ho", 5, lambda r: f"{r['l0_ho']:.1f}"), ("l0_tr", 5, lambda r: f"{r['l0_tr']:.1f}"),
           ("btk_only", 8, lambda r: "-" if r["btk_only"] is None else str(r["btk_only"])),
           ("fvu_cal", 7, lambda r: alt(r, "cal", "fvu")), ("l0_cal", 6, lambda r: alt(r, "cal", "l0")),
           ("dead_cal", 8, lambda r: alt(r, "cal", "dead")), ("fvu_lat", 7, lambda r: alt(r, "lat", "fvu")),
           ("l0_lat", 6, lambda r: alt(r, "lat", "l0")), ("dead_lat", 8, lambda r: alt(r, "lat", "dead")),
           ("fvu_btk", 7, lambda r: alt(r, "batch", "fvu")), ("dead_btk", 8, lambda r: alt(r, "batch", "dead")),
           ("ms/step", 7, lambda r: f"{r['ms_step']:.0f}")]


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def alt(r: dict, mode: str, key: str) -> str:
    v = r["rules"].get(mode, {}).get(key)
    if v is None:
        return "-"
    return pct(v) if key == "dead" else (f"{v:.1f}" if key == "l0" else f"{v:.4f}")


def header() -> str:
    return "  ".join(name.rjust(w) for name, w, _ in COLUMNS)


def table_row(r: dict) -> str:
    return "  ".join(f(r).rjust(w) for _, w, f in COLUMNS)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(path: Path, r: dict) -> None:
    results = load_results(path)
    results[r["config"]["name"]] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def prepare_data(train_store: str, held_out_store: str) -> dict:
    t0 = time.perf_counter()
    x, y, outlier = load_rows(train_store)
    xh, yh, out_h = load_rows(held_out_store)
    kept = (x[~outlier], y[~outlier])
    # training rows for the recalibrated cutoffs: a fixed sample of the rows trained on (no outliers)
    cal_idx = torch.randperm(len(kept[0]), generator=torch.Generator().manual_seed(123))[:CAL_ROWS]
    data = {"train_all": (x, y), "train_kept": kept, "held_out": (xh[~out_h], yh[~out_h]),
            "stats_all": row_stats(x, y), "stats_kept": row_stats(*kept), "cal": kept[0][cal_idx]}
    share = float(norm_sq(x[outlier]) / norm_sq(x - x.mean(0)))
    print(f"train rows {len(x):,} usable, {int(outlier.sum())} outliers ({100 * share:.0f}% of source "
          f"sum of squares about the mean); held-out {len(xh):,} usable, {int(out_h.sum())} outliers; "
          f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    return data


def norm_sq(a: torch.Tensor) -> float:
    return float(a.double().pow(2).sum())


def main() -> None:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--list", action="store_true", help="print the configuration names")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--train-store", default=TRAIN_STORE)
    ap.add_argument("--held-out-store", default=HELD_OUT_STORE, help="a store of another text, same model and layer")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 was 2-3x faster than 2 while other jobs loaded the 2 cores)")
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps (300; fewer for a smoke test)")
    args = ap.parse_args()
    STEPS = args.steps
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.list:
        print("\n".join(c.name for c in CONFIGS))
        return
    if args.table:
        print(header())
        for r in load_results(out).values():
            print(table_row(r))
        return
    names = args.only.split(",") if args.only else [c.name for c in CONFIGS]
    by_name = {c.name: c for c in CONFIGS}
    chosen = [by_name[n] for n in names if n in by_name]      # in the order given
    missing = set(names) - set(by_name)
    if missing:
        raise SystemExit(f"unknown configuration(s): {', '.join(sorted(missing))} (see --list)")
    data = prepare_data(args.train_store, args.held_out_store)
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    print(header(), flush=True)
    for cfg in chosen:
        t0 = time.perf_counter()
        r = run_config(cfg, data)
        r["wall_s"] = time.perf_counter() - t0
        save_result(out, r)
        print(table_row(r), f"({r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""Evaluation: how faithful a trained transcoder is, measured two ways (method in docs/eval.md).

1. Spliced into the model, on held-out text: the language model's next-token cross-entropy
   clean, with the layer's MLP output replaced by the transcoder's prediction from the same
   forward pass's source activation, and with the MLP output zero-ablated; the fraction of loss
   recovered, the CE increase and the KL divergence of the spliced model from the clean one.
2. On store rows, without the model: FVU overall and per Matryoshka prefix, variance explained,
   L0 (mean and histogram), dead and dense feature fractions.

Held-out text: when the text source is the store's own, the store's sequences are re-packed from
the same deterministic stream (and checked token for token against the store), every document
they touched is skipped, and the evaluation text starts at the next untouched document.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, Store
from pipeline.train import load_transcoder, require_run, run_config
from pipeline.util import (UserError, opt, parse_count, pick_device, replaced_atomically, versions, write_config_toml,
                           write_json_atomic)

# A replacement for the MLP output: (source (B, T, d), clean target (B, T, d)) -> new target (B, T, d).
# The transcoder is one; the tests splice the identity and zeros through the same code.
Replacement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOGITS_BUDGET = 128 * 2 ** 20   # logits elements per forward batch when --batch-size is not given (512 MB fp32)
SCORE_CHUNK = 128               # positions per CE/KL chunk: bounds the float32 (chunk, vocab) temporaries
DENSE_DEFAULT = 0.1


@dataclass
class EvalConfig:
    run: str | None = opt(None, "Run folder made by `tc train` (holds config.json and transcoder.safetensors).", "Input")
    cache: str | None = opt(None, "Store for the row metrics (default: the store the run trained on).", "Input")
    model: str | None = opt(None, "Model to splice the transcoder into (default: the store's model).", "Model")
    dataset: str | None = opt(None, "Text for the language-model loss (default: the store's dataset, continuing after the text the store holds).", "Text")
    dataset_config: str | None = opt(None, "HF dataset config name (default: the store's when --dataset is the store's).", "Text")
    split: str | None = opt(None, "HF dataset split (default: the store's).", "Text")
    text_column: str | None = opt(None, "Column that holds the text (default: the store's).", "Text")
    tokens: int = opt(100_000, "Held-out tokens for the language-model loss (100k, 1M); rounded up to whole sequences.", "Text", parse=parse_count)
    seq_len: int | None = opt(None, "Tokens per held-out sequence, BOS included (default: the store's).", "Text")
    include_bos: bool = opt(False, "Also replace the MLP output at BOS positions and score the predictions made from them.", "Text")
    lm_loss: bool = opt(True, "Measure the model's loss with the transcoder spliced in (needs the model); --no-lm-loss for the store-row metrics only.", "Text")
    rows: int = opt(200_000, "Store rows (whole chunks spread over the store) for FVU, L0, dead and dense features.", "Store rows", parse=parse_count)
    dense_threshold: float = opt(DENSE_DEFAULT, "A feature is dense when it fires on more than this fraction of the evaluated rows.", "Store rows")
    batch_size: int | None = opt(None, "Sequences per forward pass (default: as many as keep one batch's logits near 512 MB).", "Compute")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")
    dtype: str = opt("auto", "Model compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.", "Compute")


# ============================================================================ the math

def fraction_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float | None:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 = as good as the MLP, 0 = as bad as no MLP.

    None when zero-ablation does not change the loss (the ratio means nothing then).
    """
    gap = ce_zero - ce_clean
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        return None
    return (ce_zero - ce_spliced) / gap


def score_mask(tokens: torch.Tensor, bos_id: int, include_bos: bool) -> torch.Tensor:
    """(B, T-1) bool: which next-token predictions count. Position t predicts token t+1.

    A prediction whose target is BOS is never scored (BOS is a document separator the packing
    inserted, not text). Predictions made from a BOS position are scored only with include_bos:
    by default the MLP output there is left clean, so they would only dilute the differences.
    """
    keep = tokens[:, 1:] != bos_id
    if not include_bos:
        keep &= tokens[:, :-1] != bos_id
    return keep


def position_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    ref_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per scored position: next-token CE (N,), and KL(ref || this) (N,) when ref_logits is given.

    logits, ref_logits: (B, T, V) in any float dtype; tokens (B, T); mask (B, T-1) from score_mask.
    Works on SCORE_CHUNK positions at a time in float32 so a 256k vocabulary never needs a full
    (B, T, V) float32 temporary. With lse = logsumexp of the logits l and p = softmax(l_ref):
    CE = lse - l[target] and KL = sum_v p (l_ref - l) - lse_ref + lse (no log-softmax tensors).
    """
    b_idx, t_idx = mask.nonzero(as_tuple=True)          # (N,), (N,)
    targets = tokens[b_idx, t_idx + 1]                  # (N,)
    ce, kl = [], []
    for a in range(0, len(b_idx), SCORE_CHUNK):
        sl = slice(a, a + SCORE_CHUNK)
        lg = logits[b_idx[sl], t_idx[sl]].float()                       # (n, V)
        lse = torch.logsumexp(lg, dim=-1)                               # (n,)
        ce.append(lse - lg.gather(1, targets[sl, None]).squeeze(1))
        if ref_logits is not None:
            ref = ref_logits[b_idx[sl], t_idx[sl]].float()              # (n, V), a copy (advanced indexing)
            lse_ref = torch.logsumexp(ref, dim=-1)
            diff = ref - lg
            p_ref = ref.sub_(lse_ref[:, None]).exp_()                   # in place: one (n, V) buffer fewer
            kl.append((torch.linalg.vecdot(p_ref, diff) - lse_ref + lse).clamp_min(0.0))
    empty = logits.new_zeros(0, dtype=torch.float32)
    ce_all = torch.cat(ce) if ce else empty
    kl_all = (torch.cat(kl) if kl else empty) if ref_logits is not None else None
    return ce_all, kl_all


# ============================================================================ splicing

def splice_hooks(source_hook: str, target_hook: str, replace: Replacement,
                 keep_clean: torch.Tensor | None) -> list[tuple[str, Callable]]:
    """Forward hooks that put replace(source, clean target) in place of the target activation.

    The source is read from the same forward pass (it is upstream of the target, so it is the
    clean model's source). keep_clean (B, T) bool marks positions whose clean target is kept
    (BOS by default: the transcoder never trained on BOS rows).
    """
    seen: dict[str, torch.Tensor] = {}

    def read_source(tensor: torch.Tensor, hook: Any) -> None:
        seen["source"] = tensor

    def write_target(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        new = replace(seen["source"], tensor).to(dtype=tensor.dtype, device=tensor.device)   # (B, T, d)
        if new.shape != tensor.shape:
            raise RuntimeError(f"the replacement returned shape {tuple(new.shape)}, expected {tuple(tensor.shape)}")
        if keep_clean is not None:
            new = torch.where(keep_clean[..., None], tensor, new)
        return new

    return [(source_hook, read_source), (target_hook, write_target)]


def identity_replacement(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The true MLP output: splicing it must leave the model unchanged."""
    return target


def zero_replacement(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zero-ablation of the MLP output."""
    return torch.zeros_like(target)


def transcoder_replacement(transcoder: Any) -> Replacement:
    """The transcoder's prediction of the target from the source, row by row (threshold encoding)."""
    def replace(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        flat = source.reshape(-1, source.shape[-1]).float()          # (B*T, d)
        return transcoder.predict(flat).reshape(target.shape)
    return replace


class LossTotals:
    """Running sums for one way of running the model (clean, spliced, zero, ...)."""

    def __init__(self) -> None:
        self.n = 0
        self.ce = 0.0
        self.kl = 0.0
        self.diff = 0.0      # sum of (CE - CE_clean) per position, and its square, for a standard error
        self.diff_sq = 0.0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None, ce_clean: torch.Tensor) -> None:
        d = (ce - ce_clean).double()
        self.n += len(ce)
        self.ce += float(ce.double().sum())
        self.kl += float(kl.double().sum()) if kl is not None else 0.0
        self.diff += float(d.sum())
        self.diff_sq += float((d * d).sum())

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        mean_diff = self.diff / n
        var = max(self.diff_sq / n - mean_diff ** 2, 0.0)
        return {"ce": self.ce / n, "kl": self.kl / n, "ce_increase": mean_diff,
                "ce_increase_stderr": math.sqrt(var / max(self.n - 1, 1))}


@torch.no_grad()
def score_batch(model: Any, tokens: torch.Tensor, source_hook: str, target_hook: str,
                replacements: dict[str, Replacement], bos_id: int, include_bos: bool,
                totals: dict[str, LossTotals]) -> None:
    """Run `tokens` (B, T) clean and once per replacement; add CE and KL(clean || replaced) to totals."""
    mask = score_mask(tokens, bos_id, include_bos)                     # (B, T-1)
    keep_clean = None if include_bos else tokens == bos_id             # (B, T)
    clean_logits = model(tokens, return_type="logits")                 # (B, T, V)
    ce_clean, _ = position_losses(clean_logits, tokens, mask)
    totals.setdefault("clean", LossTotals()).add(ce_clean, torch.zeros_like(ce_clean), ce_clean)
    for name, replace in replacements.items():
        hooks = splice_hooks(source_hook, target_hook, replace, keep_clean)
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
        ce, kl = position_losses(logits, tokens, mask, ref_logits=clean_logits)
        del logits
        totals.setdefault(name, LossTotals()).add(ce, kl, ce_clean)


def lm_losses(model: Any, sequences: np.ndarray, source_hook: str, target_hook: str,
              replacements: dict[str, Replacement], bos_id: int, include_bos: bool, batch_size: int,
              device: str, progress: bool = True) -> dict[str, dict[str, float]]:
    """Mean CE, KL from clean and CE increase per replacement over `sequences` (n, T) int64."""
    totals: dict[str, LossTotals] = {}
    bar = tqdm(total=sequences.size, unit="tok", unit_scale=True, desc="eval: LM loss", disable=not progress)
    for a in range(0, len(sequences), batch_size):
        batch = torch.from_numpy(sequences[a:a + batch_size]).long().to(device)
        score_batch(model, batch, source_hook, target_hook, replacements, bos_id, include_bos, totals)
        bar.update(batch.numel())
    bar.close()
    out = {name: t.summary() for name, t in totals.items()}
    out["clean"]["n_scored"] = totals["clean"].n
    return out


def splice_report(losses: dict[str, dict[str, float]], spliced: str = "spliced", zero: str = "zero") -> dict[str, Any]:
    """The headline numbers from lm_losses' output."""
    c, s, z = losses["clean"]["ce"], losses[spliced]["ce"], losses[zero]["ce"]
    return {"ce_clean": c, "ce_spliced": s, "ce_zero": z, "ce_increase": s - c,
            "ce_increase_stderr": losses[spliced]["ce_increase_stderr"],
            "kl_spliced": losses[spliced]["kl"], "kl_zero": losses[zero]["kl"],
            "fraction_recovered": fraction_recovered(c, s, z), "n_scored_tokens": losses["clean"]["n_scored"]}


# ============================================================================ store-row metrics

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


@torch.no_grad()
def prefix_predictions(transcoder: Any, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold-encode (B, d_in) raw rows and decode each Matryoshka prefix in raw target units.

    Returns preds (G, B, d_out) (prefix i uses latents < m_i, plus b_dec), and the active
    (rows, cols) pairs. Decoding is sparse (an embedding-bag per group), never B x L x d.
    """
    B = x_raw.shape[0]
    G = len(transcoder.groups)
    rows, cols, vals = transcoder.encode_sparse(x_raw)          # (nnz,) each
    bags = transcoder.group_of(cols) * B + rows                 # one bag per (group, row)
    order = torch.argsort(bags, stable=True)
    offsets = torch.bincount(bags, minlength=G * B).cumsum(0)
    offsets = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    parts = torch.nn.functional.embedding_bag(cols[order], transcoder.W_dec, offsets, mode="sum",
                                              per_sample_weights=vals[order])   # (G*B, d_out)
    preds_n = parts.view(G, B, -1).cumsum(0) + transcoder.b_dec                 # (G, B, d_out)
    return transcoder.denormalize_target(preds_n), rows, cols


def pick_chunks(n_chunks: int, chunk_rows: int, rows: int) -> list[int]:
    """Whole chunks, evenly spread over the store, holding about `rows` rows (never fancy indexing)."""
    want = min(n_chunks, max(1, -(-rows // chunk_rows)))
    return sorted({int(round(c)) for c in np.linspace(0, n_chunks - 1, want)})


@torch.no_grad()
def row_metrics(transcoder: Any, store: Store, rows: int, device: str, dense_threshold: float,
                include_bos: bool = False, batch_rows: int = 4096, progress: bool = True) -> dict[str, Any]:
    """FVU per prefix, variance explained, L0, dead and dense fractions over sampled store rows.

    Rows flagged as clamped to the fp16 range are always skipped, BOS rows unless include_bos
    (the transcoder never trained on them). Memory: one chunk plus (G, batch_rows, d) predictions.
    """
    G = len(transcoder.groups)
    tot = RowTotals(transcoder.d_out, transcoder.d_latent, G)
    chunks = pick_chunks(store.n_chunks, store.chunk_rows, rows)
    ignore = FLAG_OVERFLOW | (0 if include_bos else FLAG_BOS)
    bar = tqdm(total=sum(b - a for a, b in map(store.chunk_range, chunks)), unit="row",
               unit_scale=True, desc="eval: store rows", disable=not progress)
    for c in chunks:
        block = store.read_chunk(c)
        keep = (block.flags & ignore) == 0
        x_all, y_all = block.source[keep], block.target[keep]
        for a in range(0, len(x_all), batch_rows):
            x = torch.from_numpy(x_all[a:a + batch_rows]).float().to(device)   # (B, d_in)
            y = torch.from_numpy(y_all[a:a + batch_rows]).float().to(device)   # (B, d_out)
            add_rows(tot, transcoder, x, y)
        bar.update(len(block.flags))
    bar.close()
    return summarize_rows(tot, transcoder, dense_threshold, chunks, store)


def add_rows(tot: RowTotals, transcoder: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    B = x.shape[0]
    preds, rows, cols = prefix_predictions(transcoder, x)                      # (G, B, d_out)
    tot.n += B
    yd = y.double()
    tot.y_sum += yd.sum(0).cpu().numpy()
    tot.y_sq += (yd * yd).sum(0).cpu().numpy()
    tot.err_sq += (preds - y).double().pow(2).sum(dim=(1, 2)).cpu().numpy()
    tot.fired += torch.bincount(cols, minlength=transcoder.d_latent).cpu().numpy()
    l0 = torch.bincount(rows, minlength=B)                                      # (B,)
    tot.l0_hist += torch.bincount(l0, minlength=transcoder.d_latent + 1).cpu().numpy()[: transcoder.d_latent + 1]
    tot.group_active += torch.bincount(transcoder.group_of(cols), minlength=len(transcoder.groups)).double().cpu().numpy()


def summarize_rows(tot: RowTotals, transcoder: Any, dense_threshold: float, chunks: list[int], store: Store) -> dict[str, Any]:
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
        "threshold": float(transcoder.threshold),
    }


def density_histogram(density: np.ndarray) -> dict[str, list]:
    """Firing densities of the live latents on a log10 scale (bins of 0.5 decade from 1e-7 to 1)."""
    edges = np.arange(-7.0, 0.01, 0.5)
    live = density[density > 0]
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return {"log10_edges": edges.tolist(), "counts": counts.tolist()}


# ============================================================================ held-out text

class CountingIterator:
    """Wraps a document iterator and counts how many documents were pulled from it."""

    def __init__(self, docs: Iterable[str]):
        self.docs = iter(docs)
        self.pulled = 0

    def __iter__(self) -> "CountingIterator":
        return self

    def __next__(self) -> str:
        doc = next(self.docs)
        self.pulled += 1
        return doc


def text_source(cfg: EvalConfig, store: Store) -> tuple[dict[str, Any], bool]:
    """The text spec to evaluate on, and whether it is the store's own text stream.

    Options left unset take the store's values when the dataset is the store's, else the defaults.
    """
    made = store.attrs.get("config", {})
    store_spec = {"dataset": made.get("dataset"), "split": made.get("split", "train"),
                  "dataset_config": made.get("dataset_config"), "text_column": made.get("text_column", "text")}
    if cfg.dataset is None and store_spec["dataset"] is None:
        raise UserError(f"the store {store.path} does not record its dataset: pass --dataset")
    if cfg.dataset in (None, store_spec["dataset"]):
        base = store_spec
    else:
        base = {"dataset": cfg.dataset, "split": "train", "dataset_config": None, "text_column": "text"}
    spec = {key: getattr(cfg, key) if getattr(cfg, key) is not None else value for key, value in base.items()}
    return spec, spec == store_spec


def held_out_sequences(docs: Iterable[str], tokenizer: Any, bos_id: int, seq_len: int, n_seqs: int,
                       skip_store: Store | None, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """(n, seq_len) int64 evaluation sequences from `docs`, after the text `skip_store` was made from.

    With skip_store: the store's rows are re-packed from the same stream with the store's packing
    (one document at a time, so no document is read ahead), compared token for token with the
    store (a mismatch means the text or tokenizer changed, and held-out cannot be guaranteed), and
    every document they touched is skipped, including the one the store's last row cut through.
    The evaluation sequences are packed from the next document on.
    """
    stream = CountingIterator(docs)
    info: dict[str, Any] = {"skipped_store_sequences": 0, "skipped_documents": 0}
    if skip_store is not None:
        L = skip_store.seq_len
        n_store = skip_store.n_rows // L
        stored = skip_store.tokens
        packed = islice(pack_sequences_lazy(stream, tokenizer, L, bos_id), n_store)
        count = 0
        for i, row in enumerate(tqdm(packed, total=n_store, unit="seq", desc="eval: skip the store's text",
                                     disable=not progress)):
            if not np.array_equal(row, stored[i * L:(i + 1) * L]):
                raise UserError(f"re-reading the store's text does not reproduce its tokens (sequence {i} differs): "
                                "the dataset or tokenizer changed since `tc cache`, so held-out text cannot be "
                                "guaranteed; pass --dataset with text the store was not made from")
            count += 1
        if count < n_store:
            raise UserError(f"the text ended after {count} of the store's {n_store} sequences: the dataset changed "
                            "since `tc cache`; pass --dataset with text the store was not made from")
        info = {"skipped_store_sequences": n_store, "skipped_documents": stream.pulled}
    from pipeline.text import pack_sequences

    seqs = list(islice(pack_sequences(stream, tokenizer, seq_len, bos_id), n_seqs))
    if not seqs:
        raise UserError("no held-out text is left after the text the store holds (it used the whole dataset): "
                        "pass --dataset with other text, or another --split")
    return np.stack(seqs), info


def pack_sequences_lazy(docs: Iterable[str], tokenizer: Any, seq_len: int, bos_id: int) -> Iterator[np.ndarray]:
    """The store's packing with one document per tokenizer call: it reads no document ahead."""
    from pipeline.text import pack_sequences

    return pack_sequences(docs, tokenizer, seq_len, bos_id, batch_docs=1)


# ============================================================================ the command

def load_run(run: str | None) -> tuple[Path, dict[str, Any]]:
    """The run folder and its resolved training config; UserError if it is not a finished run."""
    folder = require_run(run)
    config = run_config(folder)
    if not (folder / "transcoder.safetensors").exists():
        load_transcoder(folder)   # says, in one line, that the run has not finished
    return folder, config


def run_store_path(cfg: EvalConfig, run_config: dict[str, Any], folder: Path) -> str:
    path = cfg.cache or run_config.get("cache") or run_config.get("config", {}).get("cache")
    if not path:
        raise UserError(f"{folder}/config.json does not name the store the run trained on: pass --cache")
    if not Path(path).exists():
        raise UserError(f"the store {path} does not exist (moved or deleted?): pass --cache STORE")
    return str(path)


def validate(cfg: EvalConfig) -> None:
    """Checks that need nothing loaded."""
    for name in ("tokens", "rows", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (BOS plus one token), got {cfg.seq_len}")
    if not 0 < cfg.dense_threshold <= 1:
        raise UserError(f"--dense-threshold is a fraction of rows in (0, 1], got {cfg.dense_threshold}")


def check_fits(transcoder: Any, store: Store) -> None:
    """The store must hold the activations the transcoder was trained to read and predict."""
    if (transcoder.d_in, transcoder.d_out) != (store.d_model, store.d_model):
        raise UserError(f"the transcoder maps {transcoder.d_in} -> {transcoder.d_out} dims but the store "
                        f"{store.path} has d_model {store.d_model}: pass the run's store with --cache")
    hooks = transcoder.meta.get("hooks")
    if hooks and hooks != store.hooks:
        raise UserError(f"the transcoder reads {hooks.get('source')} -> {hooks.get('target')} but the store "
                        f"{store.path} holds {store.hooks['source']} -> {store.hooks['target']}: pass a store "
                        "of the same hooks with --cache")
    model = transcoder.meta.get("model")
    if model and store.attrs.get("model") and model != store.attrs["model"]:
        raise UserError(f"the transcoder was trained on {model} activations but the store {store.path} holds "
                        f"{store.attrs['model']}'s: pass a store of the same model with --cache")


def model_dtype(name: str, device: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype {name!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_eval_model(spec: str, store: Store, device: str, dtype: torch.dtype | None) -> Any:
    """The model to splice into; one clear UserError when it cannot be loaded or does not fit."""
    from pipeline.models import load_model

    try:
        lm = load_model(spec, device=device, dtype=dtype)
    except UserError as e:
        raise UserError(f"cannot load model {spec!r} to splice the transcoder into: {e} "
                        "(pass --model, or --no-lm-loss for the store-row metrics only)") from None
    except Exception as e:
        raise UserError(f"cannot load model {spec!r} to splice the transcoder into: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]} (pass --model, or --no-lm-loss for the store-row "
                        "metrics only)") from None
    if lm.d_model != store.d_model:
        raise UserError(f"model {spec} has d_model {lm.d_model} but the store has {store.d_model}: "
                        "pass the model the store was made from with --model")
    for name in store.hooks.values():
        if name not in lm.model.hook_dict:
            raise UserError(f"model {spec} has no hook {name}: pass the model the store was made from with --model")
    return lm


def auto_batch_size(seq_len: int, vocab: int) -> int:
    return max(1, min(64, LOGITS_BUDGET // max(seq_len * vocab, 1)))


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """`tc eval` end to end: returns what it writes to RUN/eval.json."""
    from pipeline.transcoder import Transcoder

    t0 = time.perf_counter()
    validate(cfg)
    folder, run_config = load_run(cfg.run)
    store = Store(run_store_path(cfg, run_config, folder)).require_complete()
    device = pick_device(cfg.device)
    transcoder = Transcoder.load(folder / "transcoder.safetensors", device=device).eval()
    check_fits(transcoder, store)
    result: dict[str, Any] = {"run": str(folder), "store": store.path, "model": None, "layer": store.attrs.get("layer"),
                              "hooks": store.hooks}
    train_store = training_store(run_config, store)   # the held-out text must avoid ITS text
    lm = None
    if cfg.lm_loss:   # load the model first: an unloadable model should fail before minutes of work
        spec = cfg.model or train_store.attrs.get("model")
        lm = load_eval_model(spec, store, device, model_dtype(cfg.dtype, device))
        result["model"] = spec
    rows = row_metrics(transcoder, store, cfg.rows, device, cfg.dense_threshold, cfg.include_bos, progress=progress)
    rows["rows_are_training_rows"] = Path(train_store.path).resolve() == Path(store.path).resolve()
    result["rows"] = rows
    if lm is not None:
        result["lm"] = lm_section(cfg, train_store, store.hooks, lm, transcoder, progress)
    result.update({"seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg), "versions": versions()})
    write_json_atomic(folder / "eval.json", result)
    write_config_toml(folder / "tc-eval.toml", cfg)
    plot_fvu(rows, folder / "eval_fvu_per_prefix.png",
             title=f"{folder.name}: FVU per Matryoshka prefix on {rows['n_rows']:,} store rows")
    print(format_table(result))
    print(f"wrote {folder / 'eval.json'} and {folder / 'eval_fvu_per_prefix.png'}")
    return result


def training_store(run_config: dict[str, Any], store: Store) -> Store:
    """The store the run trained on; `store` (from --cache) when that one is gone or is the same."""
    path = run_config.get("cache") or run_config.get("config", {}).get("cache")
    if not path or not Path(path).exists() or Path(path).resolve() == Path(store.path).resolve():
        return store
    return Store(path).require_complete()


def lm_section(cfg: EvalConfig, store: Store, hooks: dict[str, str], lm: Any, transcoder: Any,
               progress: bool) -> dict[str, Any]:
    """The spliced language-model loss on text held out from `store` (the run's training store)."""
    from pipeline.text import iter_documents

    spec, same = text_source(cfg, store)
    seq_len = cfg.seq_len or store.seq_len
    n_seqs = -(-cfg.tokens // seq_len)
    docs = iter_documents(spec["dataset"], split=spec["split"], config=spec["dataset_config"],
                          text_column=spec["text_column"])
    seqs, info = held_out_sequences(docs, lm.tokenizer, lm.bos_id, seq_len, n_seqs,
                                    store if same else None, progress)
    if len(seqs) < n_seqs:
        print(f"note: the held-out text ran out: evaluating on {seqs.size:,} of the {n_seqs * seq_len:,} tokens asked for")
    batch = cfg.batch_size or auto_batch_size(seq_len, lm.vocab_size)
    replacements = {"spliced": transcoder_replacement(transcoder), "zero": zero_replacement}
    losses = lm_losses(lm.model, seqs, hooks["source"], hooks["target"], replacements,
                       lm.bos_id, cfg.include_bos, batch, lm.device, progress)
    out = splice_report(losses)
    out.update({"text": {**spec, "same_as_store": same, **info, "sequences": len(seqs), "seq_len": seq_len,
                         "tokens": int(seqs.size), "tokens_asked": n_seqs * seq_len},
                "include_bos": cfg.include_bos, "batch_size": batch, "per_pass": losses})
    return out


# ============================================================================ output

def format_table(result: dict[str, Any]) -> str:
    """The terminal summary."""
    lines = [f"tc eval  {result['run']}", f"  store {result['store']}  ({result['hooks']['source']} -> {result['hooks']['target']})"]
    lm = result.get("lm")
    if lm:
        t = lm["text"]
        fr = lm["fraction_recovered"]
        lines += [f"  language model {result['model']} on {t['tokens']:,} held-out tokens of {t['dataset']} "
                  f"({lm['n_scored_tokens']:,} scored)",
                  f"    {'CE clean':<22}{lm['ce_clean']:>10.4f}",
                  f"    {'CE spliced':<22}{lm['ce_spliced']:>10.4f}   (+{lm['ce_increase']:.4f} +- {lm['ce_increase_stderr']:.4f})",
                  f"    {'CE zero-ablated':<22}{lm['ce_zero']:>10.4f}",
                  f"    {'fraction recovered':<22}{'n/a' if fr is None else f'{fr:10.4f}':>10}",
                  f"    {'KL(clean || spliced)':<22}{lm['kl_spliced']:>10.4f}",
                  f"    {'KL(clean || zero)':<22}{lm['kl_zero']:>10.4f}"]
    r = result["rows"]
    lines += [f"  store rows: {r['n_rows']:,} ({'rows the run trained on' if r['rows_are_training_rows'] else 'another store'})",
              f"    {'prefix (latents)':<22}{'FVU':>10}{'var. expl.':>12}{'L0 in group':>13}{'dead in group':>15}"]
    for i, m in enumerate(r["prefix_ends"]):
        lines.append(f"    {f'{i + 1} (< {m})':<22}{r['fvu_per_prefix'][i]:>10.4f}"
                     f"{r['variance_explained_per_prefix'][i]:>12.4f}{r['l0_per_group'][i]:>13.2f}{r['dead_per_group'][i]:>15,}")
    q = r["l0_quantiles"]
    lines += [f"    L0 mean {r['l0']:.2f}  (p10 {q['p10']}, median {q['p50']}, p90 {q['p90']}, p99 {q['p99']})",
              f"    dead {r['dead_fraction']:.2%} ({r['dead_features']:,})   dense (> {r['dense_threshold']:.0%} of rows) "
              f"{r['dense_fraction']:.2%} ({r['dense_features']:,})"]
    return "\n".join(lines)


def plot_fvu(rows: dict[str, Any], path: Path, title: str) -> None:
    """FVU (log scale) per Matryoshka prefix, labelled by the prefix's latent count; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends, fvu = rows["prefix_ends"], rows["fvu_per_prefix"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(ends) + 1), fvu, marker="o")
    for i, (m, v) in enumerate(zip(ends, fvu)):
        ax.annotate(f"{v:.3f}", (i + 1, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(1, len(ends) + 1), [f"{i + 1}\n(< {m})" for i, m in enumerate(ends)])
    ax.set_xlabel("Matryoshka prefix (latents used)")
    ax.set_ylabel("FVU (store rows)")
    if min(fvu) > 0:
        ax.set_yscale("log")
    ax.margins(x=0.08, y=0.15)   # room for the value labels
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

"""Feature samples: which store rows make each feature fire, and the text around them.

Three parts, all on tensors (no Python loop over features):
- `TopBuffer`: for every slot (a feature, or a feature x activation interval), the n entries with
  the largest keys seen so far, merged batch by batch with sort/scatter only, on any device.
- `SampleCollector`: the during-training collector. Every `sample_every` steps the trainer hands it
  the batch's active latents; it keeps per feature the strongest activations above the threshold
  and, at the end, writes `RUN/activation_samples/`.
- `run_collect` (`tc samples collect`): the exact pass after training. Two streaming passes over the
  store with the final transcoder's threshold encoding: pass 1 keeps the exact top-n, firing
  counts, sums and maxima; pass 2 (which needs each feature's maximum) fills the histogram and
  random samples from equal-width activation intervals of [0, max]. Output: `RUN/samples/`.

Contexts are rebuilt from the store's token ids, never from a model: see `context_starts`.
The formats are described in docs/samples.md.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.store import FLAG_BOS, FLAG_OVERFLOW, Store
from pipeline.train import load_transcoder, open_run_store, require_run
from pipeline.util import (UserError, opt, parse_count, pick_device, replaced_atomically, versions, write_config_toml,
                           write_json_atomic)

NEG = float("-inf")
TRAINING_DIR = "activation_samples"   # written by the training collector
EXACT_DIR = "samples"                 # written by `tc samples collect`
SAMPLES_FILE = "samples.safetensors"
EXACT_META = "collect.json"           # written last: its presence marks a finished collect
STATE_FILE = "state.safetensors"      # resumable state of an unfinished collect
MARK_LEFT, MARK_RIGHT = "\u00ab", "\u00bb"   # « » around the activating token in plain text


# ----------------------------------------------------------------------------- top-n buffers

def _rank_in_slot(inv: torch.Tensor, key: torch.Tensor, n_slots: int, n: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For entries with slot `inv` (E,) and `key` (E,): the indices, slots and ranks (by key,
    descending; ties keep input order) of the entries ranked below n in their slot."""
    order = torch.sort(key, descending=True, stable=True).indices          # (E,)
    order = order[torch.sort(inv[order], stable=True).indices]            # grouped by slot
    slot = inv[order]
    counts = torch.bincount(slot, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts                              # first position of each slot
    rank = torch.arange(len(slot), device=slot.device) - starts[slot]
    keep = rank < n
    return order[keep], slot[keep], rank[keep]


def _drop_repeated_rows(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, rows (T, L): where a row appears twice in a slot, keep only its largest key (ties: the
    earlier position); the others become empty (key -inf, row -1)."""
    o1 = torch.sort(keys, dim=1, descending=True, stable=True).indices    # key order
    r1 = rows.gather(1, o1)
    o2 = torch.sort(r1, dim=1, stable=True).indices                        # equal rows side by side
    r2 = r1.gather(1, o2)
    dup2 = torch.zeros_like(r2, dtype=torch.bool)
    dup2[:, 1:] = (r2[:, 1:] == r2[:, :-1]) & (r2[:, 1:] >= 0)
    dup1 = torch.empty_like(dup2).scatter_(1, o2, dup2)                    # back to key order
    dup = torch.empty_like(dup1).scatter_(1, o1, dup1)                     # back to input order
    return keys.masked_fill(dup, NEG), rows.masked_fill(dup, -1)


def _merge_order(kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """kept, new (T, n), each sorted descending: indices into cat([kept, new], 1) of their first n
    in merged order (descending; equal keys: kept first). A merge path with two binary searches
    per entry, several times cheaper than sorting the (T, 2n) block."""
    t, n = kept.shape
    k_asc, n_asc = (-kept).contiguous(), (-new).contiguous()             # ascending
    pos = torch.arange(n, device=kept.device).expand(t, n)
    pos_kept = pos + torch.searchsorted(n_asc, k_asc, right=False)     # + new entries strictly larger
    pos_new = pos + torch.searchsorted(k_asc, n_asc, right=True)       # + kept entries larger or equal
    order = torch.empty((t, 2 * n), dtype=torch.int64, device=kept.device)
    order.scatter_(1, pos_kept, pos)
    order.scatter_(1, pos_new, pos + n)
    return order[:, :n]


class TopBuffer:
    """Per slot, the n entries with the largest keys: keys (S, n) (-inf = empty), rows (S, n) int64
    (-1 = empty), vals (S, n) float32 (the activation; equal to the key for top-activation buffers,
    a separate payload when the key is a random priority). Rows in a slot are sorted by key,
    descending; on equal keys the entry seen first wins."""

    def __init__(self, n_slots: int, n: int, device: str | torch.device = "cpu"):
        self.n = n
        self.keys = torch.full((n_slots, n), NEG, dtype=torch.float32, device=device)
        self.rows = torch.full((n_slots, n), -1, dtype=torch.int64, device=device)
        self.vals = torch.zeros((n_slots, n), dtype=torch.float32, device=device)

    def merge(self, slot: torch.Tensor, key: torch.Tensor, row: torch.Tensor, val: torch.Tensor,
              dedupe: bool = False) -> None:
        """Add entries (E,) each: slot index, key, store row, value. With `dedupe`, a row already
        kept in a slot is kept once, with its largest key (entries of one call must not repeat a row)."""
        if slot.numel() == 0:
            return
        touched, inv = torch.unique(slot, return_inverse=True)            # (T,), (E,)
        t, n = len(touched), self.n
        idx, s, rank = _rank_in_slot(inv, key, t, n)                      # the batch's own top-n per slot
        new_keys = torch.full((t, n), NEG, dtype=torch.float32, device=slot.device)
        new_rows = torch.full((t, n), -1, dtype=torch.int64, device=slot.device)
        new_vals = torch.zeros((t, n), dtype=torch.float32, device=slot.device)
        new_keys[s, rank] = key[idx].float()
        new_rows[s, rank] = row[idx]
        new_vals[s, rank] = val[idx].float()
        # kept entries first: on equal keys the earlier one stays
        old_keys = self.keys[touched]
        keys = torch.cat([old_keys, new_keys], 1)                         # (T, 2n)
        rows = torch.cat([self.rows[touched], new_rows], 1)
        vals = torch.cat([self.vals[touched], new_vals], 1)
        if dedupe:
            keys, rows = _drop_repeated_rows(keys, rows)
            vals = vals.masked_fill(rows < 0, 0.0)
            top = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n]
        else:
            top = _merge_order(old_keys, new_keys)
        self.keys[touched] = keys.gather(1, top)
        self.rows[touched] = rows.gather(1, top)
        self.vals[touched] = vals.gather(1, top)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}keys": self.keys.cpu(), f"{prefix}rows": self.rows.cpu(), f"{prefix}vals": self.vals.cpu()}

    def load_state_dict(self, d: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("keys", "rows", "vals"):
            saved = d[f"{prefix}{name}"]
            mine = getattr(self, name)
            if saved.shape != mine.shape:
                raise UserError(f"saved sample state has shape {tuple(saved.shape)} but this run needs "
                                f"{tuple(mine.shape)}: the sample settings changed since it was saved")
            mine.copy_(saved)


# ----------------------------------------------------------------------------- contexts

def context_starts(rows: np.ndarray, flags: np.ndarray, seq_len: int, n_ctx: int) -> np.ndarray:
    """First row of each sample's context. The context of row r is rows [start, r]: at most n_ctx
    rows, never before the first row of r's sequence (r - r % seq_len), and never before the last
    BOS row at or before r (a BOS inside a sequence starts a new document; the BOS itself is kept
    so the reader sees where the document begins)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return rows.copy()
    back = np.arange(n_ctx - 1, -1, -1, dtype=np.int64)                  # (n_ctx,) oldest .. r itself
    win = rows[:, None] - back[None, :]                                    # (S, n_ctx)
    seq_start = rows - rows % seq_len
    inside = win >= seq_start[:, None]
    is_bos = inside & ((flags[np.maximum(win, 0)] & FLAG_BOS) != 0)
    last_bos = np.where(is_bos, win, -1).max(axis=1)
    return np.maximum.reduce([rows - n_ctx + 1, seq_start, last_bos])


def build_context(row: int, start: int, tokens: np.ndarray, vocab: list[str]) -> dict[str, Any]:
    """One sample's context: token ids and texts of rows [start, row]; the activating token is last."""
    ids = tokens[start:row + 1].astype(np.int64).tolist()
    toks = [token_text(vocab, i) for i in ids]
    return {"row": int(row), "context_start": int(start), "token_id": ids[-1], "token": toks[-1],
            "token_ids": ids, "tokens": toks, "text": "".join(toks),
            "marked": "".join(toks[:-1]) + MARK_LEFT + toks[-1] + MARK_RIGHT}


def token_text(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) else f"<id {i}>"


def contexts_for(rows: Iterable[int], store: Store, n_ctx: int, vocab: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    rows = np.asarray(list(rows), dtype=np.int64)
    vocab = vocab if vocab is not None else store.vocab()
    starts = context_starts(rows, store.flags, store.seq_len, n_ctx)
    return [build_context(int(r), int(s), store.tokens, vocab) for r, s in zip(rows, starts)]


# ----------------------------------------------------------------------------- during training

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
                 bos_rows: torch.Tensor | None = None, n_rows: int | None = None):
        self.d_latent, self.n, self.threshold = d_latent, n, float(threshold)
        self.device = torch.device(device)
        self.top = TopBuffer(d_latent, n, self.device)
        self.observed = torch.zeros(d_latent, dtype=torch.int64, device=self.device)  # fires above threshold
        self.act_sum = torch.zeros(d_latent, dtype=torch.float64, device=self.device)
        self.rows_observed = 0
        self.batches = 0
        self.last_step = -1
        # (n_rows,) bool on the device, or None when the trainer never feeds BOS rows
        self.bos_rows = bos_rows.to(self.device) if bos_rows is not None else None
        # rows that ever had a sample: a batch without any of them cannot repeat a kept row, so
        # its merge skips the (costlier) duplicate check. Unknown store size: always check.
        self.seen = torch.zeros(n_rows, dtype=torch.bool, device=self.device) if n_rows else None

    def observe(self, step: int, out: Any, row_ids: torch.Tensor) -> None:
        """Merge one batch. `out`: the forward output (or dense acts (B, d_latent));
        row_ids (B,) int64: the store row of each batch position."""
        with torch.no_grad():
            pos, lat, val = active_entries(out)
            row_ids = row_ids.to(self.device)
            n_rows = len(row_ids)
            if self.bos_rows is not None:
                n_rows -= int(self.bos_rows[row_ids].sum())
            self.add(row_ids[pos.to(self.device)], lat.to(self.device), val.to(self.device).float(), n_rows)
        self.last_step = int(step)

    def add(self, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, n_rows: int) -> None:
        """Entries (E,): store row, latent, activation, from a batch of n_rows usable rows."""
        keep = values > self.threshold
        if self.bos_rows is not None:
            keep &= ~self.bos_rows[rows]
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

    def finish(self, run_dir: str | Path, store: Store, cfg: Any = None) -> Path:
        """Write RUN/activation_samples/: all kept samples (safetensors), the top features with
        their contexts (features.json) and the summary (summary.json)."""
        return write_training_samples(self, Path(run_dir), store, cfg)


def make_collector(cfg: Any, d_latent: int, device: str | torch.device, store: Store | None = None
                   ) -> SampleCollector:
    """The collector the trainer calls. cfg: the TrainConfig (max_samples_per_feature,
    sample_threshold, include_bos, ...). With `store` and include_bos off, BOS rows are never kept
    even if the trainer feeds them."""
    bos = None
    if store is not None and not getattr(cfg, "include_bos", False):
        bos = torch.from_numpy((store.flags & FLAG_BOS) != 0)
    return SampleCollector(d_latent, int(cfg.max_samples_per_feature), float(cfg.sample_threshold), device, bos,
                           n_rows=store.n_rows if store is not None else None)


SAMPLE_FIELDS = ("sample_every", "max_samples_per_feature", "sample_threshold", "sample_context",
                 "top_features", "samples_per_feature", "include_bos")


def write_training_samples(col: SampleCollector, run_dir: Path, store: Store, cfg: Any = None) -> Path:
    out = run_dir / TRAINING_DIR
    out.mkdir(parents=True, exist_ok=True)
    get = (lambda name, default: getattr(cfg, name, default)) if cfg is not None else (lambda name, d: d)
    n_ctx = get("sample_context", 20)
    top_features, per_feature = get("top_features", 100), get("samples_per_feature", 10)
    state = col.state_dict()
    with replaced_atomically(out / SAMPLES_FILE) as tmp:
        save_file(state, str(tmp))
    vals, rows = state["top_vals"], state["top_rows"]                     # (F, n)
    n_kept = (rows >= 0).sum(1)                                           # (F,)
    vmax = vals[:, 0].masked_fill(n_kept == 0, 0.0)
    # the features the researcher reads first: most samples, then strongest
    order = sorted(range(col.d_latent), key=lambda f: (-int(n_kept[f]), -float(vmax[f]), f))
    chosen = [f for f in order[:top_features] if n_kept[f] > 0]
    vocab = store.vocab()
    features, all_ctx = [], []
    for f in chosen:
        k = min(int(n_kept[f]), per_feature)
        ctx = contexts_for(rows[f, :k].tolist(), store, n_ctx, vocab)
        for c, v in zip(ctx, vals[f, :k].tolist()):
            c["activation"] = v
        all_ctx += ctx
        features.append({"feature": f, "samples_kept": int(n_kept[f]), "fires_observed": int(state["observed"][f]),
                         "max_activation": float(vmax[f]),
                         "top_tokens": top_tokens(store.tokens[rows[f, :int(n_kept[f])].numpy()], vocab),
                         "samples": ctx})
    summary = training_summary(col, state, n_kept, all_ctx, features)
    meta = {"config": {k: get(k, None) for k in SAMPLE_FIELDS}, "versions": versions(), "store": store.path}
    write_json_atomic(out / "features.json", {**meta, "features": features})
    write_json_atomic(out / "summary.json", {**meta, **summary})
    return out


def top_tokens(token_ids: np.ndarray, vocab: list[str], k: int = 5) -> list[dict[str, Any]]:
    """The most common activating tokens: [{token_id, token, count}], most common first."""
    return [{"token_id": int(t), "token": token_text(vocab, int(t)), "count": c}
            for t, c in Counter(np.asarray(token_ids).tolist()).most_common(k)]


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


def d_latent_of(tc: Any) -> int:
    return int(tc.W_enc.shape[0])


# ----------------------------------------------------------------------------- exact pass

@dataclass
class CollectConfig:
    run: str = opt("", "Run folder made by `tc train`.", "Input")
    cache: str | None = opt(None, "Store to read (default: the store the run was trained on).", "Input")
    tokens: int | None = opt(None, "Read only the first N rows of the store, e.g. 200k (default: all).", "Input",
                             parse=parse_count)
    top_n: int = opt(50, "Strongest activations kept per feature (exact).", "Samples")
    intervals: int = opt(10, "Equal-width activation intervals of [0, max] to sample from.", "Samples")
    interval_samples: int = opt(5, "Random samples kept per feature and interval.", "Samples")
    hist_bins: int = opt(40, "Bins of each feature's activation histogram over [0, max].", "Samples")
    include_bos: bool = opt(False, "Also use BOS rows (excluded by default: their norms dwarf the rest).", "Samples")
    seed: int = opt(0, "Seed of the random interval sampling.", "Samples")
    batch_size: int = opt(2048, "Rows encoded at once.", "Compute")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")
    save_every: int = opt(8, "Save the resumable state every N chunks of each pass.", "Compute")
    overwrite: bool = opt(False, "Discard an earlier collect in RUN/samples (finished or not) and start over.",
                          "Output")


# Settings that change the result: a resumed or finished collect must agree on them.
COLLECT_IDENTITY = ("tokens", "top_n", "intervals", "interval_samples", "hist_bins", "include_bos", "seed")


def validate_collect(cfg: CollectConfig) -> None:
    for name in ("top_n", "intervals", "interval_samples", "hist_bins", "batch_size", "save_every"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.tokens is not None and cfg.tokens <= 0:
        raise UserError(f"--tokens must be positive, got {cfg.tokens}")


class ExactState:
    """Everything the exact pass accumulates; F = d_latent, Q = intervals."""

    def __init__(self, cfg: CollectConfig, d_latent: int, device: torch.device):
        f = d_latent
        self.top = TopBuffer(f, cfg.top_n, device)                              # pass 1
        self.fires = torch.zeros(f, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(f, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(f, dtype=torch.float32, device=device)
        self.hist = torch.zeros(f, cfg.hist_bins, dtype=torch.int64, device=device)   # pass 2
        self.interval = TopBuffer(f * cfg.intervals, cfg.interval_samples, device)  # slot = f * Q + q
        self.progress = torch.zeros(3, dtype=torch.int64)   # pass (1|2), next chunk, usable rows (pass 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.top.state_dict("top_"), **self.interval.state_dict("interval_"),
                "fires": self.fires.cpu(), "act_sum": self.act_sum.cpu(), "act_max": self.act_max.cpu(),
                "hist": self.hist.cpu(), "progress": self.progress.clone()}

    def load(self, d: dict[str, torch.Tensor]) -> None:
        self.top.load_state_dict(d, "top_")
        self.interval.load_state_dict(d, "interval_")
        for name in ("fires", "act_sum", "act_max", "hist", "progress"):
            getattr(self, name).copy_(d[name])


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with replaced_atomically(path, fsync=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"tc": json.dumps(meta)})


def tensors_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return json.loads((fh.metadata() or {}).get("tc", "{}"))


def usable_mask(flags: np.ndarray, include_bos: bool) -> np.ndarray:
    """Rows the samples may come from: overflowed rows never (their source was clamped), BOS rows
    only when asked."""
    bad = FLAG_OVERFLOW | (0 if include_bos else FLAG_BOS)
    return (flags & bad) == 0


def encode_rows(tc: Any, source: np.ndarray, device: torch.device) -> torch.Tensor:
    """Threshold encoding of raw fp16 source rows (n, d) -> dense activations (n, d_latent)."""
    with torch.no_grad():
        return tc.encode(torch.from_numpy(source).to(device).float()).float()


def _chunk_generator(seed: int, chunk: int, batch: int) -> torch.Generator:
    # keys depend only on (seed, chunk, batch): a resumed pass draws exactly the same numbers
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + chunk * 1_009 + batch)


def _pass1_batch(st: ExactState, acts: torch.Tensor, rows: torch.Tensor) -> None:
    pos, lat = acts.nonzero(as_tuple=True)          # row-major: equal activations keep row order
    val = acts[pos, lat]
    st.fires += torch.bincount(lat, minlength=len(st.fires))
    st.act_sum.index_add_(0, lat, val.double())
    st.act_max.scatter_reduce_(0, lat, val, reduce="amax")
    st.top.merge(lat, val, rows[pos], val)


def _pass2_batch(st: ExactState, cfg: CollectConfig, acts: torch.Tensor, rows: torch.Tensor,
                 gen: torch.Generator) -> None:
    pos, lat = acts.nonzero(as_tuple=True)
    val = acts[pos, lat]
    frac = val / st.act_max[lat]                     # in (0, 1]
    hb = (frac * cfg.hist_bins).long().clamp_(0, cfg.hist_bins - 1)
    st.hist.view(-1).index_add_(0, lat * cfg.hist_bins + hb, torch.ones_like(lat))
    q = (frac * cfg.intervals).long().clamp_(0, cfg.intervals - 1)
    key = torch.rand(len(val), generator=gen).to(val.device)   # random priority = reservoir sample
    st.interval.merge(lat * cfg.intervals + q, key, rows[pos], val)


def _scan_chunk(tc: Any, store: Store, cfg: CollectConfig, st: ExactState, phase: int, c: int,
                n_rows: int, device: torch.device) -> int:
    """Encode chunk c's usable rows and fold them into the state; returns the usable row count."""
    a, b = store.chunk_range(c)
    b = min(b, n_rows)
    data = store.read_rows(a, b)
    keep = np.flatnonzero(usable_mask(data.flags, cfg.include_bos))
    for i, lo in enumerate(range(0, len(keep), cfg.batch_size)):
        sel = keep[lo:lo + cfg.batch_size]
        acts = encode_rows(tc, data.source[sel], device)                   # (n, F)
        rows = torch.from_numpy(sel + a).to(device)
        if phase == 1:
            _pass1_batch(st, acts, rows)
        else:
            _pass2_batch(st, cfg, acts, rows, _chunk_generator(cfg.seed, c, i))
    return len(keep)


def _identity(cfg: CollectConfig, run: Path, store: Store) -> dict[str, Any]:
    tfile = run / "transcoder.safetensors"
    st = tfile.stat()
    return {**{k: getattr(cfg, k) for k in COLLECT_IDENTITY}, "store": str(Path(store.path).resolve()),
            "transcoder": [st.st_size, st.st_mtime_ns]}


def _prepare_dir(out: Path, cfg: CollectConfig, ident: dict[str, Any]) -> str:
    """'done', 'resume' or 'fresh'; refuses to mix with a different earlier collect."""
    meta_file, state_file = out / EXACT_META, out / STATE_FILE
    earlier = None
    if meta_file.exists():
        earlier = json.loads(meta_file.read_text()).get("identity")
        status = "done"
    elif state_file.exists():
        earlier = tensors_meta(state_file).get("identity")
        status = "resume"
    if earlier is None or cfg.overwrite:
        for p in (meta_file, state_file, out / SAMPLES_FILE):
            p.unlink(missing_ok=True)
        return "fresh"
    if earlier != ident:
        diff = [k for k in ident if earlier.get(k) != ident[k]]
        raise UserError(f"{out} holds samples collected with other settings ({', '.join(diff)}): "
                        "pass --overwrite to replace them")
    return status


def run_collect(cfg: CollectConfig) -> Path:
    """The exact pass: RUN/samples/samples.safetensors + collect.json. Resumes an interrupted run."""
    validate_collect(cfg)
    run = require_run(cfg.run)
    store = open_run_store(run, cfg.cache)
    device = torch.device(pick_device(cfg.device))
    tc = load_transcoder(run, device)
    if int(tc.W_enc.shape[1]) != store.d_model:
        raise UserError(f"the store {store.path} has d_model {store.d_model} but the transcoder reads "
                        f"{int(tc.W_enc.shape[1])}: pass the --cache the run was trained on")
    out = run / EXACT_DIR
    out.mkdir(exist_ok=True)
    ident = _identity(cfg, run, store)
    status = _prepare_dir(out, cfg, ident)
    if status == "done":
        print(f"samples already collected in {out} (pass --overwrite to redo)")
        return out
    st = ExactState(cfg, d_latent_of(tc), device)
    if status == "resume":
        st.load(load_file(str(out / STATE_FILE)))
    n_rows = min(cfg.tokens or store.n_rows, store.n_rows)
    n_chunks = -(-n_rows // store.chunk_rows)
    _run_passes(tc, store, cfg, st, out, ident, n_rows, n_chunks, device)
    return _write_exact(cfg, st, out, ident, store, run, n_rows)


def _run_passes(tc: Any, store: Store, cfg: CollectConfig, st: ExactState, out: Path, ident: dict[str, Any],
                n_rows: int, n_chunks: int, device: torch.device) -> None:
    phase, start = int(st.progress[0]) or 1, int(st.progress[1])
    done = (phase - 1) * n_chunks + start
    bar = tqdm(total=2 * n_chunks, initial=done, unit="chunk", desc="samples", dynamic_ncols=True)
    for p in (1, 2):
        if p < phase:
            continue
        bar.set_description(f"samples pass {p}/2 ({'top-n, density' if p == 1 else 'histogram, intervals'})")
        for c in range(start if p == phase else 0, n_chunks):
            usable = _scan_chunk(tc, store, cfg, st, p, c, n_rows, device)
            if p == 1:
                st.progress[2] += usable
            st.progress[0], st.progress[1] = p, c + 1
            last = c + 1 == n_chunks
            if (c + 1) % cfg.save_every == 0 or last:
                if last and p == 1:
                    st.progress[0], st.progress[1] = 2, 0
                save_tensors_atomic(out / STATE_FILE, st.tensors(), {"identity": ident})
            bar.update(1)
    bar.close()


def _write_exact(cfg: CollectConfig, st: ExactState, out: Path, ident: dict[str, Any], store: Store,
                 run: Path, n_rows: int) -> Path:
    t = st.tensors()
    t.pop("progress")
    usable = int(st.progress[2])
    fires = t["fires"]
    summary = {"rows_scanned": n_rows, "usable_rows": usable, "d_latent": len(fires),
               "features_firing": int((fires > 0).sum()), "dead_features": int((fires == 0).sum()),
               "mean_l0": float(fires.sum()) / max(usable, 1)}
    save_tensors_atomic(out / SAMPLES_FILE, t, {"identity": ident})
    write_config_toml(out / "tc-samples-collect.toml", cfg)
    write_json_atomic(out / EXACT_META, {"complete": True, "identity": ident, "config": asdict(cfg),
                                         "store": store.path, "run": str(run), "versions": versions(),
                                         "summary": summary})
    (out / STATE_FILE).unlink(missing_ok=True)
    print(f"exact samples of {summary['features_firing']} firing features over {usable:,} rows -> {out}")
    return out


# ----------------------------------------------------------------------------- loading samples

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


def load_samples(run: str | Path) -> FeatureSamples:
    """The run's samples: exact (RUN/samples) if a collect finished, else the training ones."""
    run = require_run(run)
    exact = run / EXACT_DIR
    if (exact / EXACT_META).exists() and (exact / SAMPLES_FILE).exists():
        meta = json.loads((exact / EXACT_META).read_text())
        t = {k: v.numpy() for k, v in load_file(str(exact / SAMPLES_FILE)).items()}
        f, q = len(t["fires"]), meta["config"]["intervals"]
        return FeatureSamples("exact", t["top_vals"], t["top_rows"], t["fires"], t["act_sum"],
                              meta["summary"]["usable_rows"], t["act_max"], t["hist"],
                              t["interval_vals"].reshape(f, q, -1), t["interval_rows"].reshape(f, q, -1), meta)
    train = run / TRAINING_DIR / SAMPLES_FILE
    if train.exists():
        t = {k: v.numpy() for k, v in load_file(str(train)).items()}
        summary_file = run / TRAINING_DIR / "summary.json"
        meta = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        kept = t["top_rows"] >= 0
        act_max = np.where(kept[:, 0], t["top_vals"][:, 0], 0.0).astype(np.float32)
        return FeatureSamples("training", t["top_vals"], t["top_rows"], t["observed"], t["act_sum"],
                              int(t["counters"][0]), act_max, meta=meta)
    raise UserError(f"{run} has no feature samples: run `tc samples collect --run {run}` "
                    "(or train with sampling on, --sample-every > 0)")

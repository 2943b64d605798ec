"""`tc samples collect`: the exact pass over the store after training (format in docs/samples.md).

Two streaming passes over the store with the final transcoder's inference encoding: pass 1 keeps
the exact top-n per feature, firing counts, sums and maxima; pass 2 (which needs each feature's
maximum) fills the histogram and random samples from equal-width activation intervals of [0, max].
Output: RUN/samples/samples.safetensors and collect.json (written last). The state is saved every
few chunks, so an interrupted collect resumes where it stopped and gives the same result.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.config import checked
from pipeline.run import COLLECT_META, COLLECT_STATE, SAMPLES_FILE, Run, open_run
from pipeline.storage import resolved
from pipeline.store import Store, usable_mask
from pipeline.topn import TopBuffer
from pipeline.transcoder import Transcoder
from pipeline.util import (UserError, opt, parse_count, pick_device, replaced_atomically, versions, write_config_toml,
                           write_json_atomic)


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
    include_outliers: bool = opt(False, "Also use outlier rows (source norm far above their chunk's median; "
                                 "see docs/store.md).", "Samples")
    seed: int = opt(0, "Seed of the random interval sampling.", "Samples")
    batch_size: int = opt(2048, "Rows encoded at once.", "Compute")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")
    save_every: int = opt(8, "Save the resumable state every N chunks of each pass.", "Compute")
    overwrite: bool = opt(False, "Discard an earlier collect in RUN/samples (finished or not) and start over.",
                          "Output")


# Settings that change the result: a resumed or finished collect must agree on them.
COLLECT_IDENTITY = ("tokens", "top_n", "intervals", "interval_samples", "hist_bins", "include_bos",
                    "include_outliers", "seed")


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


def _scan_chunk(tc: Transcoder, store: Store, cfg: CollectConfig, st: ExactState, phase: int, c: int,
                n_rows: int, device: torch.device) -> int:
    """Encode chunk c's usable rows and fold them into the state; returns the usable row count."""
    a, b = store.chunk_range(c)
    b = min(b, n_rows)
    data = store.read_rows(a, b)
    keep = np.flatnonzero(usable_mask(data.flags, cfg.include_bos, cfg.include_outliers))
    for i, lo in enumerate(range(0, len(keep), cfg.batch_size)):
        sel = keep[lo:lo + cfg.batch_size]
        acts = tc.encode_rows(data.source[sel])                             # (n, F)
        rows = torch.from_numpy(sel + a).to(device)
        if phase == 1:
            _pass1_batch(st, acts, rows)
        else:
            _pass2_batch(st, cfg, acts, rows, _chunk_generator(cfg.seed, c, i))
    return len(keep)


def _identity(cfg: CollectConfig, run: Run, store: Store) -> dict[str, Any]:
    st = run.transcoder_file.stat()
    return {**{k: getattr(cfg, k) for k in COLLECT_IDENTITY}, "store": resolved(store.path),
            "transcoder": [st.st_size, st.st_mtime_ns]}


def _prepare_dir(out: Path, cfg: CollectConfig, ident: dict[str, Any]) -> str:
    """'done', 'resume' or 'fresh'; refuses to mix with a different earlier collect."""
    meta_file, state_file = out / COLLECT_META, out / COLLECT_STATE
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
    cfg = checked(cfg)
    validate_collect(cfg)
    run = open_run(cfg.run)
    store = run.store(cfg.cache)
    device = torch.device(pick_device(cfg.device))
    tc = run.transcoder(device)
    if tc.d_in != store.d_model:
        raise UserError(f"the store {store.path} has d_model {store.d_model} but the transcoder reads "
                        f"{tc.d_in}: pass the --cache the run was trained on")
    out = run.exact_samples_dir
    out.mkdir(exist_ok=True)
    ident = _identity(cfg, run, store)
    status = _prepare_dir(out, cfg, ident)
    if status == "done":
        print(f"samples already collected in {out} (pass --overwrite to redo)")
        return out
    st = ExactState(cfg, tc.d_latent, device)
    if status == "resume":
        st.load(load_file(str(out / COLLECT_STATE)))
    n_rows = min(cfg.tokens or store.n_rows, store.n_rows)
    n_chunks = -(-n_rows // store.chunk_rows)
    _run_passes(tc, store, cfg, st, out, ident, n_rows, n_chunks, device)
    return _write_exact(cfg, st, out, ident, store, run, n_rows)


def _run_passes(tc: Transcoder, store: Store, cfg: CollectConfig, st: ExactState, out: Path, ident: dict[str, Any],
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
                save_tensors_atomic(out / COLLECT_STATE, st.tensors(), {"identity": ident})
            bar.update(1)
    bar.close()


def _write_exact(cfg: CollectConfig, st: ExactState, out: Path, ident: dict[str, Any], store: Store,
                 run: Run, n_rows: int) -> Path:
    t = st.tensors()
    t.pop("progress")
    usable = int(st.progress[2])
    fires = t["fires"]
    summary = {"rows_scanned": n_rows, "usable_rows": usable, "d_latent": len(fires),
               "features_firing": int((fires > 0).sum()), "dead_features": int((fires == 0).sum()),
               "mean_l0": float(fires.sum()) / max(usable, 1)}
    save_tensors_atomic(out / SAMPLES_FILE, t, {"identity": ident})
    write_config_toml(out / "tc-samples-collect.toml", cfg)
    write_json_atomic(out / COLLECT_META, {"complete": True, "identity": ident, "config": asdict(cfg),
                                         "store": store.path, "run": str(run), "versions": versions(),
                                         "summary": summary})
    (out / COLLECT_STATE).unlink(missing_ok=True)
    print(f"exact samples of {summary['features_firing']} firing features over {usable:,} rows -> {out}")
    return out

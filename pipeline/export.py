"""Export feature samples for people: JSON files (a documented schema), a self-contained HTML
feature browser, and a terminal view (`tc samples show`).

Samples come from `tc samples collect` (RUN/samples) when it finished, else from training
(RUN/activation_samples). Contexts are rebuilt from the store's token ids; the per-token activations
of the feature across each context are computed with the run's transcoder from the store's source
rows (only the chunks that hold context rows are read). Schema: docs/samples.md.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import checked
from pipeline.contexts import build_context, context_ends, context_starts, token_text, top_tokens
from pipeline.logit_effects import try_logit_effects
from pipeline.run import Run, RunSet, is_set, open_run, open_set_layer
from pipeline.samples import FeatureSamples, load_samples
from pipeline.store import Store
from pipeline.transcoder import Transcoder
from pipeline.util import (UserError, opt, parse_int_list, pick_device, status, versions, write_config_toml,
                           write_file_atomic, write_json_atomic)

SCHEMA = "tc-feature-samples"
SCHEMA_VERSION = 1
DATA_MARK = "/*__TC_DATA__*/"


@dataclass
class ExportConfig:
    run: str = opt("", "Run folder made by `tc train`, or a set (`tc train --layers`): one browser of every "
                   "layer, with a layer selector.", "Input")
    layer: int | None = opt(None, "With a set: export only this layer's run (as `--run SET/layer_L`).", "Input")
    out: str | None = opt(None, "Output folder (default RUN/export).", "Output")
    format: str = opt("html", "html: one self-contained page (index.html); json: features.json plus one file "
                      "per feature.", "Output")
    features: list[int] | None = opt(None, "Only these feature indices, e.g. 3,17,256 (default: every feature "
                                     "with samples).", "Content", parse=parse_int_list)
    max_features: int | None = opt(None, "Only the N most often firing features (default: all).", "Content")
    top_n: int = opt(10, "Top contexts per feature.", "Content")
    interval_samples: int = opt(3, "Samples per activation interval (exact samples only).", "Content")
    context: int = opt(20, "Tokens of context, ending at the activating token.", "Content")
    after: int = opt(4, "Tokens shown after the activating token (never past its sequence or document; 0: none).",
                     "Content")
    logit_tokens: int = opt(10, "Output tokens each feature's decoder direction promotes and suppresses most, "
                            "through the model's final norm and unembedding (0: leave them out).", "Content")
    cache: str | None = opt(None, "Store to read (default: the store the run was trained on).", "Input")
    model: str | None = opt(None, "Model for the logit effects (default: the store's model; never downloaded).",
                            "Input")
    device: str = opt("auto", "auto, cpu or cuda (for the per-token activations and the logit effects).",
                      "Compute")
    batch_size: int = opt(2048, "Rows encoded at once.", "Compute")


def validate_export(cfg: ExportConfig) -> None:
    if cfg.format not in ("html", "json"):
        raise UserError(f"unknown --format {cfg.format!r}: use html or json")
    for name in ("top_n", "context", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.interval_samples < 0 or (cfg.max_features is not None and cfg.max_features <= 0):
        raise UserError("--interval-samples must be 0 or more and --max-features positive")
    for name in ("after", "logit_tokens"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")


def check_feature(feature: int, d_latent: int) -> int:
    if not 0 <= feature < d_latent:
        raise UserError(f"feature {feature} is out of range: this transcoder has {d_latent} features "
                        f"(0..{d_latent - 1})")
    return feature


def choose_features(cfg: ExportConfig, s: FeatureSamples) -> list[int]:
    """Features with at least one sample, optionally only the given ones or the N firing most."""
    has = np.flatnonzero(s.top_rows[:, 0] >= 0)
    if cfg.features:
        wanted = [check_feature(f, s.d_latent) for f in cfg.features]
        has = np.array([f for f in dict.fromkeys(wanted) if s.top_rows[f, 0] >= 0], dtype=np.int64)
    if cfg.max_features is not None and len(has) > cfg.max_features:
        has = has[np.argsort(-s.fires[has], kind="stable")[:cfg.max_features]]
    return sorted(int(f) for f in has)


# ----------------------------------------------------------------------------- per-token activations

def context_activations(tc: Transcoder, store: Store, starts: np.ndarray, rows: np.ndarray, feats: np.ndarray,
                        batch_size: int = 4096) -> list[np.ndarray]:
    """For each sample i, the activation of feature feats[i] on every row starts[i]..rows[i] (rows:
    the last row to show, the text after the activating token included), from the transcoder's
    inference encoding of the stored source rows. Reads whole chunks only."""
    if len(rows) == 0:
        return []
    lens = rows - starts + 1                                              # (S,)
    first = np.cumsum(lens) - lens
    pair_row = np.repeat(starts, lens) + (np.arange(lens.sum()) - np.repeat(first, lens))   # (P,)
    pair_feat = np.repeat(feats, lens)
    uniq, inv = np.unique(pair_row, return_inverse=True)                  # rows to encode
    porder = np.argsort(inv, kind="stable")                                # pairs grouped by row
    inv_sorted = inv[porder]
    values = np.zeros(len(pair_row), dtype=np.float32)
    chunk_of = uniq // store.chunk_rows
    bounds = np.searchsorted(chunk_of, np.arange(chunk_of.max() + 2))   # rows of chunk c: bounds[c]..bounds[c+1]
    chunks = np.unique(chunk_of)
    for c in tqdm(chunks, desc="context activations", unit="chunk", disable=len(chunks) < 4):
        a = store.chunk_range(int(c))[0]
        source = store.read_chunk(int(c)).source                           # whole chunk, checked, (n, d) fp16
        for u0 in range(bounds[c], bounds[c + 1], batch_size):
            u1 = min(u0 + batch_size, bounds[c + 1])
            acts = tc.encode_rows(source[uniq[u0:u1] - a])                 # (u1 - u0, F)
            p = porder[np.searchsorted(inv_sorted, u0):np.searchsorted(inv_sorted, u1)]
            idx = torch.from_numpy(inv[p] - u0).to(acts.device)
            fidx = torch.from_numpy(pair_feat[p]).to(acts.device)
            values[p] = acts[idx, fidx].cpu().numpy()
    return np.split(values, np.cumsum(lens)[:-1])


# ----------------------------------------------------------------------------- records

def _sample_list(s: FeatureSamples, cfg: ExportConfig, feats: list[int]) -> list[tuple[int, str, int, int, float]]:
    """(feature, kind, interval, row, activation) of every sample to export; kind 'top' or 'interval'."""
    out = []
    for f in feats:
        for r, v in zip(s.top_rows[f, :cfg.top_n], s.top_vals[f, :cfg.top_n]):
            if r >= 0:
                out.append((f, "top", -1, int(r), float(v)))
        if s.interval_rows is not None and cfg.interval_samples:
            for q in range(s.interval_rows.shape[1]):
                picked = [(float(v), int(r)) for r, v in zip(s.interval_rows[f, q, :cfg.interval_samples],
                                                             s.interval_vals[f, q, :cfg.interval_samples]) if r >= 0]
                out += [(f, "interval", q, r, v) for v, r in sorted(picked, reverse=True)]   # strongest first
    return out


def build_records(cfg: ExportConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The index and one record per exported feature (the JSON schema of docs/samples.md)."""
    validate_export(cfg)
    run = open_set_layer(cfg.run, cfg.layer)
    s = load_samples(run)
    feats = choose_features(cfg, s)
    store = run.store(cfg.cache)
    device = torch.device(pick_device(cfg.device))
    tc = run.transcoder(device)
    vocab = store.vocab()
    items = _sample_list(s, cfg, feats)
    rows = np.array([it[3] for it in items], dtype=np.int64)
    starts = context_starts(rows, store.flags, store.seq_len, cfg.context)
    ends = context_ends(rows, store.flags, store.seq_len, cfg.after)
    acts = context_activations(tc, store, starts, ends, np.array([it[0] for it in items], dtype=np.int64),
                               cfg.batch_size)
    per_feature: dict[int, dict[str, list]] = {f: {"top": [], "interval": []} for f in feats}
    for (f, kind, q, r, v), st, end, a in zip(items, starts, ends, acts):
        a = [round(float(x), 5) for x in a]
        n = r - int(st) + 1                      # context rows; the rest is the text after
        rec = {"activation": v, **build_context(r, int(st), store.tokens, vocab, int(end)), "acts": a[:n],
               "after_acts": a[n:]}
        per_feature[f][kind].append((q, rec))
    effects, logit_meta = try_logit_effects(tc, feats, cfg.model or store.attrs.get("model"), cfg.logit_tokens,
                                            device.type)
    if effects is None:
        print(f"logit effects left out: {logit_meta['reason']}")
    status(f"export: writing the pages of {len(feats):,} features")   # about 10 s for the demo's 4k
    records = [_feature_record(f, s, per_feature[f], store, vocab, tc.groups, effects) for f in feats]
    return _index(cfg, run, s, store, records, tc.groups, logit_meta), records


def group_of(f: int, groups: list[int]) -> dict[str, int]:
    """The Matryoshka group of latent f: its index, its latents [start, end), and the prefix
    (latents < end) it first belongs to."""
    ends = np.cumsum(groups)
    g = int(np.searchsorted(ends, f, side="right"))
    return {"index": g, "start": int(ends[g] - groups[g]), "end": int(ends[g]), "count": len(groups)}


def _feature_record(f: int, s: FeatureSamples, got: dict[str, list], store: Store, vocab: list[str],
                    groups: list[int], effects: dict[int, dict] | None) -> dict[str, Any]:
    kept = s.top_rows[f][s.top_rows[f] >= 0]
    rec = {"id": f, "fires": int(s.fires[f]), "density": float(s.density()[f]),
           "mean_activation": float(s.mean_activation()[f]), "max_activation": float(s.act_max[f]),
           "group": group_of(f, groups), "top_tokens": top_tokens(store.tokens[kept], vocab),
           "logit_effects": effects.get(f) if effects is not None else None,
           "histogram": None, "top": [r for _, r in got["top"]], "intervals": []}
    if s.hist is not None:
        h = s.hist.shape[1]
        rec["histogram"] = {"edges": np.linspace(0.0, float(s.act_max[f]), h + 1).tolist(),
                            "counts": s.hist[f].tolist()}
        q_n = s.interval_rows.shape[1]
        for q in range(q_n):
            lo, hi = s.act_max[f] * q / q_n, s.act_max[f] * (q + 1) / q_n
            rec["intervals"].append({"interval": q, "lo": float(lo), "hi": float(hi),
                                     "samples": [r for qq, r in got["interval"] if qq == q]})
    return rec


def density_histogram(s: FeatureSamples, bins_per_decade: int = 4) -> dict[str, Any]:
    """Histogram of log10(density) over every feature that fired (equal-width bins, whole decades at
    the ends), and the number that never did."""
    d = s.density()[s.fires > 0]
    if not len(d):
        return {"log10_edges": [], "counts": [], "dead": int((s.fires == 0).sum())}
    logs = np.log10(d)
    lo, hi = np.floor(logs.min()), max(np.ceil(logs.max()), np.floor(logs.min()) + 1)
    edges = np.linspace(lo, hi, int(round((hi - lo) * bins_per_decade)) + 1)
    counts = np.histogram(logs, bins=edges)[0]
    return {"log10_edges": edges.tolist(), "counts": counts.tolist(), "dead": int((s.fires == 0).sum())}


def _index(cfg: ExportConfig, run: Run, s: FeatureSamples, store: Store, records: list[dict[str, Any]],
           groups: list[int], logit_meta: dict[str, Any]) -> dict[str, Any]:
    rc = run.config()
    fires = s.fires
    width = max(5, len(str(s.d_latent - 1)))
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "source": s.source, "run": str(run),
        "store": store.path, "model": store.attrs.get("model"), "layer": store.attrs.get("layer"),
        "hooks": store.attrs.get("hooks"), "d_latent": s.d_latent, "rows": s.rows_total,
        "context_tokens": cfg.context,
        "summary": {"features_exported": len(records), "features_firing": int((fires > 0).sum()),
                    "dead_features": int((fires == 0).sum()),
                    "max_activation": float(s.act_max.max()) if s.d_latent else 0.0},
        "groups": groups, "density_histogram": density_histogram(s),
        "dead_ids": np.flatnonzero(fires == 0).tolist(), "logit_effects": logit_meta,
        "features": [{"id": r["id"], "file": f"features/feature_{r['id']:0{width}d}.json",
                      "fires": r["fires"], "density": r["density"], "max_activation": r["max_activation"],
                      "mean_activation": r["mean_activation"], "group": r["group"]["index"],
                      "top_tokens": [t["token"] for t in r["top_tokens"]]}
                     for r in records],
        "config": asdict(cfg), "run_config": rc, "collect": (s.meta or {}).get("config"), "versions": versions(),
    }


# ----------------------------------------------------------------------------- writers

def run_export(cfg: ExportConfig) -> Path:
    """Write the JSON files or the HTML page; returns the file to open (features.json / index.html).
    A set without --layer goes to run_set_export."""
    cfg = checked(cfg)
    if is_set(cfg.run) and cfg.layer is None:
        return run_set_export(cfg)
    index, records = build_records(cfg)
    out = output_folder(cfg.out, open_set_layer(cfg.run, cfg.layer).export_dir)
    path = write_json_export(out, index, records) if cfg.format == "json" else write_html(out, page_data(index, records))
    write_export_record(out, cfg, index["source"], path, len(records))
    print(f"exported {len(records)} features ({index['source']} samples) -> {path}")
    return path


def output_folder(out: str | None, default: Path) -> Path:
    folder = Path(out) if out else default
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is a file: choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_export_record(out: Path, cfg: ExportConfig, source: str | list[str], path: Path, features: Any) -> None:
    write_config_toml(out / "tc-samples-export.toml", cfg)
    write_json_atomic(out / "export.json", {"config": asdict(cfg), "versions": versions(), "source": source,
                                            "file": path.name, "features": features})


def run_set_export(cfg: ExportConfig) -> Path:
    """Every layer of a set: layer L is exactly the one-run export of `--run SET/layer_L` (its JSON
    files in OUT/layer_L with --format json; with html one page in OUT holds every layer, with a
    layer selector). Layers are built one at a time; the page keeps only their compact data."""
    validate_export(cfg)
    runset = RunSet(cfg.run)
    out = output_folder(cfg.out, runset.path / "export")
    layers, sources, counts = [], [], {}
    for layer in runset.layers():
        folder = out / f"layer_{layer}" if cfg.format == "json" else out      # the page: one file for all
        sub = replace(cfg, run=str(runset.layer_run(layer).path), out=str(folder))
        status(f"export: layer {layer} of the set")
        index, records = build_records(sub)
        if cfg.format == "json":
            output_folder(sub.out, out)
            write_export_record(folder, sub, index["source"], write_json_export(folder, index, records), len(records))
        else:
            layers.append({"layer": layer, **page_data(index, records)})
        sources.append(index["source"])
        counts[str(layer)] = len(records)
    if cfg.format == "json":
        path = out / "layers.json"
        write_json_atomic(path, {"schema": SCHEMA + "-set", "schema_version": SCHEMA_VERSION, "run": str(runset),
                                 "layers": [{"layer": int(L), "file": f"layer_{L}/features.json", "features": n}
                                            for L, n in counts.items()]})
    else:
        path = write_html(out, {"set": {"run": str(runset), "layers": runset.layers()}, "layers": layers})
    write_export_record(out, cfg, sources, path, counts)
    print(f"exported {sum(counts.values())} features of {len(counts)} layers -> {path}")
    return path


def write_json_export(out: Path, index: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    folder = out / "features"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("feature_*.json"):       # a previous export's files, ours by name
        if re.fullmatch(r"feature_\d+\.json", old.name):
            old.unlink()
    for entry, rec in zip(index["features"], records):
        write_json_atomic(out / entry["file"], {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **rec})
    write_json_atomic(out / "features.json", index)
    return out / "features.json"


def _compact_sample(rec: dict[str, Any], vocab: dict[int, str]) -> list[Any]:
    for i, t in zip(rec["token_ids"] + rec["after_ids"], rec["tokens"] + rec["after_tokens"]):
        vocab[i] = t
    return [rec["row"], _round(rec["activation"]), rec["context_start"], rec["token_ids"],
            [_round(a) for a in rec["acts"]], rec["after_ids"], [_round(a) for a in rec["after_acts"]]]


def _compact_logits(effects: dict[str, list] | None) -> list[list] | None:
    if effects is None:
        return None
    return [[[e["token"], _round(e["value"])] for e in effects[side]] for side in ("positive", "negative")]


def _round(x: float) -> float:
    return float(f"{x:.4g}") if x else 0


def page_data(index: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The data embedded in the page: the index plus compact feature records (samples as
    [row, activation, context_start, token_ids, acts, after_ids, after_acts]; token texts once in
    `vocab`; logit effects as [[positive [token, value]...], [negative ...]])."""
    vocab: dict[int, str] = {}
    feats = []
    for r in records:
        feats.append({
            "id": r["id"], "fires": r["fires"], "density": r["density"], "max": r["max_activation"],
            "mean": r["mean_activation"], "tt": [[t["token"], t["count"]] for t in r["top_tokens"]],
            "group": r["group"]["index"], "logits": _compact_logits(r["logit_effects"]),
            "hist": r["histogram"]["counts"] if r["histogram"] else None,
            "top": [_compact_sample(x, vocab) for x in r["top"]],
            "iv": [[iv["lo"], iv["hi"], [_compact_sample(x, vocab) for x in iv["samples"]]] for iv in r["intervals"]],
        })
    meta = {k: v for k, v in index.items() if k != "features"}
    return {"meta": meta, "vocab": {str(k): v for k, v in vocab.items()}, "features": feats}


def write_html(out: Path, data: dict[str, Any]) -> Path:
    """The page with `data` embedded: one run's page_data, or a set's {set, layers: [{layer, ...}]}."""
    template = (Path(__file__).parent / "browser.html").read_text(encoding="utf-8")
    # "<" escaped so no token text can close the script element
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    html = template.replace(DATA_MARK, f"window.TC_DATA = {blob};")
    path = out / "index.html"
    write_file_atomic(path, html)
    return path


# ----------------------------------------------------------------------------- terminal

def _one_line(text: str) -> str:
    return text.replace("\n", "\u21b5").replace("\r", "").replace("\t", " ")


def show_feature(run: str | Path, feature: int, n: int = 10, color: bool | None = None, context: int = 20,
                 cache: str | None = None) -> str:
    """One feature's strongest samples as text, the activating token highlighted (ANSI when
    `color`, default: when stdout is a terminal; else marked with « »)."""
    run = open_run(run)
    s = load_samples(run)
    check_feature(feature, s.d_latent)
    color = sys.stdout.isatty() if color is None else color
    head = (f"feature {feature}  density {s.density()[feature]:.3%}  fires {int(s.fires[feature]):,}  "
            f"mean {s.mean_activation()[feature]:.3f}  max {s.act_max[feature]:.3f}  ({s.source} samples)")
    rows = [int(r) for r in s.top_rows[feature, :n] if r >= 0]
    if not rows:
        return head + "\n  no samples: this feature never fired above the sample threshold"
    store = run.store(cache)
    vocab = store.vocab()
    starts = context_starts(np.array(rows), store.flags, store.seq_len, context)
    lines = [head]
    for r, st, v in zip(rows, starts, s.top_vals[feature]):
        toks = [token_text(vocab, int(t)) for t in store.tokens[int(st):r + 1]]
        before, hit = _one_line("".join(toks[:-1])), _one_line(toks[-1])
        hit = f"\x1b[1;30;43m{hit}\x1b[0m" if color else f"\u00ab{hit}\u00bb"
        lines.append(f"  {float(v):8.3f}  {before}{hit}")
    return "\n".join(lines)

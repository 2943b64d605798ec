"""`tc info PATH`: what a store or a run folder is, what made it, and what state it is in."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.metrics import read_metrics
from pipeline.run import TRANSCODER, Run, is_run
from pipeline.storage import Location, is_remote, local_path
from pipeline.store import OUTLIER_FACTOR, Store, is_store
from pipeline.util import UserError


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(path: str | Path) -> str:
    if is_remote(path):   # only a store lives on an object store; a run folder is local
        if not is_store(path):
            raise UserError(f"{path} is not a tc store: give a store (tc cache --out) or a local run folder")
        return "\n".join(describe_store(path))
    path = local_path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a store (tc cache --out) or a run folder (tc train --out)")
    if is_store(path):
        return "\n".join(describe_store(path))
    if is_run(path):
        return "\n".join(describe_run(Run(path)))
    raise UserError(f"{path} is neither a tc store nor a tc run folder")


def verify_report(path: str | Path) -> str:
    """One line saying all is intact; a UserError naming what is damaged and what to do otherwise."""
    path = path if is_remote(path) else local_path(path)
    if is_store(path):
        s = Store(path)
        if not s.has_checksums:
            return "verified   nothing to check: the store was made before tc recorded checksums"
        damaged = s.verify()
        if damaged:
            what = ", ".join(name if c is None else f"chunk {c} of {name}" for name, c in damaged[:8])
            more = f" and {len(damaged) - 8} more" if len(damaged) > 8 else ""
            raise UserError(f"{path} is damaged: {len(damaged)} checksum mismatch(es) ({what}{more}): re-run "
                            f"`{cache_command(s.attrs.get('config', {}))}` to recompute them")
        return f"verified   all {len(s.committed_chunks())} written chunks and the statistics match their checksums"
    return verify_run(Run(path))


def verify_run(run: Run) -> str:
    from pipeline.checkpoints import checkpoint_problem

    problems = []
    root = run.checkpoints_dir
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")) if root.is_dir() else []
    for name in names:
        problem = checkpoint_problem(root / name)
        if problem:
            problems.append(f"checkpoint {name}: {problem}")
    if run.transcoder_file.exists() and run.transcoder_problem():
        problems.append(f"{TRANSCODER}: does not match its checksum")
    if problems:
        raise UserError(f"{run.path} is damaged: {'; '.join(problems)}: `tc train --resume {run.path}` falls back "
                        "to the newest intact checkpoint")
    final = ", the final transcoder" if run.transcoder_file.exists() else ""
    return f"verified   {len(names)} checkpoint(s){final}: intact"


def cache_command(config: dict[str, Any]) -> str:
    """The `tc cache` command that continues (or repeats) the store's run."""
    parts = ["tc cache"]
    for key, value in config.items():
        if value is None or value is False or key in ("overwrite",):
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def describe_store(path: Path | str) -> list[str]:
    s = Store(path)
    a = s.attrs
    where = "stored" if is_remote(path) else "on disk"
    lines = [f"store      {path}  (tc-store v{a['schema_version']}, {Location(path).size() / 1e6:,.1f} MB {where})",
             f"model      {a.get('model')} ({a.get('hf_name')}), layer {a.get('layer')}, d_model {s.d_model}",
             f"hooks      {a['hooks']['source']} -> {a['hooks']['target']}",
             f"text       {json.dumps(a.get('dataset'))}",
             f"layout     seq_len {s.seq_len}, {s.chunk_rows} rows per chunk, fp16 (computed in {a.get('compute_dtype')})"]
    if s.complete:
        st = s.stats()   # for a store made before the outlier rule, without its outlier rows
        lines += [f"state      complete: {s.n_rows:,} tokens in {s.n_chunks} chunks",
                  f"stats      mean norm source {st['source']['mean_norm']:,.1f}, target {st['target']['mean_norm']:,.1f} "
                  f"over {st['source']['count']:,} rows; {a.get('n_bos_rows', 0):,} BOS rows, "
                  f"{a['overflow']['rows']:,} rows clamped to fp16",
                  outlier_line(s)]
    else:
        done = int(s.group["chunk_meta"][:, 0].sum())
        total = s.group["chunk_meta"].shape[0]
        lines += [f"state      interrupted: {done} of {total} chunks written ({done * s.chunk_rows:,} of "
                  f"{a['n_rows_planned']:,} tokens); resumable",
                  f"resume     {cache_command(a.get('config', {}))}"]
    lines.append("checksums  CRC-32 of every chunk, checked on every read (`tc info --verify` checks them all)"
                 if s.has_checksums else "checksums  none: the store was made before tc recorded them")
    v = a.get("versions", {})
    lines.append("made by    " + ", ".join(f"{k} {v[k]}" for k in ("tc", "torch", "transformers", "transformer-lens", "zarr") if k in v))
    return lines


UNEXPECTED_OUTLIER_SHARE = 0.01


def outlier_line(s: Store) -> str:
    """How many outlier rows the store has, by which rule, and whether they were found at read time."""
    rule = s.attrs.get("outlier_rule") or {"factor": OUTLIER_FACTOR}
    n = s.n_outlier_rows
    when = "found at read time (store made before the rule)" if s.outliers_at_read else "flagged when cached"
    if rule["factor"] <= 0:
        return "outliers   none flagged (cached with --outlier-factor 0)"
    share = n / max(s.n_rows, 1)
    line = (f"outliers   {n:,} rows ({share:.3%}) with source norm > {rule['factor']:g}x their chunk's "
            f"median, {when}; left out of statistics, and of training and samples unless --include-outliers")
    if share > UNEXPECTED_OUTLIER_SHARE:   # measured stores have at most 0.12% (docs/store.md)
        line += (f"\n           warning: more than {UNEXPECTED_OUTLIER_SHARE:.0%} of rows: look at them "
                 "(bench/outliers.py), or re-cache with a higher --outlier-factor")
    return line


def describe_run(run: Run) -> list[str]:
    path = run.path
    cfg = run.config()
    store = cfg.get("store", {})
    groups = cfg.get("groups")
    lines = [f"run        {path}  ({folder_bytes(path) / 1e6:,.1f} MB on disk)",
             f"store      {cfg.get('cache')} ({store.get('model')}, layer {store.get('layer')}, "
             f"{store.get('n_rows', 0):,} rows)",
             f"dictionary {cfg.get('dict_size'):,} latents, groups {groups}, k {cfg.get('k')}, lr {cfg.get('lr')}, "
             f"batch {cfg.get('batch_size')}{', skip path (W_skip)' if cfg.get('skip') else ''}"]
    step = run.latest_step_name()
    total = cfg.get("total_steps")
    if run.finished:
        lines.append(f"state      complete: {total} steps")
    elif step:
        lines.append(f"state      interrupted at {step} of {total} steps; resume with `tc train --resume {path}`")
    else:
        lines.append(f"state      started, no checkpoint yet: `tc train --resume {path}` starts it again")
    rows = read_metrics(run.metrics_file)
    m = rows[-1] if rows else None
    if m:
        lines.append(f"metrics    step {m.get('step')}: loss {m.get('loss'):.4g}, FVU {m.get('fvu'):.4f}, "
                     f"L0 {m.get('l0'):.1f}, dead {m.get('dead_features')} (not fired in the last "
                     f"{cfg.get('dead_tokens', 100_000):,} training tokens)")
    if run.eval_file.exists():
        ev = json.loads(run.eval_file.read_text())
        fr = ev.get("lm", {}).get("fraction_recovered", ev.get("fraction_recovered"))
        if fr is not None:
            lines.append(f"eval       fraction of loss recovered {fr:.3f}")
    extras = [p.name for p in (run.training_samples_dir, run.exact_samples_dir, run.export_dir) if p.exists()]
    if extras:
        lines.append("samples    " + ", ".join(extras))
    v = cfg.get("versions", {})
    lines.append("made by    " + ", ".join(f"{k} {v[k]}" for k in ("tc", "torch", "zarr") if k in v))
    return lines

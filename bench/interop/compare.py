"""tc's exports loaded by the peers' own loaders, compared with tc on the same rows (CPU).

    python bench/interop/compare.py --run RUN [--run RUN ...] [--rows 2048] [--work DIR] [--json OUT]

For the given runs (one per layer): `tc export circuit-tracer` of all of them and `tc export
saelens` of the first; then the first --rows raw source rows of each run's store, tc's
pre-activations, inference activations and predictions (`Transcoder.predict`) go to an .npz, and
check_circuit_tracer.py / check_saelens.py, each in its tool's venv (venvs.py, made on first use),
load the exports with the tool's loader and print the max abs differences (circuit-tracer's set
loader when the layers are 0..m, else its per-layer loader on each file).
Prints one line per tool and layer and writes everything to --json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from venvs import ensure, peers_dir   # noqa: E402


def tc_outputs(tc: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """tc's pre-activations, inference activations and predicted raw target for raw rows x."""
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        pre = tc._pre(tc.normalize_source(xt))
        return {"pre": pre.numpy(), "acts": tc.encode(xt).numpy(), "pred": tc.predict(xt).numpy()}


def store_rows(run: Any, n: int) -> np.ndarray:
    """The first n raw source rows of the run's store (BOS rows included: a tool sees them too)."""
    store = run.store()
    rows, c = [], 0
    while sum(len(r) for r in rows) < n and c < store.n_chunks:
        rows.append(store.read_chunk(c).source.astype(np.float32))
        c += 1
    return np.concatenate(rows)[:n]


def write_rows(path: Path, runs: list[str], n: int) -> list[int]:
    """The npz the peer scripts read: x_L, pre_L, acts_L, pred_L per layer L. Returns the layers."""
    from pipeline.interop import open_finished

    arrays, layers = {}, []
    for r in runs:
        info = open_finished(r)
        x = store_rows(info.run, n)
        arrays[f"x_{info.layer}"] = x
        arrays.update({f"{k}_{info.layer}": v for k, v in tc_outputs(info.tc, x).items()})
        layers.append(info.layer)
    np.savez(path, **arrays)
    return layers


def run_peer(tool: str, export: Path, rows: Path) -> dict[str, Any]:
    """The tool's check script in its venv; its JSON line, or a RuntimeError with its stderr."""
    python = ensure(tool)
    script = HERE / f"check_{tool.replace('-', '_')}.py"
    done = subprocess.run([str(python), str(script), "--export", str(export), "--rows", str(rows)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                               "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pipeline.interop import CircuitTracerConfig, SAELensConfig, run_circuit_tracer, run_saelens

    p = argparse.ArgumentParser(description="tc's exports checked by circuit-tracer's and SAELens's loaders.")
    p.add_argument("--run", action="append", required=True, help="a finished run folder (repeat: one per layer)")
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--work", default=str(peers_dir() / "work-interop"))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ct = run_circuit_tracer(CircuitTracerConfig(run=a.run, out=str(work / "circuit-tracer"), overwrite=True))
    sl = run_saelens(SAELensConfig(run=a.run[0], out=str(work / "saelens"), overwrite=True))
    write_rows(work / "rows.npz", a.run, a.rows)
    results = {"runs": a.run, "rows": a.rows}
    results["circuit-tracer"] = run_peer("circuit-tracer", ct, work / "rows.npz")
    write_rows(work / "rows-first.npz", a.run[:1], a.rows)
    results["saelens"] = run_peer("saelens", sl, work / "rows-first.npz")
    for tool in ("circuit-tracer", "saelens"):
        for layer, r in results.get(tool, {}).get("layers", {}).items():
            print(f"{tool:15s} layer {layer}: load {results[tool]['load_s']:.2f} s, max |diff| pre "
                  f"{r['pre_max_abs_diff']:.2e} (of {r['pre_scale']:.3g}), pred {r['pred_max_abs_diff']:.2e} "
                  f"(of {r['pred_scale']:.3g}), active pairs differing {r['active_pairs_differing']} of "
                  f"{r['active_pairs_tc']}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

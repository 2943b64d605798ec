"""Runs ONLY inside the SAELens venv (bench/interop/venvs.py): loads a `tc export saelens` folder with
SAELens's own loader (`SAE.load_from_disk`) and compares its encode and forward with tc's outputs.

    python check_saelens.py --export DIR --rows ROWS.npz

ROWS.npz as for check_circuit_tracer.py (one layer: x_L, pre_L, acts_L, pred_L). Prints one JSON object.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
from sae_lens import SAE

from peer_check import arguments, compare   # beside this script


def main() -> None:
    a = arguments(__doc__.split("\n\n")[0])
    start = time.perf_counter()
    sae = SAE.load_from_disk(a.export, device="cpu")
    load_s = time.perf_counter() - start
    sae.eval()
    rows = np.load(a.rows)
    (layer,) = [int(k[2:]) for k in rows.files if k.startswith("x_")]
    x = torch.from_numpy(rows[f"x_{layer}"]).float()
    with torch.no_grad():
        _, cache = sae.run_with_cache(x)
        pre = cache["hook_sae_acts_pre"]
        acts = sae.encode(x)
        pred = sae(x)
    active_tc, active_peer = rows[f"acts_{layer}"] > 0, (acts > 0).numpy()
    print(json.dumps({
        "tool": "saelens", "class": type(sae).__name__, "architecture": sae.cfg.architecture(), "load_s": load_s,
        "hook_name": sae.cfg.metadata.hook_name, "hook_name_out": sae.cfg.metadata.hook_name_out,
        "layers": {str(layer): {
            "rows": len(x), "pre_max_abs_diff": compare(rows[f"pre_{layer}"], pre),
            "pre_scale": float(np.abs(rows[f"pre_{layer}"]).max()),
            "acts_max_abs_diff": compare(rows[f"acts_{layer}"], acts),
            "pred_max_abs_diff": compare(rows[f"pred_{layer}"], pred),
            "pred_scale": float(np.abs(rows[f"pred_{layer}"]).max()),
            "active_pairs_tc": int(active_tc.sum()), "active_pairs_differing": int((active_tc != active_peer).sum())}}}))


if __name__ == "__main__":
    main()

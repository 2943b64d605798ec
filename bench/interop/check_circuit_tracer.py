"""Runs ONLY inside the circuit-tracer venv (bench/interop/venvs.py): loads a `tc export
circuit-tracer` folder with circuit-tracer's own config-driven loader and compares its encode and
decode with tc's outputs on the same rows.

    python check_circuit_tracer.py --export DIR --rows ROWS.npz

ROWS.npz (written by tc's side, compare.py): for each layer L of the set, x_L (n, d) raw source rows,
pre_L (n, F) tc's pre-activations, acts_L (n, F) tc's inference activations, pred_L (n, d) tc's
predicted raw target (Transcoder.predict). Prints one JSON object: per layer the max abs differences
and the scale they compare with, plus the load time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder
from circuit_tracer.utils.hf_utils import load_transcoders

from peer_check import arguments, compare   # beside this script


def load_set(folder: Path) -> tuple[dict, dict, float, str]:
    """layer -> circuit-tracer's SingleLayerTranscoder: through its set loader when the set is
    loadable (layers 0..m, `transcoders` listed), else each file through its per-layer loader."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    start = time.perf_counter()
    if "transcoders" in config:
        # the file names are relative to the folder; circuit-tracer opens them as given
        config["transcoders"] = [str(folder / name) for name in config["transcoders"]]
        tset = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                                lazy_decoder=False)
        layers, how = dict(enumerate(tset)), "load_transcoders"
    else:
        layers = {int(f.stem.split("_")[1]): load_relu_transcoder(str(f), int(f.stem.split("_")[1]),
                                                                  device=torch.device("cpu"), lazy_encoder=False,
                                                                  lazy_decoder=False)
                  for f in sorted(folder.glob("layer_*.safetensors"))}
        how = "load_relu_transcoder"
    return layers, config, time.perf_counter() - start, how


def main() -> None:
    a = arguments(__doc__.split("\n\n")[0])
    tset, config, load_s, how = load_set(Path(a.export))
    rows = np.load(a.rows)
    layers = sorted(int(k[2:]) for k in rows.files if k.startswith("x_"))
    out = {"tool": "circuit-tracer", "loader": how, "load_s": load_s, "n_layers": len(tset),
           "skip": all(t.W_skip is not None for t in tset.values()),
           "feature_input_hook": config["feature_input_hook"], "feature_output_hook": config["feature_output_hook"],
           "layers": {}}
    with torch.no_grad():
        for layer in layers:
            tc_layer = tset[layer]
            x = torch.from_numpy(rows[f"x_{layer}"]).float()
            pre = tc_layer.encode(x, apply_activation_function=False)
            acts = tc_layer.encode(x)
            pred = tc_layer.decode(acts, x)
            active_tc, active_peer = rows[f"acts_{layer}"] > 0, (acts > 0).numpy()
            out["layers"][str(layer)] = {
                "rows": len(x), "pre_max_abs_diff": compare(rows[f"pre_{layer}"], pre),
                "pre_scale": float(np.abs(rows[f"pre_{layer}"]).max()),
                "acts_max_abs_diff": compare(rows[f"acts_{layer}"], acts),
                "pred_max_abs_diff": compare(rows[f"pred_{layer}"], pred),
                "forward_max_abs_diff": compare(rows[f"pred_{layer}"], tc_layer(x)),
                "pred_scale": float(np.abs(rows[f"pred_{layer}"]).max()),
                "active_pairs_tc": int(active_tc.sum()), "active_pairs_differing": int((active_tc != active_peer).sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

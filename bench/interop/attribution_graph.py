"""An attribution graph from a tc transcoder set. Runs ONLY inside the circuit-tracer venv.

    ~/.cache/tc-peers/venv-circuit-tracer/bin/python bench/interop/attribution_graph.py \
        --model MODEL_FOLDER --set SET --prompt "The capital of France is" --out GRAPH_DIR

SET is a `tc export circuit-tracer` folder covering every layer 0..L-1 of the model (make_set.py
makes one); MODEL_FOLDER a Hugging Face folder of the same model (make_set.py prints it: the tiny
model saved there, or tc's converted Gemma 3 270M). The set is loaded with circuit-tracer's
config-driven loader, the model through its nnsight backend on CPU; `attribute` computes the
graph, which is saved as GRAPH_DIR/graph.pt, and `create_graph_files` writes the pruned JSON
graph files its frontend reads. circuit-tracer's own `compute_graph_scores` gives the graph's
replacement and completeness scores. Prints one JSON line per prompt: load and attribution times,
graph sizes, scores. `--prompt` may be given several times (the model is loaded once): prompt i's
graph is then GRAPH_DIR/graph_{i}.pt and its frontend slug tc-graph-{i}, all in one GRAPH_DIR, so
circuit-tracer's viewer lists them side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from circuit_tracer import ReplacementModel, attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402
from circuit_tracer.utils.create_graph_files import create_graph_files  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoders  # noqa: E402


def load_set(folder: Path):
    config = yaml.safe_load((folder / "config.yaml").read_text())
    if "transcoders" not in config:
        raise SystemExit(f"{folder} is a partial set (see its tc-export.json's missing_layers): attribution "
                         "needs a transcoder for every layer")
    config["transcoders"] = [str(folder / name) for name in config["transcoders"]]   # relative to the folder
    return load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                            lazy_decoder=False)


def main() -> None:
    p = argparse.ArgumentParser(description="circuit-tracer attribution graph from a tc transcoder set (CPU).")
    p.add_argument("--model", required=True, help="Hugging Face folder of the model the set was trained on")
    p.add_argument("--set", required=True, help="`tc export circuit-tracer` folder")
    p.add_argument("--prompt", action="append", help="repeatable (default: \"The capital of France is\")")
    p.add_argument("--out", required=True)
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=4096)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    a = p.parse_args()
    prompts = a.prompt or ["The capital of France is"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    start = time.perf_counter()
    tset = load_set(Path(a.set))
    times["load_set_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model = ReplacementModel.from_pretrained_and_transcoders(a.model, tset, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    times["load_model_s"] = time.perf_counter() - start
    for i, prompt in enumerate(prompts):
        name = "" if len(prompts) == 1 else f"_{i}"
        print(json.dumps({"prompt": prompt, "layers": len(tset), "d_transcoder": tset.d_transcoder,
                          **graph_for(model, prompt, a, out, name), **times}), flush=True)


def graph_for(model, prompt: str, a, out: Path, name: str) -> dict:
    """One prompt's graph, its frontend files and circuit-tracer's scores of the unpruned graph."""
    times = {}
    start = time.perf_counter()
    graph = attribute(prompt, model, max_n_logits=a.max_n_logits, batch_size=a.batch_size,
                      max_feature_nodes=a.max_feature_nodes)
    times["attribute_s"] = time.perf_counter() - start
    graph.to_pt(str(out / f"graph{name}.pt"))
    start = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    times["scores_s"] = time.perf_counter() - start
    start = time.perf_counter()
    slug = f"tc-graph{name.replace('_', '-')}"
    create_graph_files(graph, slug=slug, output_path=str(out), node_threshold=a.node_threshold,
                       edge_threshold=a.edge_threshold)
    times["graph_files_s"] = time.perf_counter() - start
    return {"slug": slug, "replacement_score": replacement, "completeness_score": completeness,
            "active_features": int(graph.active_features.shape[0]),
            "selected_features": int(graph.selected_features.shape[0]),
            "logit_targets": len(graph.logit_targets) if hasattr(graph, "logit_targets") else None,
            "files": sorted(p.name for p in out.iterdir()), **times}


if __name__ == "__main__":
    main()

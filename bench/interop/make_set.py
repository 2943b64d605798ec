"""A whole-model transcoder set made with today's single-layer commands, ready for circuit-tracer.

    python bench/interop/make_set.py --model tiny --work DIR [--tokens 40k --steps 200 --dict-size 512 --k 16]

For every layer 0..L-1 of the model: `tc cache --layer i`, `tc train`, then one `tc export
circuit-tracer` of all the runs into DIR/set. Also writes the model as a Hugging Face folder
(DIR/model) for circuit-tracer to load by path: the tiny model is built in code, Gemma 3 270M is
tc's converted folder (its path is printed, nothing is copied). Each stage is skipped when its
output is already there, so a second call only redoes what is missing. Text: CPython's docs
(python-docs, offline). Then, in the circuit-tracer venv:

    ~/.cache/tc-peers/venv-circuit-tracer/bin/python bench/interop/attribution_graph.py \
        --model DIR/model --set DIR/set --prompt "The capital of France is" --out DIR/graph
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def model_folder(model: str, work: Path) -> Path:
    from pipeline import models

    if model == models.GEMMA3:
        return models.gemma3_folder()
    if model != "tiny":
        raise SystemExit(f"--model {model}: this script knows tiny and {models.GEMMA3}")
    folder = work / "model"
    if not (folder / "config.json").exists():
        models._tiny_model().save_pretrained(folder)
        models.tiny_tokenizer().save_pretrained(folder)
        # transformers 5 names its fast tokenizer class TokenizersBackend, which the older transformers
        # of the circuit-tracer venv does not know; PreTrainedTokenizerFast reads the same tokenizer.json
        config = folder / "tokenizer_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def main(argv: list[str] | None = None) -> None:
    from pipeline.cache import CacheConfig, run_cache
    from pipeline.interop import CircuitTracerConfig, model_layers, run_circuit_tracer
    from pipeline.run import Run
    from pipeline.train import TrainConfig, run_train

    p = argparse.ArgumentParser(description="Cache, train and export every layer of a model for circuit-tracer.")
    p.add_argument("--model", default="tiny")
    p.add_argument("--work", required=True)
    p.add_argument("--tokens", default="40k")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dict-size", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(a.model, work)
    n_layers = model_layers(a.model)
    runs = []
    for layer in range(n_layers):
        store, run = work / f"l{layer}.zarr", work / f"run_l{layer}"
        run_cache(CacheConfig(model=a.model, layer=layer, dataset="python-docs", tokens=a.tokens, seq_len=a.seq_len,
                              out=str(store), device="cpu"))
        if not Run(run).finished:
            run_train(TrainConfig(cache=str(store), dict_size=a.dict_size, groups=[a.dict_size // 4, a.dict_size * 3 // 4],
                                  k=a.k, steps=a.steps, batch_size=512, sample_every=0, out=str(run), device="cpu",
                                  **({"resume": str(run), "cache": None} if Run(run).exists else {})))
        runs.append(str(run))
    run_circuit_tracer(CircuitTracerConfig(run=runs, out=str(work / "set"), overwrite=True))
    print(json.dumps({"model_folder": str(folder), "set": str(work / "set"), "runs": runs}))


if __name__ == "__main__":
    main()

"""The SAELens half of the side-by-side benchmark. Runs ONLY inside the SAELens virtual environment.

`run.py` (in tc's environment) starts this script as a subprocess with the SAELens venv's python;
tc itself never imports SAELens. Three subcommands, each writing one JSON file:

  cache  CacheActivationsRunner on Gemma 3 270M, one hook, fp32       -> an Arrow activation cache
  train  Matryoshka BatchTopK SAE training from that cache (LLM stub)  -> sae_weights.safetensors
  check  SAELens' own inference forward on held-out rows (.npy)        -> FVU / L0, to cross-check run.py

Facts this relies on (measured in ../shared/peer-bench, SAELens 6.54.12, TransformerLens 3.9):
- CacheActivationsRunner has no `override_model`: it calls the module-level `load_model`, which
  would go to the hub, so we replace that function with one returning our model.
- It sizes its work from `buffer_size_gb`, not `training_tokens`, so the buffer is set to hold
  exactly the requested tokens (plus a little, because it floors a float).
- Training from a cache still loads the LLM unless `override_model` is given; a stub object is
  enough when special tokens are excluded by id (no tokenizer needed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

START = time.perf_counter()
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

TL_NAME = "google/gemma-3-270m"   # TransformerLens 3.9 has a built-in config for this name


def write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


def read_docs(path: str) -> list[str]:
    """One JSON object per line with a `text` field (the file run.py also gives tc)."""
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def load_hooked_model(model_dir: str):
    """The converted Gemma 3 270M folder (same weights tc uses) as a HookedTransformer, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = HookedTransformer.from_pretrained_no_processing(
        TL_NAME, hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32)
    del hf
    return model


# ---------------------------------------------------------------------------------------- cache

def cmd_cache(a: argparse.Namespace) -> dict:
    import sae_lens.cache_activations_runner as car
    from datasets import Dataset
    from sae_lens import CacheActivationsRunnerConfig

    t_import = time.perf_counter()
    model = load_hooked_model(a.model_dir)
    if a.hook not in model.hook_dict:
        raise SystemExit(f"hook {a.hook} is not in the model")
    car.load_model = lambda *args, **kwargs: model   # no override_model argument exists
    t_model = time.perf_counter()

    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    bytes_per_token = a.d_in * 4                   # fp32
    cfg = CacheActivationsRunnerConfig(
        dataset_path="tc-bench-in-memory",         # replaced by override_dataset
        model_name=TL_NAME, model_batch_size=a.model_batch, hook_name=a.hook, d_in=a.d_in,
        training_tokens=a.tokens, context_size=a.context, new_cached_activations_path=a.out,
        dtype="float32", device="cpu", buffer_size_gb=(a.tokens * bytes_per_token + 1000) / 1e9,
        shuffle=True, prepend_bos=True)
    if cfg.n_buffers != 1 or cfg.n_tokens_in_buffer != a.tokens:
        raise SystemExit(f"SAELens would cache {cfg.n_buffers} x {cfg.n_tokens_in_buffer} tokens, "
                         f"not {a.tokens}: use a multiple of model_batch * context")
    dataset = Dataset.from_dict({"text": read_docs(a.docs)})
    t_init = time.perf_counter()
    runner = car.CacheActivationsRunner(cfg, override_dataset=dataset)
    t_run = time.perf_counter()
    ds = runner.run()
    t_end = time.perf_counter()
    tokens = len(ds) * a.context
    return {"tool": "saelens", "stage": "cache", "hook": a.hook, "dtype": "float32", "tokens": tokens,
            "import_s": t_import - START, "model_load_s": t_model - t_import, "init_s": t_run - t_init,
            "run_s": t_end - t_run, "in_process_s": t_end - START, "disk_bytes": dir_bytes(a.out),
            "torch_threads": torch.get_num_threads(), "versions": versions()}


# ---------------------------------------------------------------------------------------- train

def training_config(a: argparse.Namespace):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig

    sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=a.d_in, d_sae=a.d_sae, k=a.k, matryoshka_widths=a.widths, device="cpu", dtype="float32",
        normalize_activations=a.normalize)
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=TL_NAME, hook_name=a.hook, dataset_path="tc-bench-in-memory",
        is_dataset_tokenized=False, streaming=False, context_size=a.context,
        use_cached_activations=True, cached_activations_path=a.cache,
        training_tokens=a.steps * a.batch, train_batch_size_tokens=a.batch,
        store_batch_size_prompts=a.model_batch, lr=a.lr,
        # same schedule as tc: linear warmup, then cosine down to lr * min_lr_ratio at the last step
        lr_scheduler_name="cosineannealing", lr_warm_up_steps=a.warmup_steps, lr_decay_steps=0,
        lr_end=a.lr * a.min_lr_ratio,
        device="cpu", dtype="float32", seed=a.seed,
        exclude_special_tokens=[a.bos_id] if a.exclude_bos else False,
        n_batches_for_norm_estimate=a.norm_batches,
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=a.out, verbose=False, model_from_pretrained_kwargs={})


def cmd_train(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from sae_lens import SAETrainingRunner
    from sae_lens.training.sae_trainer import SAETrainer

    t_import = time.perf_counter()
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    cfg = training_config(a)
    # Time the training steps without touching what they do: first step start .. last step end.
    timing = {"n": 0, "first": None, "last": None, "out": None, "trainer": None}
    original_step = SAETrainer.step

    def timed_step(self, batch):
        t = time.perf_counter()
        if timing["first"] is None:
            timing["first"] = t
        out = original_step(self, batch)
        timing["last"] = time.perf_counter()
        timing["n"] += 1
        timing["out"], timing["trainer"] = out, self
        return out

    SAETrainer.step = timed_step
    stub_llm = types.SimpleNamespace(tokenizer=None)   # cached training needs no LLM forward
    dataset = Dataset.from_dict({"text": read_docs(a.docs)})
    torch.manual_seed(a.seed)
    t_init = time.perf_counter()
    runner = SAETrainingRunner(cfg, override_model=stub_llm, override_dataset=dataset)
    t_run = time.perf_counter()
    runner.run()
    t_end = time.perf_counter()
    trainer = timing["trainer"]
    last = trainer.build_train_step_log_dict(timing["out"], trainer.n_training_samples)
    steps = timing["n"]
    return {"tool": "saelens", "stage": "train", "steps": steps, "tokens": steps * a.batch,
            "import_s": t_import - START, "init_s": t_run - t_init, "run_s": t_end - t_run,
            "loop_s": timing["last"] - timing["first"], "in_process_s": t_end - START,
            "normalize_activations": a.normalize, "exclude_bos": a.exclude_bos,
            "last_batch": {k: float(v) for k, v in last.items()
                           if k.startswith(("losses/", "metrics/")) and _is_number(v)},
            "torch_threads": torch.get_num_threads(), "versions": versions()}


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- check

@torch.no_grad()
def cmd_check(a: argparse.Namespace) -> dict:
    """FVU and L0 of the saved SAE through SAELens' own inference code, on the held-out rows."""
    import numpy as np
    from sae_lens import SAE

    sae = SAE.load_from_disk(a.sae, device="cpu")
    x = torch.from_numpy(np.load(a.rows)).float()          # (n, d_in) raw resid_mid
    err = total = 0.0
    active = 0
    mean = x.mean(0)
    for i in range(0, len(x), 1024):
        xb = x[i:i + 1024]
        acts = sae.encode(xb)                               # (b, d_sae)
        err += float(((sae.decode(acts) - xb) ** 2).sum())
        total += float(((xb - mean) ** 2).sum())
        active += int((acts != 0).sum())
    return {"tool": "saelens", "stage": "check", "rows": len(x), "fvu": err / total, "l0": active / len(x),
            "architecture": sae.cfg.architecture()}


def versions() -> dict:
    from importlib import metadata

    return {p: metadata.version(p) for p in ("sae-lens", "transformer-lens", "torch", "transformers", "datasets")}


# ---------------------------------------------------------------------------------------- cli

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("cache", "train"):
        s = sub.add_parser(name)
        s.add_argument("--hook", required=True)
        s.add_argument("--d-in", type=int, required=True)
        s.add_argument("--context", type=int, default=256)
        s.add_argument("--model-batch", type=int, default=8, help="prompts per LLM / cache batch")
        s.add_argument("--docs", required=True, help="JSONL file of the documents (text field)")
        s.add_argument("--out", required=True)
        s.add_argument("--json", required=True)
    c = sub.choices["cache"]
    c.add_argument("--model-dir", required=True)
    c.add_argument("--tokens", type=int, required=True)
    t = sub.choices["train"]
    t.add_argument("--cache", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--batch", type=int, default=1024)
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], required=True,
                   help="cumulative Matryoshka widths, the last equal to --d-sae")
    t.add_argument("--k", type=float, required=True)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--min-lr-ratio", type=float, default=0.01)
    t.add_argument("--normalize", default="expected_average_only_in",
                   choices=["expected_average_only_in", "covariance_whitening", "none"])
    t.add_argument("--norm-batches", type=int, default=50)
    t.add_argument("--exclude-bos", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--bos-id", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("check")
    k.add_argument("--sae", required=True)
    k.add_argument("--rows", required=True)
    k.add_argument("--json", required=True)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    a = parse(argv)
    result = {"cache": cmd_cache, "train": cmd_train, "check": cmd_check}[a.cmd](a)
    write_json(a.json, result)
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

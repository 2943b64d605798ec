"""Exports of trained transcoders to other tools' file formats: circuit-tracer's transcoder set
(`tc export circuit-tracer`, one run per layer) and SAELens's JumpReLU transcoder (`tc export
saelens`). Math and layouts: docs/circuits.md. tc never imports either tool; bench/interop/ checks
the files with each tool's own loader, in its own virtual environment.

Both formats apply a transcoder to RAW activations, so tc's normalisation is folded into the
weights (`fold`): with x_n = (x - mu_s) / s_s and y = mu_t + s_t * y_n (pipeline/transcoder.py),

  pre  = x_n W_enc^T + b_enc             = x (W_enc / s_s)^T + (b_enc - W_enc mu_s / s_s)
  y    = mu_t + s_t (a W_dec + b_dec + x_n W_skip^T)
       = a (s_t W_dec) + x ((s_t / s_s) W_skip)^T + (mu_t + s_t b_dec - (s_t / s_s) W_skip mu_s)

The pre-activations are tc's own, so BatchTopK's inference threshold (a cutoff on them) carries
over unchanged as every latent's JumpReLU threshold. Decoder rows are no longer unit norm (their
norm is s_t): the activations stay tc's, the magnitude of a latent's output moves into W_dec.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config import checked
from pipeline.run import Run, RunSet, is_set, open_set_layer
from pipeline.transcoder import Transcoder
from pipeline.util import (UserError, file_checksum, opt, replaced_atomically, user_cache_dir, versions,
                           write_config_toml, write_file_atomic, write_json_atomic)

EXPORT_RECORD = "tc-export.json"
SAELENS_FORMAT_VERSION = "6.54.12"   # the SAELens release whose loader the layout was checked against
CIRCUIT_TRACER_FORMAT_VERSION = "0.5.0"


def parse_path_list(text: str | list) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (run folders; commas separate them on the command line)."""
    items = text if isinstance(text, list) else str(text).split(",")
    if not all(isinstance(v, str) for v in items):
        raise UserError(f"bad list {text!r}: give run folders, e.g. runs/l0,runs/l1")
    return [v.strip() for v in items if v.strip()]


@dataclass
class CircuitTracerConfig:
    run: list[str] = opt([], "Run folders made by `tc train`, one per layer, separated by commas "
                         "(e.g. runs/l0,runs/l1), or a set folder (`tc train --layers`).", "Input",
                         parse=parse_path_list)
    out: str = opt("", "Output folder: layer_{i}.safetensors, config.yaml, tc-export.json.", "Output")
    overwrite: bool = opt(False, "Write into a non-empty --out, replacing the files of an earlier export.",
                          "Output")
    n_layers: int | None = opt(None, "Layers of the model, to name the missing ones (default: from the model's "
                               "config when tc knows the model).", "Input")


@dataclass
class SAELensConfig:
    run: str = opt("", "Run folder made by `tc train`, or a set folder (`tc train --layers`) with --layer.", "Input")
    layer: int | None = opt(None, "The layer to export, when --run is a set.", "Input")
    out: str = opt("", "Output folder: cfg.json, sae_weights.safetensors, tc-export.json.", "Output")
    overwrite: bool = opt(False, "Write into a non-empty --out, replacing the files of an earlier export.",
                          "Output")


# ----------------------------------------------------------------------------- the fold

@torch.no_grad()
def fold(tc: Transcoder) -> dict[str, Tensor]:
    """tc's weights with its normalisation folded in, float32, in tc's orientation: W_enc (F, d_in),
    b_enc (F,), W_dec (F, d_out), b_dec (d_out,), threshold (F,), and W_skip (d_out, d_in) for a skip
    transcoder. Applied to raw rows they give tc's pre-activations and predictions (module docstring).
    Computed in float64 so the only rounding is the final cast."""
    rule = tc.sparsity.spec()
    if rule.get("rule") != "batchtopk":
        raise UserError(f"this export knows the batchtopk sparsity rule only, the transcoder has {rule}")
    t = {name: v.detach().double().cpu() for name, v in tc.file_tensors().items()}
    s_in, s_out = float(t["source_scale"]), float(t["target_scale"])
    w_enc = t["W_enc"] / s_in
    out = {"W_enc": w_enc, "b_enc": t["b_enc"] - w_enc @ t["source_mean"], "W_dec": t["W_dec"] * s_out,
           "b_dec": t["target_mean"] + s_out * t["b_dec"],
           # tc's inference keeps pre > threshold and never a negative value: JumpReLU at max(threshold, 0)
           "threshold": torch.full((tc.d_latent,), max(float(t["threshold"]), 0.0), dtype=torch.float64)}
    if "W_skip" in t:
        w_skip = t["W_skip"] * (s_out / s_in)
        out["W_skip"] = w_skip
        out["b_dec"] = out["b_dec"] - w_skip @ t["source_mean"]
    return {name: v.float().contiguous() for name, v in out.items()}


# ----------------------------------------------------------------------------- the runs

@dataclass
class RunInfo:
    """What an export needs to know about one finished run."""
    run: Run
    tc: Transcoder
    model: str
    layer: int
    hooks: dict[str, str]

    def record(self) -> dict[str, Any]:
        summary = self.run.summary()
        return {"run": str(self.run.path.resolve()), "layer": self.layer, "model": self.model, "hooks": self.hooks,
                "transcoder_checksum": summary.get("transcoder_checksum") or file_checksum(self.run.transcoder_file),
                "config": self.run.config()}


def expand_sets(paths: list[str]) -> list[str]:
    """Run folders, a set folder standing for its runs (one per layer)."""
    out = []
    for path in paths:
        out += [str(run.path) for run in RunSet(path).runs()] if is_set(path) else [path]
    return out


def open_finished(path: str, layer: int | None = None) -> RunInfo:
    """A finished run (a set's `layer`, when `path` is a set), its transcoder and its store's identity
    (model, layer, hooks), or one line."""
    run = open_set_layer(path, layer)
    if not run.finished:
        raise UserError(f"{run.path} has not finished training (no {run.summary_file.name}): finish it with "
                        f"`tc train --resume {run.path}` before exporting")
    tc = run.transcoder("cpu")
    store = run.config().get("store") or {}
    model, layer, hooks = (store.get("model", tc.meta.get("model")), store.get("layer", tc.meta.get("layer")),
                           store.get("hooks", tc.meta.get("hooks")))
    if model is None or not isinstance(layer, int) or not isinstance(hooks, dict):
        raise UserError(f"{run.path} does not record its model, layer and hooks (config.json's store): "
                        "train it again with this tc")
    return RunInfo(run, tc, str(model), layer, dict(hooks))


def hook_kind(hook: str, layer: int) -> str:
    """'blocks.6.hook_resid_mid' -> 'hook_resid_mid' (circuit-tracer names hook points per layer)."""
    prefix = f"blocks.{layer}."
    if not hook.startswith(prefix):
        raise UserError(f"hook {hook!r} is not a hook of layer {layer} (blocks.{layer}.*): circuit-tracer needs "
                        "per-layer hooks")
    return hook[len(prefix):]


def check_set(infos: list[RunInfo]) -> None:
    """One model, the same hook points, one transcoder per layer, one dictionary width and model width."""
    first = infos[0]
    seen: dict[int, Run] = {}
    for info in infos:
        if info.layer in seen:
            raise UserError(f"two runs of layer {info.layer}: {seen[info.layer].path} and {info.run.path}; "
                            "give one run per layer")
        seen[info.layer] = info.run
        if info.model != first.model:
            raise UserError(f"runs of different models: {first.run.path} is {first.model}, {info.run.path} is "
                            f"{info.model}")
        kinds = {k: hook_kind(h, info.layer) for k, h in info.hooks.items()}
        want = {k: hook_kind(h, first.layer) for k, h in first.hooks.items()}
        if kinds != want:
            raise UserError(f"runs of different hooks: {first.run.path} reads {want}, {info.run.path} reads {kinds}")
        if (info.tc.d_in, info.tc.d_out, info.tc.d_latent) != (first.tc.d_in, first.tc.d_out, first.tc.d_latent):
            raise UserError(f"runs of different widths: {info.run.path} has d_in {info.tc.d_in}, d_out "
                            f"{info.tc.d_out}, {info.tc.d_latent} latents, {first.run.path} has {first.tc.d_in}, "
                            f"{first.tc.d_out}, {first.tc.d_latent} (circuit-tracer needs one width per set)")


def model_layers(model: str) -> int | None:
    """The number of layers of a model tc knows without loading it (None when it cannot tell)."""
    from pipeline import models

    try:
        if model == "tiny":
            return int(models._tiny_config().num_hidden_layers)
        if model == models.GEMMA3:
            config = user_cache_dir() / "models" / models.GEMMA3 / "config.json"   # never converts here
            data = json.loads(config.read_text())
            return int(data.get("num_hidden_layers") or data["text_config"]["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def missing_layers(layers: list[int], n_layers: int | None) -> list[int]:
    top = n_layers if n_layers is not None else max(layers) + 1
    return [i for i in range(top) if i not in layers]


# ----------------------------------------------------------------------------- writing

def prepare_out(out: str, overwrite: bool, ours: str) -> Path:
    """The output folder, made; a non-empty one only with --overwrite, and then the files of an
    earlier export (names matching `ours`) are removed so none is left over."""
    if not str(out).strip():
        raise UserError("no output folder given: pass --out DIR")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is a file: choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"{path} is not empty: choose another --out, or pass --overwrite to replace an "
                            "earlier export there")
        for old in path.iterdir():
            if old.is_file() and re.fullmatch(ours, old.name):
                old.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_tensors(path: Path, tensors: dict[str, Tensor], record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with replaced_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tc_export": json.dumps(record)})
        tmp.chmod(0o644)   # safetensors writes 0600; an export is for other tools and people to read


def export_record(kind: str, cfg: Any, infos: list[RunInfo], files: list[str], extra: dict[str, Any]) -> dict:
    return {"format": kind, "files": files, "config": asdict(cfg), "versions": versions(),
            "fold": "normalisation folded into the weights; pre-activations equal tc's, threshold unchanged "
                    "(docs/circuits.md)", **extra, "runs": [info.record() for info in infos]}


def yaml_lines(config: dict[str, Any]) -> str:
    """A flat mapping as YAML; every scalar written as JSON (a subset YAML reads the same)."""
    lines = []
    for key, value in config.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def run_circuit_tracer(cfg: CircuitTracerConfig) -> Path:
    """Write circuit-tracer's transcoder-set layout from one run per layer; returns the folder."""
    cfg = checked(cfg)
    if not cfg.run:
        raise UserError("no run given: pass --run RUN (one per layer, separated by commas)")
    infos = sorted((open_finished(r) for r in expand_sets(cfg.run)), key=lambda i: i.layer)
    check_set(infos)
    out = prepare_out(cfg.out, cfg.overwrite, r"layer_\d+\.safetensors|config\.yaml|tc-export.*")
    layers = [i.layer for i in infos]
    n_layers = cfg.n_layers if cfg.n_layers is not None else model_layers(infos[0].model)
    missing = missing_layers(layers, n_layers)
    skip = any(i.tc.skip for i in infos)
    files = []
    for info in infos:
        tensors = circuit_tracer_tensors(fold(info.tc), skip)
        name = f"layer_{info.layer}.safetensors"
        save_tensors(out / name, tensors, {"tc_run": str(info.run.path.resolve()), "layer": info.layer,
                                           "versions": versions()})
        files.append(name)
    first = infos[0]
    config = {"model_kind": "transcoder_set", "scan": f"tc/{first.model}/{'+'.join(map(str, layers))}",
              "feature_input_hook": hook_kind(first.hooks["source"], first.layer),
              "feature_output_hook": hook_kind(first.hooks["target"], first.layer)}
    if layers == list(range(len(layers))):   # circuit-tracer reads the list's position as the layer
        config["transcoders"] = files
    write_file_atomic(out / "config.yaml", yaml_lines(config))
    write_config_toml(out / "tc-export-circuit-tracer.toml", cfg)
    write_json_atomic(out / EXPORT_RECORD, export_record(
        "circuit-tracer transcoder_set", cfg, infos, files + ["config.yaml"],
        {"circuit_tracer_version_checked": CIRCUIT_TRACER_FORMAT_VERSION, "layers": layers, "n_layers": n_layers,
         "missing_layers": missing, "skip": skip, "model": first.model}))
    if missing:
        of = f"of {n_layers}" if n_layers is not None else "below the highest"
        print(f"warning: layers {','.join(map(str, missing))} ({len(missing)} {of}) have no transcoder: "
              "circuit-tracer's attribution needs one for every layer, add runs for them")
    if any(not i.tc.skip for i in infos) and skip:
        print("note: plain transcoders in a skip set were given a zero W_skip (circuit-tracer wants one kind)")
    print(f"exported {len(infos)} transcoder(s), layers {','.join(map(str, layers))} -> {out}")
    return out


def circuit_tracer_tensors(folded: dict[str, Tensor], skip: bool) -> dict[str, Tensor]:
    """circuit-tracer's per-layer names and orientation: W_enc (F, d) used as F.linear(x, W_enc, b_enc),
    W_dec (F, d), JumpReLU's `activation_function.threshold` (F,), W_skip (d, d) used as x @ W_skip^T."""
    tensors = {name: folded[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors["activation_function.threshold"] = folded["threshold"]
    if skip:
        d_out, d_in = folded["W_dec"].shape[1], folded["W_enc"].shape[1]
        tensors["W_skip"] = folded.get("W_skip", torch.zeros(d_out, d_in))
    return tensors


def saelens_tensors(folded: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens's transcoder names and orientation: W_enc (d_in, F) used as x @ W_enc + b_enc, W_dec
    (F, d_out), threshold (F,), W_skip (d_out, d_in) used as x @ W_skip^T."""
    tensors = {"W_enc": folded["W_enc"].t().contiguous(), "b_enc": folded["b_enc"], "W_dec": folded["W_dec"],
               "b_dec": folded["b_dec"], "threshold": folded["threshold"]}
    if "W_skip" in folded:
        tensors["W_skip"] = folded["W_skip"]
    return tensors


def hf_name(model: str) -> str:
    """The Hugging Face id of a tc built-in model when it has one (SAELens loads models by it)."""
    from pipeline import models

    return models.GEMMA3_HF_NAME if model == models.GEMMA3 else model


def saelens_cfg(info: RunInfo) -> dict[str, Any]:
    """cfg.json as SAELens 6 reads it: the config fields at the top, the model and hooks in metadata."""
    store = info.run.config().get("store") or {}
    return {"architecture": "jumprelu_skip_transcoder" if info.tc.skip else "jumprelu_transcoder",
            "d_in": info.tc.d_in, "d_sae": info.tc.d_latent, "d_out": info.tc.d_out, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                         "model_name": hf_name(info.model), "hook_name": info.hooks["source"],
                         "hook_name_out": info.hooks["target"], "hook_head_index": None,
                         "hook_head_index_out": None, "prepend_bos": True, "context_size": store.get("seq_len"),
                         "dataset_path": None}}


def run_saelens(cfg: SAELensConfig) -> Path:
    """Write SAELens's JumpReLU (skip) transcoder layout; returns the folder."""
    cfg = checked(cfg)
    info = open_finished(cfg.run, cfg.layer)
    out = prepare_out(cfg.out, cfg.overwrite, r"cfg\.json|sae_weights\.safetensors|tc-export.*")
    save_tensors(out / "sae_weights.safetensors", saelens_tensors(fold(info.tc)),
                 {"tc_run": str(info.run.path.resolve()), "layer": info.layer, "versions": versions()})
    write_json_atomic(out / "cfg.json", saelens_cfg(info))
    write_config_toml(out / "tc-export-saelens.toml", cfg)
    write_json_atomic(out / EXPORT_RECORD, export_record(
        "saelens transcoder", cfg, [info], ["sae_weights.safetensors", "cfg.json"],
        {"saelens_version_checked": SAELENS_FORMAT_VERSION, "architecture": saelens_cfg(info)["architecture"]}))
    print(f"exported {info.run.path} (layer {info.layer}) as a SAELens {saelens_cfg(info)['architecture']} -> {out}")
    return out

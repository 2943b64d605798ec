"""`tc eval`: how faithful a trained transcoder is, measured two ways (method in docs/eval.md).

1. Spliced into the model, on held-out text (pipeline/lm_eval.py): the language model's
   next-token cross-entropy clean, with the layer's MLP output replaced by the transcoder's
   prediction, and zero-ablated; the fraction of loss recovered, the CE increase, the KL divergence.
2. On store rows, without the model (pipeline/row_eval.py): FVU overall and per Matryoshka prefix,
   variance explained, L0, dead and dense feature fractions.

`--run SET` (a set of transcoders, `tc train --layers`) evaluates every member on its layer's
store rows, and splices all of them into the model at once (each layer's MLP output replaced by
its transcoder's prediction in one forward), against the clean model and all those MLPs
zero-ablated.

This module is the command: its config, the checks, which text and model to use, the output.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline import lm_eval
from pipeline.config import checked
from pipeline.row_eval import row_metrics
from pipeline.run import Run, RunSet, is_set, open_run
from pipeline.storage import resolved
from pipeline.store import Store
from pipeline.transcoder import Transcoder
from pipeline.util import (UserError, opt, parse_count, pick_device, replaced_atomically, versions, write_config_toml,
                           write_json_atomic)

DENSE_DEFAULT = 0.1


@dataclass
class EvalConfig:
    run: str | None = opt(None, "Run folder made by `tc train` (holds config.json and transcoder.safetensors), or a set "
                          "folder (`tc train --layers`): every layer, and all of them spliced in at once.", "Input")
    cache: str | None = opt(None, "Store for the row metrics (default: the store the run trained on; for a set, a store "
                            "holding all its layers).", "Input")
    model: str | None = opt(None, "Model to splice the transcoder into (default: the store's model).", "Model")
    dataset: str | None = opt(None, "Text for the language-model loss (default: the store's dataset, continuing after the text the store holds).", "Text")
    dataset_config: str | None = opt(None, "HF dataset config name (default: the store's when --dataset is the store's).", "Text")
    split: str | None = opt(None, "HF dataset split (default: the store's).", "Text")
    text_column: str | None = opt(None, "Column that holds the text (default: the store's).", "Text")
    tokens: int = opt(100_000, "Held-out tokens for the language-model loss (100k, 1M); rounded up to whole sequences.", "Text", parse=parse_count)
    seq_len: int | None = opt(None, "Tokens per held-out sequence, BOS included (default: the store's).", "Text")
    include_bos: bool = opt(False, "Also replace the MLP output at BOS positions and score the predictions made from them.", "Text")
    lm_loss: bool = opt(True, "Measure the model's loss with the transcoder spliced in (needs the model); --no-lm-loss for the store-row metrics only.", "Text")
    each_layer: bool = opt(False, "With --run SET: also splice each layer's transcoder in alone (one more pass per layer).", "Text")
    rows: int = opt(200_000, "Store rows (whole chunks spread over the store) for FVU, L0, dead and dense features.", "Store rows", parse=parse_count)
    dense_threshold: float = opt(DENSE_DEFAULT, "A feature is dense when it fires on more than this fraction of the evaluated rows.", "Store rows")
    batch_size: int | None = opt(None, "Sequences per forward pass (default: about 4,096 positions in the one stacked forward of the "
                              "clean, spliced and zero-ablated passes).", "Compute")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")
    dtype: str = opt("auto", "Model compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.", "Compute")


def text_source(cfg: EvalConfig, store: Store) -> tuple[dict[str, Any], bool]:
    """The text spec to evaluate on, and whether it is the store's own text stream.

    Options left unset take the store's values when the dataset is the store's, else the defaults.
    """
    made = store.attrs.get("config", {})
    store_spec = {"dataset": made.get("dataset"), "split": made.get("split", "train"),
                  "dataset_config": made.get("dataset_config"), "text_column": made.get("text_column", "text")}
    if cfg.dataset is None and store_spec["dataset"] is None:
        raise UserError(f"the store {store.path} does not record its dataset: pass --dataset")
    if cfg.dataset in (None, store_spec["dataset"]):
        base = store_spec
    else:
        base = {"dataset": cfg.dataset, "split": "train", "dataset_config": None, "text_column": "text"}
    spec = {key: getattr(cfg, key) if getattr(cfg, key) is not None else value for key, value in base.items()}
    return spec, spec == store_spec


# ============================================================================ the command

def validate(cfg: EvalConfig) -> None:
    """Checks that need nothing loaded."""
    for name in ("tokens", "rows", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (BOS plus one token), got {cfg.seq_len}")
    if not 0 < cfg.dense_threshold <= 1:
        raise UserError(f"--dense-threshold is a fraction of rows in (0, 1], got {cfg.dense_threshold}")


def check_fits(transcoder: Transcoder, store: Store) -> None:
    """The store must hold the activations the transcoder was trained to read and predict."""
    if (transcoder.d_in, transcoder.d_out) != (store.d_model, store.d_model):
        raise UserError(f"the transcoder maps {transcoder.d_in} -> {transcoder.d_out} dims but the store "
                        f"{store.path} has d_model {store.d_model}: pass the run's store with --cache")
    hooks = transcoder.meta.get("hooks")
    if hooks and hooks != store.hooks:
        raise UserError(f"the transcoder reads {hooks.get('source')} -> {hooks.get('target')} but the store "
                        f"{store.path} holds {store.hooks['source']} -> {store.hooks['target']}: pass a store "
                        "of the same hooks with --cache")
    model = transcoder.meta.get("model")
    if model and store.attrs.get("model") and model != store.attrs["model"]:
        raise UserError(f"the transcoder was trained on {model} activations but the store {store.path} holds "
                        f"{store.attrs['model']}'s: pass a store of the same model with --cache")


def model_dtype(name: str, device: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype {name!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def load_eval_model(spec: str, store: Store, device: str, dtype: torch.dtype | None) -> Any:
    """The model to splice into; one clear UserError when it cannot be loaded or does not fit."""
    from pipeline.models import load_model

    try:
        lm = load_model(spec, device=device, dtype=dtype)
    except UserError as e:
        raise UserError(f"cannot load model {spec!r} to splice the transcoder into: {e} "
                        "(pass --model, or --no-lm-loss for the store-row metrics only)") from None
    except Exception as e:
        raise UserError(f"cannot load model {spec!r} to splice the transcoder into: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]} (pass --model, or --no-lm-loss for the store-row "
                        "metrics only)") from None
    if lm.d_model != store.d_model:
        raise UserError(f"model {spec} has d_model {lm.d_model} but the store has {store.d_model}: "
                        "pass the model the store was made from with --model")
    for name in store.hooks.values():
        if name not in lm.model.hook_dict:
            raise UserError(f"model {spec} has no hook {name}: pass the model the store was made from with --model")
    return lm


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """`tc eval` end to end: returns what it writes to RUN/eval.json."""
    cfg = checked(cfg)
    t0 = time.perf_counter()
    validate(cfg)
    if cfg.run is not None and is_set(cfg.run):
        return run_set_eval(cfg, RunSet(cfg.run), t0, progress)
    run = open_run(cfg.run)
    if cfg.each_layer:
        raise UserError(f"--each-layer is for a set of transcoders (--run SET); {run.path} is one run: drop it")
    device = pick_device(cfg.device)
    transcoder = run.transcoder(device)   # first: an unfinished run is the likelier mistake
    store = run.store(cfg.cache)
    check_fits(transcoder, store)
    result: dict[str, Any] = {"run": str(run), "store": store.path, "model": None, "layer": store.attrs.get("layer"),
                              "hooks": store.hooks}
    train_store = run.training_store(store)   # the held-out text must avoid ITS text

    def store_rows(stop: threading.Event) -> dict[str, Any]:
        rows = row_metrics(transcoder, store, cfg.rows, device, cfg.dense_threshold, cfg.include_bos, progress=progress,
                           stop=stop)
        rows["rows_are_training_rows"] = resolved(train_store.path) == resolved(store.path)
        return rows

    result["model"], lm, rows = rows_beside_model(cfg, train_store, [store], device, store_rows, progress)
    result["rows"] = rows
    if lm is not None:
        pair = (store.hooks["source"], store.hooks["target"])
        splices = {"spliced": {pair: lm_eval.transcoder_replacement(transcoder)}, "zero": {pair: lm_eval.zero_replacement}}
        result["lm"] = lm_section(cfg, train_store, lm, splices, progress)
    result.update({"seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg), "versions": versions()})
    write_json_atomic(run.eval_file, result)
    write_config_toml(run.eval_toml, cfg)
    print(format_table(result), flush=True)   # before the plot: importing matplotlib takes seconds
    plot_fvu(rows, run.eval_plot, title=f"{run.path.name}: FVU per Matryoshka prefix on {rows['n_rows']:,} store rows")
    print(f"wrote {run.eval_file} and {run.eval_plot}")
    return result


class Background:
    """fn(stop) in a daemon thread, started at once; result() waits for it and raises what it
    raised; stop() sets the Event fn was handed, for it to end early. A daemon thread, so Ctrl-C
    in the main thread does not wait for it."""

    def __init__(self, fn: Callable[[threading.Event], Any]):
        self._out: Any = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[threading.Event], Any]) -> None:
        try:
            self._out = fn(self._stop)
        except BaseException as e:   # handed to the thread that asks for the result
            self._error = e

    def stop(self, wait_s: float = 0.0) -> None:
        """Ask fn to end, and wait up to wait_s seconds for it to do so."""
        self._stop.set()
        self._thread.join(wait_s)

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def rows_beside_model(cfg: EvalConfig, train_store: Store, stores: list[Store], device: str,
                      rows: Callable[[threading.Event], Any], progress: bool) -> tuple[str | None, Any, Any]:
    """(model spec, loaded model, rows(stop)): the model (None with --no-lm-loss) loaded while
    rows(stop) computes the store-row metrics in another thread.

    The load is mostly Python (imports, the bridge's setup) holding the GIL on one core; the row
    metrics are torch arithmetic that releases it, so on two cores they overlap (docs/benchmarks.md).
    An unloadable model still fails at once (the rows are told to stop). Hugging Face sets
    torch's process-wide default dtype to the model's while it builds the model, so with a dtype
    other than the default (bfloat16 on GPU) the rows wait for the load instead.
    """
    if not cfg.lm_loss:
        return None, None, rows(threading.Event())
    from pipeline.models import default_dtype

    spec = cfg.model or train_store.attrs.get("model")
    status(f"eval: loading model {spec} on {device}", progress)
    dtype = model_dtype(cfg.dtype, device)
    if (dtype or default_dtype(device)) != torch.get_default_dtype():
        return spec, eval_model(spec, stores, device, dtype), rows(threading.Event())
    job = Background(rows)
    try:
        lm = eval_model(spec, stores, device, dtype)
    except Exception:
        job.stop(wait_s=10)   # the rows end before their next chunk; their bar closes before the error
        raise
    except BaseException:     # Ctrl-C: no waiting
        job.stop()
        raise
    return spec, lm, job.result()


def eval_model(spec: str, stores: list[Store], device: str, dtype: torch.dtype | None) -> Any:
    """The loaded model `spec`, checked against every store."""
    lm = load_eval_model(spec, stores[0], device, dtype)
    for store in stores[1:]:
        missing = [name for name in store.hooks.values() if name not in lm.model.hook_dict]
        if missing:
            raise UserError(f"model {spec} has no hook {missing[0]}: pass the model the store was made from with --model")
    return lm


def lm_section(cfg: EvalConfig, store: Store, lm: Any, splices: dict[str, lm_eval.Splice],
               progress: bool) -> dict[str, Any]:
    """The spliced language-model loss on text held out from `store` (the run's training store):
    clean against each splice; the headline numbers are those of "spliced" and "zero"."""
    from pipeline.text import iter_documents

    spec, same = text_source(cfg, store)
    seq_len = cfg.seq_len or store.seq_len
    n_seqs = -(-cfg.tokens // seq_len)
    status(f"eval: packing held-out text from {spec['dataset']}"
           + (" (after re-reading the store's text)" if same else ""), progress)
    docs = iter_documents(spec["dataset"], split=spec["split"], config=spec["dataset_config"],
                          text_column=spec["text_column"])
    seqs, info = lm_eval.held_out_sequences(docs, lm.tokenizer, lm.bos_id, seq_len, n_seqs,
                                    store if same else None, progress)
    if len(seqs) < n_seqs:
        print(f"note: the held-out text ran out: evaluating on {seqs.size:,} of the {n_seqs * seq_len:,} tokens asked for")
    batch = cfg.batch_size or lm_eval.shared_batch_size(seq_len, 1 + len(splices))
    losses = lm_eval.splice_losses(lm.model, seqs, splices, lm.bos_id, cfg.include_bos, batch, lm.device, progress)
    out = lm_eval.splice_report(losses)
    out.update({"text": {**spec, "same_as_store": same, **info, "sequences": len(seqs), "seq_len": seq_len,
                         "tokens": int(seqs.size), "tokens_asked": n_seqs * seq_len},
                "include_bos": cfg.include_bos, "batch_size": batch, "per_pass": losses})
    return out


# ============================================================================ a set of transcoders

def set_members(cfg: EvalConfig, runset: RunSet, device: str) -> list[tuple[int, Run, Transcoder, Store]]:
    """(layer, run, transcoder, its layer's store) per member, every check done before any work."""
    members = []
    for layer in runset.layers():
        run = open_run(runset.layer_run(layer).path)
        transcoder = run.transcoder(device)
        store = run.store(cfg.cache)
        check_fits(transcoder, store)
        members.append((layer, run, transcoder, store))
    if not members:
        raise UserError(f"{runset.path} lists no layers in its {runset.manifest_file.name}")
    return members


def set_splices(members: list[tuple[int, Run, Transcoder, Store]], each_layer: bool) -> dict[str, lm_eval.Splice]:
    """The passes of a set: "spliced" (every member's transcoder at once), "zero" (every member's
    MLP output zeroed) and, with each_layer, "layer_L" (member L alone)."""
    pairs = {layer: (store.hooks["source"], store.hooks["target"]) for layer, _, _, store in members}
    splices: dict[str, lm_eval.Splice] = {
        "spliced": {pairs[layer]: lm_eval.transcoder_replacement(tc) for layer, _, tc, _ in members},
        "zero": {pairs[layer]: lm_eval.zero_replacement for layer, *_ in members}}
    if each_layer:
        splices.update({f"layer_{layer}": {pairs[layer]: lm_eval.transcoder_replacement(tc)}
                        for layer, _, tc, _ in members})
    return splices


def run_set_eval(cfg: EvalConfig, runset: RunSet, t0: float, progress: bool) -> dict[str, Any]:
    """`tc eval --run SET`: each member's store-row metrics, and the model's loss with all of them
    spliced in at once. Returns what it writes to SET/eval.json."""
    device = pick_device(cfg.device)
    members = set_members(cfg, runset, device)
    first_run, first_store = members[0][1], members[0][3]
    train_store = first_run.training_store(first_store)   # one store for all: the held-out text avoids its text
    result: dict[str, Any] = {"set": str(runset), "layers": [m[0] for m in members], "store": first_store.path,
                              "model": None}

    def store_rows(stop: threading.Event) -> dict[str, Any]:
        per_layer = {}
        for layer, run, transcoder, store in members:
            status(f"eval: layer {layer}", progress)
            rows = row_metrics(transcoder, store, cfg.rows, device, cfg.dense_threshold, cfg.include_bos, progress=progress,
                               stop=stop)
            rows["rows_are_training_rows"] = resolved(run.training_store(store).path) == resolved(store.path)
            per_layer[str(layer)] = {"run": str(run), "hooks": store.hooks, "rows": rows}
        return per_layer

    result["model"], lm, result["per_layer"] = rows_beside_model(cfg, train_store, [m[3] for m in members], device,
                                                                 store_rows, progress)
    if lm is not None:
        result["lm"] = lm_section(cfg, train_store, lm, set_splices(members, cfg.each_layer), progress)
    result.update({"seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg), "versions": versions()})
    write_json_atomic(runset.eval_file, result)
    write_config_toml(runset.eval_toml, cfg)
    print(format_set_table(result), flush=True)
    plot_set_fvu(result, runset.eval_plot)
    print(f"wrote {runset.eval_file} and {runset.eval_plot}")
    return result


# ============================================================================ output

def status(line: str, progress: bool) -> None:
    """A one-line status at the start of a phase that has no bar of its own yet (on stderr, beside the bars)."""
    if progress:
        print(line, file=sys.stderr, flush=True)


def recovered_note(lm: dict[str, Any]) -> str:
    """A word when the fraction recovered means nothing: zero-ablating the MLP does not raise the loss."""
    if lm["fraction_recovered"] is not None and lm["ce_zero"] <= lm["ce_clean"]:
        return "   (meaningless here: the zero-ablated loss is not above the clean loss)"
    return ""


def format_table(result: dict[str, Any]) -> str:
    """The terminal summary."""
    lines = [f"tc eval  {result['run']}", f"  store {result['store']}  ({result['hooks']['source']} -> {result['hooks']['target']})"]
    lm = result.get("lm")
    if lm:
        t = lm["text"]
        fr = lm["fraction_recovered"]
        lines += [f"  language model {result['model']} on {t['tokens']:,} held-out tokens of {t['dataset']} "
                  f"({lm['n_scored_tokens']:,} scored)",
                  f"    {'CE clean':<22}{lm['ce_clean']:>10.4f}",
                  f"    {'CE spliced':<22}{lm['ce_spliced']:>10.4f}   ({lm['ce_increase']:+.4f} +- {lm['ce_increase_stderr']:.4f})",
                  f"    {'CE zero-ablated':<22}{lm['ce_zero']:>10.4f}",
                  f"    {'fraction recovered':<22}{'n/a' if fr is None else f'{fr:10.4f}':>10}{recovered_note(lm)}",
                  f"    {'KL(clean || spliced)':<22}{lm['kl_spliced']:>10.4f}",
                  f"    {'KL(clean || zero)':<22}{lm['kl_zero']:>10.4f}"]
    r = result["rows"]
    lines += [f"  store rows: {r['n_rows']:,} ({'rows the run trained on' if r['rows_are_training_rows'] else 'another store'})",
              f"    {'prefix (latents)':<22}{'FVU':>10}{'var. expl.':>12}{'L0 in group':>13}{'dead in group':>15}"]
    for i, m in enumerate(r["prefix_ends"]):
        lines.append(f"    {f'{i + 1} (< {m})':<22}{r['fvu_per_prefix'][i]:>10.4f}"
                     f"{r['variance_explained_per_prefix'][i]:>12.4f}{r['l0_per_group'][i]:>13.2f}{r['dead_per_group'][i]:>15,}")
    q = r["l0_quantiles"]
    lines += [f"    L0 mean {r['l0']:.2f}  (p10 {q['p10']}, median {q['p50']}, p90 {q['p90']}, p99 {q['p99']})",
              f"    dead (never active on these rows) {r['dead_fraction']:.2%} ({r['dead_features']:,})   "
              f"dense (> {r['dense_threshold']:.0%} of rows) {r['dense_fraction']:.2%} ({r['dense_features']:,})"]
    o = r.get("outliers") or {}
    if o.get("n_rows"):
        fvu = "n/a" if o["fvu"] is None else f"{o['fvu']:.4f}"
        lines.append(f"    outlier rows (left out above, see docs/store.md): {o['n_rows']:,}, FVU {fvu}")
    return "\n".join(lines)


def format_set_table(result: dict[str, Any]) -> str:
    """The terminal summary of a set: all layers spliced at once, then one line per layer."""
    layers = result["layers"]
    lines = [f"tc eval  {result['set']}  (a set of {len(layers)} transcoders: layers {','.join(map(str, layers))})",
             f"  store {result['store']}"]
    lm = result.get("lm")
    if lm:
        t, fr = lm["text"], lm["fraction_recovered"]
        lines += [f"  language model {result['model']} on {t['tokens']:,} held-out tokens of {t['dataset']} "
                  f"({lm['n_scored_tokens']:,} scored), the MLP output of all {len(layers)} layers replaced at once",
                  f"    {'CE clean':<28}{lm['ce_clean']:>10.4f}",
                  f"    {'CE all spliced':<28}{lm['ce_spliced']:>10.4f}   ({lm['ce_increase']:+.4f} +- {lm['ce_increase_stderr']:.4f})",
                  f"    {'CE all zero-ablated':<28}{lm['ce_zero']:>10.4f}",
                  f"    {'fraction recovered':<28}{'n/a' if fr is None else f'{fr:10.4f}':>10}{recovered_note(lm)}",
                  f"    {'KL(clean || all spliced)':<28}{lm['kl_spliced']:>10.4f}",
                  f"    {'KL(clean || all zero)':<28}{lm['kl_zero']:>10.4f}"]
    alone = bool(lm) and f"layer_{layers[0]}" in lm["per_pass"]
    head = f"    {'layer':<8}{'FVU':>9}{'FVU p1':>9}{'L0':>8}{'dead':>9}{'dense':>9}{'outliers':>10}"
    trained_on = all(m["rows"]["rows_are_training_rows"] for m in result["per_layer"].values())
    lines += [f"  per layer, store rows ({'the rows the runs trained on' if trained_on else 'another store'})",
              head + (f"{'CE alone':>11}{'KL alone':>10}" if alone else "")]
    for layer in layers:
        r = result["per_layer"][str(layer)]["rows"]
        line = (f"    {layer:<8}{r['fvu']:>9.4f}{r['fvu_per_prefix'][0]:>9.4f}{r['l0']:>8.2f}"
                f"{r['dead_fraction']:>9.2%}{r['dense_fraction']:>9.2%}{r['outliers']['n_rows']:>10,}")
        if alone:
            p = lm["per_pass"][f"layer_{layer}"]
            line += f"{p['ce']:>11.4f}{p['kl']:>10.4f}"
        lines.append(line)
    lines.append(f"    ({result['per_layer'][str(layers[0])]['rows']['n_rows']:,} rows per layer; FVU p1: the first "
                 "Matryoshka prefix; every number of each layer is in eval.json)")
    return "\n".join(lines)


def plot_set_fvu(result: dict[str, Any], path: Path) -> None:
    """FVU (log scale) per layer: the whole transcoder and its first Matryoshka prefix; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    rows = [result["per_layer"][str(layer)]["rows"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [r["fvu"] for r in rows], marker="o", label="whole transcoder")
    ax.plot(layers, [r["fvu_per_prefix"][0] for r in rows], marker=".", linestyle="--", label="first prefix")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("FVU (store rows)")
    if min(r["fvu"] for r in rows) > 0:
        ax.set_yscale("log")
    ax.set_title(f"{Path(result['set']).name}: FVU per layer", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_fvu(rows: dict[str, Any], path: Path, title: str) -> None:
    """FVU (log scale) per Matryoshka prefix, labelled by the prefix's latent count; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ends, fvu = rows["prefix_ends"], rows["fvu_per_prefix"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(ends) + 1), fvu, marker="o")
    for i, (m, v) in enumerate(zip(ends, fvu)):
        ax.annotate(f"{v:.3f}", (i + 1, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(1, len(ends) + 1), [f"{i + 1}\n(< {m})" for i, m in enumerate(ends)])
    ax.set_xlabel("Matryoshka prefix (latents used)")
    ax.set_ylabel("FVU (store rows)")
    if min(fvu) > 0:
        ax.set_yscale("log")
    ax.margins(x=0.08, y=0.15)   # room for the value labels
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

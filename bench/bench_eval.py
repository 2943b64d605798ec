"""`tc eval`'s language-model passes: the shared-prefix path against the three separate forwards.

Both run in this process on the same loaded model, transcoder and held-out sequences (the demo's
run and store by default), alternating old, new, old, new, ...; each run's wall and process CPU
seconds are printed, then the median ratio old / new and the largest difference of the numbers
eval reports. The "separate" path is the code `tc eval` ran before the shared path
(score_batch and position_losses, unchanged), with its own default batch size.

    python bench/bench_eval.py --run data/demo/run --repeats 3 [--threads 1] [--json out.json]

With --whole OLD_SRC (a copy of the older code: `git archive main pipeline cli.py | tar -x -C
OLD_SRC`), it instead runs the whole `tc eval` command as a subprocess, alternating the older code
and this checkout, each on its own copy of the run folder (eval writes eval.json into it), and
reports each one's seconds, user CPU seconds and when its output first appeared and each phase
began (the first line of each status or bar).

With --unembed, it instead times the shared path with its unembedding products in float32 (as
`tc eval` runs them), in bfloat16 on the CPU's AMX units (oneDNN's bf16 mode for float32 matmuls:
inputs rounded to bf16, float32 accumulation and output) and as a bf16 hi/lo split (three bf16
products whose sum carries about 16 bits of each operand), alternating in one process, and prints
how far each one's reported numbers are from float32's, and whether they differ as printed.

With --phases, it instead says where this checkout's `tc eval` spends its time, each phase in
wall and process CPU seconds, one process: the imports (in a fresh subprocess), the model load
(tokenizer, Hugging Face weights, TransformerLens' bridge), the store-row metrics (run alone,
not beside the load), the held-out text (re-reading the store's text), and within the LM passes
the unembedding products, the CE/KL arithmetic and the rest (the blocks, the hooks, the splice).

With --rows, it instead times the store-row metrics phase (row_metrics over the run's store),
alternating the older per-batch squared error (float64 copies of the (G, B, d) predictions,
kept here as the reference) and the current one, and reports the largest FVU difference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import evaluate as ev
from pipeline import lm_eval
from pipeline.run import open_run
from pipeline.text import iter_documents

KEYS = ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero", "fraction_recovered", "ce_increase")


def held_out(run, lm, tokens: int):
    """The held-out sequences `tc eval --tokens N` would use."""
    store = run.training_store(run.store(None))
    spec, same = ev.text_source(ev.EvalConfig(), store)
    docs = iter_documents(spec["dataset"], split=spec["split"], config=spec["dataset_config"],
                          text_column=spec["text_column"])
    n_seqs = -(-tokens // store.seq_len)
    seqs, _ = lm_eval.held_out_sequences(docs, lm.tokenizer, lm.bos_id, store.seq_len, n_seqs,
                                         store if same else None, progress=False)
    return seqs, store.hooks


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


PHASES = ("eval: loading model", "eval: store rows", "eval: packing held-out text", "eval: skip the store's text",
          "eval: LM loss")


def run_cli(src: str, run: str, tokens: int, threads: int | None) -> dict:
    """One `tc eval` subprocess with PYTHONPATH=src: seconds, user CPU, when output first came and each phase began."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval."))
    shutil.copytree(run, tmp / "run", ignore=shutil.ignore_patterns("export", "samples", "activation_samples",
                                                                   "checkpoints"))
    env = {**os.environ, "PYTHONPATH": src}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", "import sys, cli; sys.argv[0] = 'tc'; sys.exit(cli.main())", "eval",
           "--run", str(tmp / "run"), "--tokens", str(tokens), "--device", "cpu"]
    start, before = time.perf_counter(), os.times()
    # cwd=src: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(cmd, env=env, cwd=src, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    first, phases, buf = None, {}, b""
    while chunk := proc.stderr.read1(4096):
        now = time.perf_counter() - start
        first = first if first is not None else now
        buf += chunk
        text = buf.decode(errors="replace")
        for name in PHASES:
            if name not in phases and name in text:
                phases[name] = now
    proc.wait()
    after = os.times()
    shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"tc eval failed ({src}): {buf.decode(errors='replace')[-2000:]}")
    return {"seconds": time.perf_counter() - start, "user_cpu_s": after.children_user - before.children_user,
            "sys_cpu_s": after.children_system - before.children_system, "first_output_s": first,
            "phase_start_s": phases}


def whole(args) -> None:
    here = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.repeats):
        for name, src in (("old", args.whole), ("new", here)):
            r = run_cli(src, args.run, args.tokens, args.threads)
            runs[name].append(r)
            print(f"repeat {i + 1} {name}: {r['seconds']:.1f} s, user cpu {r['user_cpu_s']:.1f} s, sys cpu "
                  f"{r['sys_cpu_s']:.1f} s, first output "
                  f"{r['first_output_s']:.1f} s, phases " + ", ".join(f"{k!r} {v:.1f}" for k, v in r["phase_start_s"].items()),
                  flush=True)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["old"], runs["new"])]
    cpu = [(a["user_cpu_s"] + a["sys_cpu_s"]) / (b["user_cpu_s"] + b["sys_cpu_s"]) for a, b in zip(runs["old"], runs["new"])]
    print(f"old / new, whole tc eval: wall {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}), "
          f"user+sys cpu {statistics.median(cpu):.2f}x (range {min(cpu):.2f}-{max(cpu):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios}, f, indent=1)


def add_rows_float64(tot, transcoder, x, y) -> None:
    """row_eval.add_rows as it was before: the squared error summed from float64 copies."""
    B = x.shape[0]
    preds, rows, cols = transcoder.predict_prefixes(x)
    tot.n += B
    yd = y.double()
    tot.y_sum += yd.sum(0).cpu().numpy()
    tot.y_sq += (yd * yd).sum(0).cpu().numpy()
    tot.err_sq += (preds - y).double().pow(2).sum(dim=(1, 2)).cpu().numpy()
    tot.fired += torch.bincount(cols, minlength=transcoder.d_latent).cpu().numpy()
    l0 = torch.bincount(rows, minlength=B)
    tot.l0_hist += torch.bincount(l0, minlength=transcoder.d_latent + 1).cpu().numpy()[: transcoder.d_latent + 1]
    tot.group_active += torch.bincount(transcoder.group_of(cols), minlength=len(transcoder.groups)).double().cpu().numpy()


def rows_phase(args) -> None:
    from pipeline import row_eval

    run = open_run(args.run)
    transcoder, store = run.transcoder("cpu"), run.store(None)
    current = row_eval.add_rows
    runs: dict[str, list[dict]] = {"float64": [], "now": []}
    for i in range(args.repeats):
        for name, fn in (("float64", add_rows_float64), ("now", current)):
            row_eval.add_rows = fn
            out, wall, cpu = timed(lambda: row_eval.row_metrics(transcoder, store, 200_000, "cpu", 0.1, progress=False))
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "fvu_per_prefix": out["fvu_per_prefix"], "l0": out["l0"]})
            print(f"repeat {i + 1} {name:<8} wall {wall:6.1f} s  cpu {cpu:6.1f} s  {out['n_rows']:,} rows  fvu "
                  + " ".join(f"{v:.9f}" for v in out["fvu_per_prefix"]), flush=True)
    row_eval.add_rows = current
    cpu = statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["float64"], runs["now"]))
    rel = max(abs(a - b) / b for r, q in zip(runs["float64"], runs["now"])
              for a, b in zip(r["fvu_per_prefix"], q["fvu_per_prefix"]))
    print(f"float64 / now: cpu {cpu:.2f}x; largest relative FVU difference {rel:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratio_cpu_median": cpu, "max_rel_fvu_difference": rel}, f, indent=1)


@contextlib.contextmanager
def bf16_matmuls():
    """oneDNN's bf16 mode for float32 matmuls inside (float32 in and out, bf16 products)."""
    prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = prev


def unembed_variants(model) -> dict:
    """unembed_logits replacements: float32 (tc's), bf16, and the bf16 hi/lo split."""
    exact = lm_eval.unembed_logits
    W = model.unembed.original_component.weight
    hi = W.bfloat16().float()
    lo = (W - hi).bfloat16().float()

    def bf16(model, h, out=None):
        with bf16_matmuls():
            return exact(model, h, out)

    def split(model, h, out=None):
        flat = h.reshape(-1, h.shape[-1])
        h_hi = flat.bfloat16().float()
        h_lo = (flat - h_hi).bfloat16().float()
        res = out.view(-1, out.shape[-1])
        with bf16_matmuls():
            torch.mm(h_hi, hi.T, out=res)
            res.addmm_(h_hi, lo.T)
            res.addmm_(h_lo, hi.T)
        return out   # Gemma 3 has no final softcap and no unembedding bias (checked in unembed_phase)

    return {"float32": exact, "bf16": bf16, "bf16 split": split}


PRINTED = {"ce_clean": 4, "ce_spliced": 4, "ce_zero": 4, "kl_spliced": 4, "kl_zero": 4, "fraction_recovered": 4,
           "ce_increase": 4}


def unembed_phase(args, lm, seqs, hooks, replacements) -> None:
    config = lm.model.original_model.config
    bias = lm.model.unembed.original_component.bias
    assert not getattr(config, "final_logit_softcapping", None) and (bias is None or not bool(bias.any()))
    variants = unembed_variants(lm.model)
    exact = lm_eval.unembed_logits
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.repeats):
        for name, fn in variants.items():
            lm_eval.unembed_logits = fn
            try:
                losses, wall, cpu = timed(lambda: lm_eval.lm_losses(
                    lm.model, seqs, hooks["source"], hooks["target"], replacements, lm.bos_id, False,
                    lm_eval.shared_batch_size(seqs.shape[1], 3), "cpu", progress=False))
            finally:
                lm_eval.unembed_logits = exact
            report = lm_eval.splice_report(losses)
            runs[name].append({"wall_s": wall, "cpu_s": cpu, "report": report})
            print(f"repeat {i + 1} {name:<10} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                  + "  ".join(f"{k} {report[k]:.8f}" for k in KEYS), flush=True)
    base = runs["float32"][0]["report"]
    for name in variants:
        r = runs[name][0]["report"]
        diff = {k: abs(r[k] - base[k]) for k in KEYS}
        printed = [k for k, d in PRINTED.items() if f"{r[k]:.{d}f}" != f"{base[k]:.{d}f}"]
        cpu = statistics.median(x["cpu_s"] for x in runs[name])
        print(f"{name}: median cpu {cpu:.1f} s; |difference| from float32: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + f"; differs as printed: {printed or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


IMPORTS = """
import time
def lap(name, t=[time.perf_counter(), time.process_time()]):
    w, c = time.perf_counter(), time.process_time()
    print(f"{name}\t{w - t[0]:.2f}\t{c - t[1]:.2f}")
    t[:] = [w, c]
import torch; lap("import torch")
import pipeline.evaluate, pipeline.store, pipeline.run; lap("import tc's eval modules")
import transformers.models.gemma3.modeling_gemma3; lap("import transformers' Gemma 3")
import transformer_lens.model_bridge; lap("import TransformerLens' bridge")
"""


class Timers:
    """Wall and process CPU seconds per name, summed over calls of the wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, module, attr: str, name: str) -> None:
        fn = getattr(module, attr)

        def timed_fn(*args, **kwargs):
            out, wall, cpu = timed(lambda: fn(*args, **kwargs))
            acc = self.seconds.setdefault(name, [0.0, 0.0])
            acc[0] += wall
            acc[1] += cpu
            return out

        setattr(module, attr, timed_fn)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.seconds[name] = [wall, cpu]


def phases(args) -> None:
    from pipeline import models, row_eval

    here = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": here}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, "-c", IMPORTS], env=env, cwd=here, capture_output=True, text=True, check=True)
    t = Timers()
    for line in out.stdout.splitlines():
        name, wall, cpu = line.split("\t")
        t.add(name, float(wall), float(cpu))
    for attr, name in (("_tokenizer_from_folder", "load: tokenizer"), ("_from_folder", "load: Hugging Face model"),
                       ("_boot", "load: TransformerLens bridge")):
        t.wrap(models, attr, name)
    run = open_run(args.run)
    store = run.store(None)
    lm, wall, cpu = timed(lambda: models.load_model(run.training_store(store).attrs["model"]))
    t.add("load: all", wall, cpu)
    transcoder = run.transcoder("cpu")
    _, wall, cpu = timed(lambda: row_eval.row_metrics(transcoder, store, 200_000, "cpu", 0.1, progress=False))
    t.add("store rows", wall, cpu)
    (seqs, hooks), wall, cpu = timed(lambda: held_out(run, lm, args.tokens))
    t.add("held-out text (re-reading the store's)", wall, cpu)
    t.wrap(lm_eval, "unembed_logits", "LM: unembedding products")
    t.wrap(lm_eval, "chunk_losses", "LM: CE/KL arithmetic")
    replacements = {"spliced": lm_eval.transcoder_replacement(transcoder), "zero": lm_eval.zero_replacement}
    _, wall, cpu = timed(lambda: lm_eval.lm_losses(lm.model, seqs, hooks["source"], hooks["target"], replacements,
                                                   lm.bos_id, False, lm_eval.shared_batch_size(seqs.shape[1], 3),
                                                   "cpu", progress=False))
    t.add("LM: all", wall, cpu)
    rest = [t.seconds["LM: all"][i] - t.seconds["LM: unembedding products"][i] - t.seconds["LM: CE/KL arithmetic"][i]
            for i in (0, 1)]
    t.add("LM: the rest (blocks, hooks, splice)", *rest)
    print(f"torch threads {torch.get_num_threads()}, {seqs.size:,} held-out tokens; wall / process CPU seconds")
    for name, (wall, cpu) in t.seconds.items():
        print(f"  {name:<42}{wall:8.2f}{cpu:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(t.seconds, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="data/demo/run")
    ap.add_argument("--tokens", type=int, default=4000, help="held-out tokens (the demo's eval-tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--whole", default=None, metavar="OLD_SRC", help="time the whole `tc eval` against the code in OLD_SRC")
    ap.add_argument("--rows", action="store_true", help="time the store-row metrics phase instead")
    ap.add_argument("--phases", action="store_true", help="where this checkout's tc eval spends its time, phase by phase")
    ap.add_argument("--unembed", action="store_true", help="time float32 / bf16 / bf16-split unembedding products instead")
    args = ap.parse_args()
    if args.whole:
        return whole(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rows:
        return rows_phase(args)
    if args.phases:
        return phases(args)
    from pipeline.models import load_model

    run = open_run(args.run)
    transcoder = run.transcoder("cpu")
    lm, load_s, _ = timed(lambda: load_model(run.training_store(run.store(None)).attrs["model"]))
    seqs, hooks = held_out(run, lm, args.tokens)
    replacements = {"spliced": lm_eval.transcoder_replacement(transcoder), "zero": lm_eval.zero_replacement}
    T = seqs.shape[1]
    batches = {"separate": lm_eval.auto_batch_size(T, lm.vocab_size), "shared": lm_eval.shared_batch_size(T, 3)}
    if args.unembed:
        return unembed_phase(args, lm, seqs, hooks, replacements)
    print(f"model load {load_s:.1f} s; {seqs.size:,} tokens ({len(seqs)} x {T}); torch threads "
          f"{torch.get_num_threads()}; batch sizes {batches}", flush=True)
    runs: dict[str, list[dict]] = {"separate": [], "shared": []}
    for i in range(args.repeats):
        for method in ("separate", "shared"):
            losses, wall, cpu = timed(lambda: lm_eval.lm_losses(
                lm.model, seqs, hooks["source"], hooks["target"], replacements, lm.bos_id, False,
                batches[method], "cpu", progress=False, method=method))
            report = lm_eval.splice_report(losses)
            runs[method].append({"wall_s": wall, "cpu_s": cpu, "report": report})
            print(f"repeat {i + 1} {method:<8} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                  + "  ".join(f"{k} {report[k]:.6f}" for k in KEYS[:6]), flush=True)
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["separate"], runs["shared"])]
    cpu_ratios = [a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["separate"], runs["shared"])]
    diff = {k: max(abs(a["report"][k] - b["report"][k]) for a in runs["separate"] for b in runs["shared"])
            for k in KEYS}
    out = {"tokens": int(seqs.size), "threads": torch.get_num_threads(), "batch_sizes": batches,
           "separate_wall_s": [r["wall_s"] for r in runs["separate"]], "shared_wall_s": [r["wall_s"] for r in runs["shared"]],
           "separate_cpu_s": [r["cpu_s"] for r in runs["separate"]], "shared_cpu_s": [r["cpu_s"] for r in runs["shared"]],
           "ratio_wall_median": statistics.median(ratios), "ratio_wall_range": [min(ratios), max(ratios)],
           "ratio_cpu_median": statistics.median(cpu_ratios), "max_abs_difference": diff}
    print(f"old / new: wall {out['ratio_wall_median']:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}), "
          f"cpu {out['ratio_cpu_median']:.2f}x")
    print("largest |old - new|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

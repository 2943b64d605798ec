"""Kill `tc cache`, `tc train` or `tc samples collect` at many wall-clock moments, resume, and compare with an
uninterrupted run. Not a speed benchmark: the by-hand check behind "a kill at any moment loses
nothing" (docs/store.md, docs/transcoder.md). The test suite kills at fixed points; this spreads
the kills over a whole run, startup and final writes included.

    python bench/kill_anywhere.py --stage cache --kills 15
    python bench/kill_anywhere.py --stage train --kills 16
    python bench/kill_anywhere.py --stage samples --kills 12

Prints one line per kill and exits non-zero if any resumed result differs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# the tests' own settings, checks and training subprocess (at one thread: the bit-identity condition)
from test_cache import TINY_ARGS, assert_same_store   # noqa: E402
from test_train import ONE_THREAD_ENV, TRAIN_CODE, tiny   # noqa: E402


def cache_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", *TINY_ARGS, "--out", str(out)]


def train_command(cfg: dict) -> list[str]:
    return [sys.executable, "-c", TRAIN_CODE, json.dumps(cfg)]


def kill_after(command: list[str], seconds: float) -> int:
    proc = subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.kill()
    return proc.wait()


def run(command: list[str]) -> None:
    r = subprocess.run(command, cwd=ROOT, env=ONE_THREAD_ENV, capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")


def timed(command: list[str]) -> float:
    t0 = time.perf_counter()
    run(command)
    return time.perf_counter() - t0


def cache_trial(work: Path, i: int, delay: float) -> None:
    out = work / f"k{i}.zarr"
    kill_after(cache_command(out), delay)
    run(cache_command(out))   # the same command resumes
    assert_same_store(work / "whole.zarr", out)


def train_trial(work: Path, i: int, delay: float) -> None:
    import torch
    from safetensors.torch import load_file

    out = work / f"k{i}"
    kill_after(train_command(train_config(work, out)), delay)
    if (out / "config.json").exists():
        run(train_command({"resume": str(out)}))
    else:   # killed before the run folder was made: the user repeats the command
        shutil.rmtree(out, ignore_errors=True)
        run(train_command(train_config(work, out)))
    whole = work / "whole"
    a, b = load_file(whole / "transcoder.safetensors"), load_file(out / "transcoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ"
    assert metrics(whole) == metrics(out), "metrics.jsonl differs"
    for name in ("summary.json", "tc-train.toml", "activation_samples/samples.safetensors"):
        assert (whole / name).exists() == (out / name).exists(), f"{name} missing"


def collect_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "samples", "collect", "--run", str(run_dir), "--save-every", "1",
            "--batch-size", "1024"]


def samples_trial(work: Path, i: int, delay: float) -> None:
    import torch
    from safetensors.torch import load_file

    from pipeline.run import COLLECT_META, SAMPLES_FILE

    run_dir = work / f"k{i}"
    shutil.copytree(work / "run", run_dir, ignore=shutil.ignore_patterns("samples"))
    kill_after(collect_command(run_dir), delay)
    run(collect_command(run_dir))   # the same command resumes
    a = load_file(work / "run" / "samples" / SAMPLES_FILE)
    b = load_file(run_dir / "samples" / SAMPLES_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "samples differ"
    summary = lambda d: json.loads((d / "samples" / COLLECT_META).read_text())["summary"]   # noqa: E731
    assert summary(work / "run") == summary(run_dir), "collect.json summary differs"


def prepare_samples(work: Path) -> float:
    """A large synthetic store (so the two passes take seconds), a short run on it, one whole collect."""
    from conftest import write_synthetic_store

    write_synthetic_store(work / "s.zarr", n_rows=262_144, d_model=64, n_features=512)
    cfg = train_config(work, work / "run")
    cfg.update(dict_size=512, groups=[128, 384], steps=8, sample_every=0)
    run(train_command(cfg))
    return timed(collect_command(work / "run"))


def train_config(work: Path, out: Path) -> dict:
    return dataclasses.asdict(tiny(work / "s.zarr", out, steps=48, checkpoint_every=8))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["cache", "train", "samples"], required=True)
    p.add_argument("--kills", type=int, default=15, help="kills, spread from 30%% to 105%% of a whole run's time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tc-kill-") as tmp:
        work = Path(tmp)
        if args.stage == "cache":
            whole_s, trial = timed(cache_command(work / "whole.zarr")), cache_trial
        elif args.stage == "samples":
            whole_s, trial = prepare_samples(work), samples_trial
        else:
            from conftest import write_synthetic_store

            write_synthetic_store(work / "s.zarr")
            whole_s, trial = timed(train_command(train_config(work, work / "whole"))), train_trial
        print(f"uninterrupted {args.stage}: {whole_s:.1f} s")
        failed = 0
        for i in range(args.kills):
            delay = whole_s * (0.3 + 0.75 * i / max(args.kills - 1, 1))
            try:
                trial(work, i, delay)
                verdict = "same as uninterrupted"
            except AssertionError as e:
                failed += 1
                verdict = f"DIFFERENT: {e}"
            print(f"kill at {delay:5.1f} s -> {verdict}", flush=True)
    print(f"{args.kills - failed}/{args.kills} resumed results equal the uninterrupted one")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

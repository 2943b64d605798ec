"""The CLI layer: options generated from the config dataclasses, --config files, help, tc info."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import cli
from conftest import write_synthetic_store
from pipeline import cache, train

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def captured_config(cfg_cls: type, args: list[str]):
    """Run a command generated from `cfg_cls` whose stage only records its config."""
    import typer

    seen = {}
    app = typer.Typer()
    cli.register(app, "x", cfg_cls, lambda cfg: seen.setdefault("cfg", cfg), "records")
    app.command("other")(lambda: None)   # two commands, so "x" is a subcommand as in tc
    r = runner.invoke(app, ["x", *args])
    assert r.exit_code == 0, r.output
    return seen["cfg"]


def test_config_file_fills_options_and_command_line_wins(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny"\nlayer = 3\ntokens = "20k"\nseq-len = 128\noverwrite = true\n')
    cfg = captured_config(cache.CacheConfig, ["--config", str(toml), "--layer", "2"])
    assert (cfg.model, cfg.layer, cfg.tokens, cfg.seq_len, cfg.overwrite) == ("tiny", 2, 20_000, 128, True)
    assert cfg.dataset == "HuggingFaceFW/fineweb-edu"          # untouched default


def test_list_options_parse_from_the_command_line():
    cfg = captured_config(train.TrainConfig,
                          ["--cache", "x.zarr", "--dict-size", "512", "--groups", "64,128,256,64", "--k", "8"])
    assert cfg.groups == [64, 128, 256, 64] and cfg.dict_size == 512 and cfg.k == 8


def test_bad_config_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("layerz = 3\n")
    r = runner.invoke(cli.app, ["cache", "--config", str(bad)])
    assert r.exit_code == 2 and "unknown keys ['layerz']" in r.output
    bad.write_text("layer = [\n")
    r = runner.invoke(cli.app, ["cache", "--config", str(bad)])
    assert r.exit_code == 2 and "not valid TOML" in r.output
    r = runner.invoke(cli.app, ["cache", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.parametrize("command", [["demo"], ["cache"], ["train"], ["eval"], ["samples", "collect"],
                                     ["samples", "export"]])
def test_every_option_has_help_and_shows_its_default(command):
    r = runner.invoke(cli.app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0
    cfg_cls = {"demo": "DemoConfig", "cache": "CacheConfig", "train": "TrainConfig", "eval": "EvalConfig",
               "collect": "CollectConfig", "export": "ExportConfig"}[command[-1]]
    module = {"DemoConfig": "demo", "CacheConfig": "cache", "TrainConfig": "train", "EvalConfig": "evaluate",
              "CollectConfig": "collect", "ExportConfig": "export"}[cfg_cls]
    fields = dataclasses.fields(getattr(__import__(f"pipeline.{module}", fromlist=[cfg_cls]), cfg_cls))
    for f in fields:
        assert f.metadata.get("help"), f"{cfg_cls}.{f.name} has no help"
        assert "--" + f.name.replace("_", "-") in r.output
    assert "--config" in r.output


def test_cli_reference_is_up_to_date():
    r = subprocess.run([sys.executable, "docs/gen_cli.py", "--check"], cwd=ROOT)
    assert r.returncode == 0, "docs/cli.md is stale: run python docs/gen_cli.py"


def test_info_describes_a_complete_and_an_interrupted_store(tmp_path):
    path = write_synthetic_store(tmp_path / "s.zarr", n_rows=2048)
    r = runner.invoke(cli.app, ["info", str(path)])
    assert r.exit_code == 0 and "complete: 2,048 tokens" in r.output and "blocks.0.hook_resid_mid" in r.output
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["complete"] = False
    g["chunk_meta"][1] = np.zeros(6, np.int64)
    r = runner.invoke(cli.app, ["info", str(path)])
    assert r.exit_code == 0 and "interrupted" in r.output and "1 of 2 chunks" in r.output
    assert "tc cache" in r.output


def test_info_on_nothing_is_one_line(tmp_path):
    r = runner.invoke(cli.app, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(cli.app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "neither a tc store nor a tc run folder" in r.output


def test_a_store_records_a_config_file_that_repeats_its_command(tmp_path):
    import tomllib

    out = tmp_path / "t.zarr"
    args = ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", "2k",
            "--seq-len", "64", "--out", str(out)]
    assert runner.invoke(cli.app, args).exit_code == 0
    recorded = tomllib.loads((out / "tc-cache.toml").read_text())
    assert recorded["tokens"] == 2000 and recorded["seq-len"] == 64 and recorded["model"] == "tiny"
    r = runner.invoke(cli.app, ["cache", "--config", str(out / "tc-cache.toml")])
    assert r.exit_code == 0 and "already complete" in r.output


def test_info_describes_a_finished_an_interrupted_and_a_fresh_run(tmp_path):
    import json
    import shutil

    store = write_synthetic_store(tmp_path / "s.zarr", n_rows=4096)
    run = tmp_path / "run"
    train.run_train(train.TrainConfig(cache=str(store), out=str(run), dict_size=128, groups=[32, 96], k=4,
                                      batch_size=128, steps=12, log_every=4, checkpoint_every=6, sample_every=4,
                                      lr=3e-3, warmup_steps=2, dead_tokens=1000, aux_k=16))
    (run / "eval.json").write_text(json.dumps({"lm": {"fraction_recovered": 0.625}}))
    r = runner.invoke(cli.app, ["info", str(run)])
    assert r.exit_code == 0, r.output
    out = r.output
    assert f"run        {run}" in out and "128 latents, groups [32, 96], k 4" in out
    assert "state      complete: 12 steps" in out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"metrics    step 12: loss {last['loss']:.4g}, FVU {last['fvu']:.4f}" in out
    assert "fraction of loss recovered 0.625" in out and "activation_samples" in out
    (run / "summary.json").unlink()
    r = runner.invoke(cli.app, ["info", str(run)])
    assert r.exit_code == 0 and "interrupted at step_000012 of 12 steps" in r.output
    assert f"--resume {run}" in r.output
    shutil.rmtree(run / "checkpoints")
    r = runner.invoke(cli.app, ["info", str(run)])
    assert r.exit_code == 0 and "started, no checkpoint yet" in r.output


# ----------------------------------------------------------------------------- config values where they enter

@pytest.mark.parametrize("line, message", [
    ('include-bos = "no"', "--include-bos takes true or false, got 'no'"),
    ('k = "eight"', "--k takes a whole number, got 'eight'"),
    ("k = 8.5", "--k takes a whole number, got 8.5"),
    ('lr = "fast"', "--lr takes a number, got 'fast'"),
    ("cache = 3", "--cache takes text, got 3"),
    ('steps = "many"', "--steps: bad count 'many'"),
    ("groups = [64, 64.5]", "bad list"),
])
def test_a_config_file_value_of_the_wrong_type_is_one_line(tmp_path, line, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(f'cache = "{tmp_path / "s.zarr"}"\n' if not line.startswith("cache") else "")
    toml.write_text(toml.read_text() + line + "\n")
    r = runner.invoke(cli.app, ["train", "--config", str(toml)])
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config file ") and message in lines[0], r.output
    assert not (tmp_path / "run").exists()


def test_config_file_values_of_the_right_type_are_taken(tmp_path):
    toml = tmp_path / "ok.toml"
    toml.write_text('cache = "x.zarr"\ninclude-bos = true\nk = 8.0\nlr = 1\ngroups = "64,64"\nsteps = "2k"\n')
    cfg = captured_config(train.TrainConfig, ["--config", str(toml)])
    assert (cfg.include_bos, cfg.k, cfg.lr, cfg.groups, cfg.steps) == (True, 8, 1.0, [64, 64], 2000)
    assert type(cfg.k) is int and type(cfg.lr) is float


def test_a_python_caller_gets_the_same_checks(tmp_path):
    from pipeline.util import UserError

    with pytest.raises(UserError, match="--k takes a whole number, got 8.5"):
        train.run_train(train.TrainConfig(cache=str(tmp_path / "s.zarr"), k=8.5))
    with pytest.raises(UserError, match="--compress takes true or false, got 'false'"):
        cache.run_cache(cache.CacheConfig(model="tiny", compress="false", out=str(tmp_path / "t.zarr")))
    assert not (tmp_path / "t.zarr").exists()


def test_a_bad_command_line_value_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "cli.py", "train", "--k", "eight"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "'--k'" in lines[0] and "integer" in lines[0], lines
    r = subprocess.run([sys.executable, "cli.py", "train", "--no-such-option"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    r = subprocess.run([sys.executable, "cli.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "cache" in r.stdout and "train" in r.stdout    # no arguments: the help


def test_resume_compares_every_option_the_user_typed_defaults_included(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", n_rows=4096)
    run = tmp_path / "run"
    args = ["train", "--cache", str(store), "--out", str(run), "--dict-size", "128", "--groups", "32,96", "--k", "8",
            "--batch-size", "128", "--steps", "6", "--checkpoint-every", "3", "--sample-every", "0"]
    env = {"TC_TRAIN_KILL_AT_STEP": "4"}
    killed = subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**__import__("os").environ, **env})
    assert killed.returncode != 0 and (run / "checkpoints" / "latest").exists()
    # --k 48 is the default value: typed, it still has to match the run's k 8
    r = runner.invoke(cli.app, ["train", "--resume", str(run), "--k", "48"])
    assert r.exit_code == 2 and "--k 48 (run: 8)" in r.output
    # the same options as the run, typed again, are fine; so is a bare --resume
    r = runner.invoke(cli.app, ["train", "--resume", str(run), "--k", "8", "--log-every", "2"])
    assert r.exit_code == 0, r.output
    assert (run / "summary.json").exists()

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
    bad.write_text("layers = 3\n")
    r = runner.invoke(cli.app, ["cache", "--config", str(bad)])
    assert r.exit_code == 2 and "unknown keys ['layers']" in r.output
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
              "CollectConfig": "samples", "ExportConfig": "export"}[cfg_cls]
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

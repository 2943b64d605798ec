"""Several layers in one store (`tc cache --layers`, schema 2) and a set of transcoders trained
from one pass over it (`tc train --layers`): each layer equals its one-layer counterpart, bit for
bit; interrupted work resumes to the same bits."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.store import Store

# tiny has 4 blocks; 64-token sequences, 4 per chunk, forward batches of 3 (they straddle chunks)
BASE = ["cache", "--model", "tiny", "--dataset", "python-docs", "--tokens", "3000", "--seq-len", "64",
        "--chunk-rows", "256", "--batch-size", "3"]
MULTI = [*BASE, "--layers", "1,3"]
LAYER_ARRAYS = ["source", "target", "flags", "chunk_stats", "chunk_norms", "chunk_meta",
                "stats/source_mean", "stats/source_var", "stats/target_mean", "stats/target_var"]
SHARED = ["tokens", "vocab/offsets", "vocab/bytes"]
ROOT = Path(__file__).parent.parent


def tc_inproc(args: list[str]):
    return CliRunner().invoke(app, args)


def tc(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The two-layer store and the one-layer stores of the same layers, same text and settings."""
    root = tmp_path_factory.mktemp("layers")
    out = {"multi": root / "m.zarr", 1: root / "l1.zarr", 3: root / "l3.zarr"}
    for args, path in ((MULTI, out["multi"]), ([*BASE, "--layer", "1"], out[1]), ([*BASE, "--layer", "3"], out[3])):
        r = tc_inproc([*args, "--out", str(path)])
        assert r.exit_code == 0, r.output
    return out


def assert_same_multi(a: Path, b: Path, layers=(1, 3)) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = SHARED + ["chunk_meta", "chunk_crc"] + [f"layers/{L}/{n}" for L in layers for n in LAYER_ARRAYS]
    for name in names:
        assert np.array_equal(ga[name][:], gb[name][:]), name
    drop = {"versions", "config"}
    assert ({k: v for k, v in ga.attrs.asdict().items() if k not in drop}
            == {k: v for k, v in gb.attrs.asdict().items() if k not in drop})


def test_each_layer_of_a_multi_layer_store_is_its_one_layer_store_bit_for_bit(stores):
    m = zarr.open_group(str(stores["multi"]), mode="r")
    assert m.attrs["schema_version"] == 2 and m.attrs["layers"] == [1, 3]
    for layer in (1, 3):
        one = zarr.open_group(str(stores[layer]), mode="r")
        assert one.attrs["schema_version"] == 1   # --layer still writes schema 1
        for name in LAYER_ARRAYS:
            assert np.array_equal(m[f"layers/{layer}/{name}"][:], one[name][:]), (layer, name)
        for name in SHARED:
            assert np.array_equal(m[name][:], one[name][:]), name
        view, single = Store(stores["multi"], layer), Store(stores[layer])
        assert view.hooks == single.hooks and view.attrs["layer"] == layer
        for key in ("stats", "overflow", "n_bos_rows", "n_outlier_rows"):
            assert view.attrs[key] == single.attrs[key], key
        a, b = view.read_rows(100, 700), single.read_rows(100, 700)
        assert np.array_equal(a.source, b.source) and np.array_equal(a.target, b.target)
        assert np.array_equal(view.flags, single.flags)
    # the layers differ from each other (a store that wrote one layer twice would pass the above)
    assert not np.array_equal(m["layers/1/source"][:], m["layers/3/source"][:])


def test_a_multi_layer_store_needs_a_layer_to_read_activations(stores):
    s = Store(stores["multi"])
    assert s.layers == [1, 3] and s.layer is None and s.complete and s.n_rows == 3008
    assert len(s.tokens) == 3008 and s.verify(progress=False) == []   # the shared parts need no layer
    with pytest.raises(Exception, match=r"holds layers 1,3: say which one to read"):
        s.read_chunk(0)
    with pytest.raises(Exception, match=r"holds layers 1,3, not layer 2"):
        Store(stores["multi"], 2)
    with pytest.raises(Exception, match=r"holds layer 1 only, not layer 3"):
        Store(stores[1], 3)


@pytest.mark.parametrize("kill_at", ["chunk_committed:2", "chunk_before_commit:3", "finalize_before_mark:1"])
def test_kill_minus_9_then_resume_of_a_multi_layer_cache_is_bit_identical(stores, tmp_path, kill_at):
    out = tmp_path / "k.zarr"
    killed = tc([*MULTI, "--out", str(out)], TC_KILL_AT=kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert not Store(out).complete
    resumed = tc([*MULTI, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_multi(stores["multi"], out)


def test_a_damaged_layer_chunk_is_caught_and_the_rerun_repairs_it(stores, tmp_path):
    import shutil

    out = tmp_path / "d.zarr"
    shutil.copytree(stores["multi"], out)
    chunk = out / "layers" / "3" / "target" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"chunk 2 of layers/3/target"):
        Store(out, 3).read_chunk(2)
    assert Store(out).verify(progress=False) == [("layers/3/target", 2)]
    r = tc_inproc([*MULTI, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "recomputing 1 chunk" in r.output
    assert_same_multi(stores["multi"], out)


def test_the_disk_estimate_counts_every_layer_and_bad_layers_are_one_line(tmp_path):
    r = tc_inproc([*BASE, "--layers", "0-3", "--tokens", "128", "--out", str(tmp_path / "e.zarr")])
    assert r.exit_code == 0, r.output
    assert "4 layers x 2 x 64 x 2 bytes" in r.output
    assert Store(tmp_path / "e.zarr").layers == [0, 1, 2, 3]
    for spec, words in (("1,9", "out of range"), ("3-1", "bad layer list"), ("a", "bad layer list")):
        r = tc([*BASE, "--layers", spec, "--out", str(tmp_path / "bad.zarr")])
        assert r.returncode != 0 and words in r.stderr + r.stdout and "Traceback" not in r.stderr, spec
        assert not (tmp_path / "bad.zarr").exists()


# ----------------------------------------------------------------------------- a set from one pass

TRAIN = ["--dict-size", "256", "--groups", "32,64,128,32", "--k", "8", "--batch-size", "128", "--steps", "24",
         "--log-every", "4", "--checkpoint-every", "4", "--sample-every", "4", "--seed", "5"]


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "transcoder.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory) -> dict[str, Path]:
    """A set of layers 1 and 3, and single-layer runs of the same layers with the same seed: layer 1
    from the multi-layer store (--layer 1), layer 3 from the one-layer store of layer 3."""
    root = tmp_path_factory.mktemp("sets")
    out = {"set": root / "set", 1: root / "r1", 3: root / "r3"}
    for args in (["--cache", str(stores["multi"]), "--layers", "all", "--out", str(out["set"])],
                 ["--cache", str(stores["multi"]), "--layer", "1", "--out", str(out[1])],
                 ["--cache", str(stores[3]), "--out", str(out[3])]):
        r = tc_inproc(["train", *args, *TRAIN])
        assert r.exit_code == 0, r.output
    return out


def test_each_transcoder_of_a_set_equals_the_single_layer_run_with_the_same_seed(trained):
    s = trained["set"]
    manifest = json.loads((s / "set.json").read_text())
    assert manifest["layers"] == [1, 3] and manifest["config"]["layers"] == "all" and "versions" in manifest
    assert_same_weights(s / "layer_1", trained[1])
    assert_same_weights(s / "layer_3", trained[3])   # and the one-layer store's run: the same rows
    # everything a run has, per layer; the samples and the losses too
    for layer in (1, 3):
        run = s / f"layer_{layer}"
        assert json.loads((run / "config.json").read_text())["layer"] == layer
        assert (run / "activation_samples" / "samples.safetensors").read_bytes() == \
            (trained[layer] / "activation_samples" / "samples.safetensors").read_bytes()
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert losses == [json.loads(line)["loss"] for line in (trained[layer] / "metrics.jsonl").read_text().splitlines()]
    # two different transcoders (a set that trained one layer twice would pass the above for layer 1)
    import torch
    assert not torch.equal(weights(s / "layer_1")["W_enc"], weights(s / "layer_3")["W_enc"])


@pytest.mark.parametrize("kill", [{"TC_KILL_AT": "checkpoint_written:3"}, {"TC_TRAIN_KILL_AT_STEP": "10"}])
def test_a_set_killed_mid_training_resumes_to_the_same_transcoders(stores, trained, tmp_path, kill):
    """checkpoint_written:3 kills after layer 1's checkpoint of step 8 and before layer 3's: the
    resume finds its layers at different steps and brings layer 3 up first."""
    out = tmp_path / "set"
    args = ["train", "--cache", str(stores["multi"]), "--layers", "1,3", "--out", str(out), *TRAIN]
    killed = tc(args, **kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "layer_1" / "summary.json").exists()
    steps = [(out / f"layer_{L}" / "checkpoints" / "latest").read_text().strip() for L in (1, 3)]
    if "TC_KILL_AT" in kill:
        assert steps == ["step_000008", "step_000004"]
    resumed = tc(["train", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for layer in (1, 3):
        assert_same_weights(out / f"layer_{layer}", trained["set"] / f"layer_{layer}")
    again = tc(["train", "--resume", str(out)])
    assert again.returncode == 0 and "finished already" in again.stdout


def test_a_set_exports_and_its_runs_work_with_every_stage(stores, trained, tmp_path):
    s = trained["set"]
    whole, listed = tmp_path / "ct-set", tmp_path / "ct-runs"
    assert tc_inproc(["export", "circuit-tracer", "--run", str(s), "--out", str(whole)]).exit_code == 0
    assert tc_inproc(["export", "circuit-tracer", "--run", f"{s / 'layer_1'},{s / 'layer_3'}",
                      "--out", str(listed)]).exit_code == 0
    for name in ("layer_1.safetensors", "layer_3.safetensors", "config.yaml"):
        assert (whole / name).read_bytes() == (listed / name).read_bytes(), name
    r = tc_inproc(["export", "saelens", "--run", str(s), "--layer", "3", "--out", str(tmp_path / "sl")])
    assert r.exit_code == 0 and json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]["hook_name"] \
        == "blocks.3.hook_resid_mid"
    r = tc(["export", "saelens", "--run", str(s), "--out", str(tmp_path / "sl2")])
    assert r.returncode == 2 and "pass --layer L" in r.stderr and "Traceback" not in r.stderr
    # a layer's run reads its layer of the store: the exact samples equal the one-layer run's
    for run in (s / "layer_3", trained[3]):
        assert tc_inproc(["samples", "collect", "--run", str(run)]).exit_code == 0
    import torch
    from safetensors.torch import load_file
    a, b = (load_file(str(run / "samples" / "samples.safetensors")) for run in (s / "layer_3", trained[3]))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)   # (the metadata names the store)
    r = tc_inproc(["eval", "--run", str(s / "layer_3"), "--tokens", "1k"])
    assert r.exit_code == 0, r.output
    ev = json.loads((s / "layer_3" / "eval.json").read_text())
    assert ev["layer"] == 3 and ev["lm"]["fraction_recovered"] is not None
    info = tc_inproc(["info", str(s)])
    assert info.exit_code == 0 and "layer_1    complete (24 steps)" in info.output


@pytest.mark.parametrize("args, words", [
    (["--layers", "1,3"], "is a one-layer store"),
    (["--layer", "1", "--layers", "1,3"], "not both"),
])
def test_bad_set_options_are_one_line(stores, tmp_path, args, words):
    r = tc(["train", "--cache", str(stores[1]), *args, "--out", str(tmp_path / "x"), *TRAIN])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, words", [([], "pass --layer L to train one of them"),
                                         (["--layers", "2"], "not 2: pick --layers among them")])
def test_a_multi_layer_store_asks_which_layers_to_train(stores, tmp_path, args, words):
    r = tc(["train", "--cache", str(stores["multi"]), *args, "--out", str(tmp_path / "x"), *TRAIN])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_two_ranks_under_torchrun_write_the_one_process_multi_layer_store(stores, tmp_path):
    from test_distributed import torchrun

    out = tmp_path / "two.zarr"
    r = torchrun(2, [*MULTI, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_multi(stores["multi"], out)

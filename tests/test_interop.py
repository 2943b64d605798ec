"""`tc export circuit-tracer` / `tc export saelens`: the files, read with safetensors alone and applied
the way each tool applies them (circuit-tracer 0.5: F.linear(x, W_enc, b_enc), JumpReLU
x * (x > threshold), acts @ W_dec + b_dec + x @ W_skip^T; SAELens 6: x @ W_enc + b_enc, ReLU masked by
pre > threshold, the same decode), reproduce tc's pre-activations, active set and predictions on
raw store rows. Then (slow) each tool's own loader, in its own venv, on the same rows.

Tolerance: float32 files, the re-implementation in float64: max abs difference <= 1e-4 x the largest
|value| of what is compared (pre-activations, predictions); active sets equal except for pairs whose
pre-activation is within that tolerance of the threshold."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

from pipeline import interop
from pipeline.interop import CircuitTracerConfig, SAELensConfig, run_circuit_tracer, run_saelens
from pipeline.run import Run
from pipeline.store import Store
from pipeline.train import TrainConfig, run_train
from pipeline.util import UserError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "interop"))
RTOL = 1e-4
KINDS = {"plain": (False, [128]), "matryoshka": (False, [32, 96]), "skip": (True, [128]),
         "matryoshka-skip": (True, [32, 96])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_store):
    """One short finished run of each kind on the synthetic store (layer 0; its rows have non-zero
    means and BOS rows 100x larger, so a lost mean or scale shows)."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for name, (skip, groups) in KINDS.items():
        out[name] = run_train(TrainConfig(cache=str(synthetic_store), dict_size=128, groups=groups, k=4, steps=40,
                                          batch_size=256, lr=3e-3, warmup_steps=5, sample_every=0, log_every=20,
                                          checkpoint_every=40, skip=skip, out=str(root / name), device="cpu"))
    return out


@pytest.fixture(scope="module")
def raw_rows(synthetic_store):
    store = Store(str(synthetic_store)).require_complete()
    return np.concatenate([store.read_chunk(c).source for c in range(2)]).astype(np.float32)


def as_layer(run: Path, layer: int, dest: Path, model: str | None = None) -> Path:
    """A copy of `run` whose store records `layer` (and `model`): the export reads them from config.json."""
    shutil.copytree(run, dest)
    config = json.loads((dest / "config.json").read_text())
    config["store"].update(layer=layer, hooks={"source": f"blocks.{layer}.hook_resid_mid",
                                               "target": f"blocks.{layer}.hook_mlp_out"})
    if model:
        config["store"]["model"] = model
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# ----------------------------------------------------------------------------- what the files mean

def apply_circuit_tracer(t: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, ...]:
    x = x.astype(np.float64)
    t = {k: v.astype(np.float64) for k, v in t.items()}
    pre = x @ t["W_enc"].T + t["b_enc"]
    acts = pre * (pre > t["activation_function.threshold"])
    pred = acts @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    return pre, acts, pred


def apply_saelens(t: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, ...]:
    x = x.astype(np.float64)
    t = {k: v.astype(np.float64) for k, v in t.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = np.maximum(pre, 0) * (pre > t["threshold"])
    pred = acts @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    return pre, acts, pred


def tc_side(run: Path, x: np.ndarray) -> tuple[np.ndarray, ...]:
    tc = Run(run).transcoder()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        pre = tc._pre(tc.normalize_source(xt.float()))
        return pre.double().numpy(), tc.encode(xt).double().numpy(), tc.predict(xt).double().numpy(), \
            float(tc.sparsity.threshold)


def check_same(run: Path, mine: tuple[np.ndarray, ...], x: np.ndarray) -> None:
    """AssertionError unless the exported computation gives tc's pre-activations, active set and
    predictions within the tolerance of the module docstring."""
    pre, acts, pred, threshold = tc_side(run, x)
    my_pre, my_acts, my_pred = mine
    tol_pre = RTOL * np.abs(pre).max()
    assert np.abs(my_pre - pre).max() <= tol_pre, f"pre-activations differ by {np.abs(my_pre - pre).max():.3g}"
    differ = (my_acts > 0) != (acts > 0)
    borderline = np.abs(pre - threshold) <= tol_pre
    assert not (differ & ~borderline).any(), f"{int((differ & ~borderline).sum())} active pairs differ"
    assert (acts > 0).sum() > 0 and differ.sum() <= 0.001 * (acts > 0).sum()
    tol_pred = RTOL * np.abs(pred).max()
    assert np.abs(my_pred - pred).max() <= tol_pred, f"predictions differ by {np.abs(my_pred - pred).max():.3g}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_circuit_tracer_files_reproduce_tc(runs, raw_rows, tmp_path, kind):
    out = run_circuit_tracer(CircuitTracerConfig(run=[str(runs[kind])], out=str(tmp_path / "ct")))
    t = load_file(str(out / "layer_0.safetensors"))
    tc = Run(runs[kind]).transcoder()
    F, d = tc.d_latent, tc.d_in
    want = {"W_enc": (F, d), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,), "activation_function.threshold": (F,)}
    if tc.skip:
        want["W_skip"] = (d, d)
    assert {k: v.shape for k, v in t.items()} == want
    assert all(v.dtype == np.float32 for v in t.values())
    check_same(runs[kind], apply_circuit_tracer(t, raw_rows), raw_rows)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {"model_kind": "transcoder_set", "scan": "tc/synthetic/0", "feature_input_hook": "hook_resid_mid",
                      "feature_output_hook": "hook_mlp_out", "transcoders": ["layer_0.safetensors"]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_saelens_files_reproduce_tc(runs, raw_rows, tmp_path, kind):
    out = run_saelens(SAELensConfig(run=str(runs[kind]), out=str(tmp_path / "sl")))
    t = load_file(str(out / "sae_weights.safetensors"))
    tc = Run(runs[kind]).transcoder()
    F, d = tc.d_latent, tc.d_in
    want = {"W_enc": (d, F), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,), "threshold": (F,)}
    if tc.skip:
        want["W_skip"] = (d, d)
    assert {k: v.shape for k, v in t.items()} == want
    check_same(runs[kind], apply_saelens(t, raw_rows), raw_rows)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu_skip_transcoder" if tc.skip else "jumprelu_transcoder")
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (d, F, d, False)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_mid"
    assert cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"


def _constants(run: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in Run(run).transcoder().file_tensors().items()}


# Plausible mistakes in a fold, each written as what it does to the correct folded tensors.
PLANTED = {
    "target mean dropped": lambda f, c: {**f, "b_dec": f["b_dec"] - c["target_mean"].float()},
    "source scale left out of W_skip": lambda f, c: {**f, "W_skip": f["W_skip"] * float(c["source_scale"])},
    "skip's mean term left out of b_dec": lambda f, c: {**f, "b_dec": f["b_dec"] + f["W_skip"] @ c["source_mean"].float()},
    "source mean left out of b_enc": lambda f, c: {**f, "b_enc": f["b_enc"] + f["W_enc"] @ c["source_mean"].float()},
    "threshold rescaled by the source scale": lambda f, c: {**f, "threshold": f["threshold"] * float(c["source_scale"])},
    "decoder not scaled by the target scale": lambda f, c: {**f, "W_dec": f["W_dec"] / float(c["target_scale"])},
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_the_check_catches_a_planted_fold_bug(runs, raw_rows, tmp_path, monkeypatch, bug):
    run = runs["matryoshka-skip"]
    right = interop.fold
    monkeypatch.setattr(interop, "fold", lambda tc: PLANTED[bug](right(tc), _constants(run)))
    out = run_circuit_tracer(CircuitTracerConfig(run=[str(run)], out=str(tmp_path / "ct")))
    with pytest.raises(AssertionError):
        check_same(run, apply_circuit_tracer(load_file(str(out / "layer_0.safetensors")), raw_rows), raw_rows)


def test_the_threshold_is_tcs_and_the_export_records_what_made_it(runs, tmp_path):
    run = runs["skip"]
    out = run_circuit_tracer(CircuitTracerConfig(run=[str(run)], out=str(tmp_path / "ct")))
    t = load_file(str(out / "layer_0.safetensors"))
    threshold = float(Run(run).transcoder().sparsity.threshold)
    assert threshold > 0 and np.allclose(t["activation_function.threshold"], threshold, rtol=1e-6)
    record = json.loads((out / "tc-export.json").read_text())
    assert record["runs"][0]["run"] == str(Path(run).resolve())
    assert record["runs"][0]["config"] == json.loads((Path(run) / "config.json").read_text())
    assert record["versions"]["tc"] and record["layers"] == [0] and record["config"]["run"] == [str(run)]
    with safe_open(str(out / "layer_0.safetensors"), "np") as f:
        assert json.loads(f.metadata()["tc_export"])["tc_run"] == str(Path(run).resolve())
    assert (out / "tc-export-circuit-tracer.toml").read_text().count("run = ") == 1


# ----------------------------------------------------------------------------- a set of layers

def test_a_set_of_layers_writes_one_file_per_layer_and_a_loadable_config(runs, raw_rows, tmp_path):
    plain = runs["plain"]
    skip1 = as_layer(runs["skip"], 1, tmp_path / "skip_l1")
    out = run_circuit_tracer(CircuitTracerConfig(run=[str(skip1), str(plain)], out=str(tmp_path / "ct"), n_layers=2))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]
    l0, l1 = (load_file(str(out / f"layer_{i}.safetensors")) for i in (0, 1))
    # a plain transcoder in a skip set gets a zero skip path: the same predictions, one kind of set
    assert "W_skip" in l0 and not l0["W_skip"].any()
    check_same(plain, apply_circuit_tracer(l0, raw_rows), raw_rows)
    check_same(runs["skip"], apply_circuit_tracer(l1, raw_rows), raw_rows)


def test_a_partial_set_is_written_with_a_warning_naming_the_missing_layers(runs, tmp_path, capsys):
    run = as_layer(runs["plain"], 2, tmp_path / "l2")
    out = run_circuit_tracer(CircuitTracerConfig(run=[str(run)], out=str(tmp_path / "ct"), n_layers=4))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "layers 0,1,3 (3 of 4)" in warning[0]
    assert (out / "layer_2.safetensors").exists()
    assert "transcoders" not in yaml.safe_load((out / "config.yaml").read_text())   # list position = layer
    assert json.loads((out / "tc-export.json").read_text())["missing_layers"] == [0, 1, 3]


def test_bad_sets_are_refused_in_one_line(runs, tmp_path):
    plain, skip = str(runs["plain"]), str(runs["skip"])
    with pytest.raises(UserError, match="two runs of layer 0"):
        run_circuit_tracer(CircuitTracerConfig(run=[plain, skip], out=str(tmp_path / "a")))
    other = as_layer(runs["skip"], 1, tmp_path / "other", model="tiny")
    with pytest.raises(UserError, match="different models"):
        run_circuit_tracer(CircuitTracerConfig(run=[plain, str(other)], out=str(tmp_path / "b")))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["plain"], unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(UserError, match="has not finished training"):
        run_saelens(SAELensConfig(run=str(unfinished), out=str(tmp_path / "c")))
    hooks = as_layer(runs["skip"], 1, tmp_path / "hooks")
    config = json.loads((hooks / "config.json").read_text())
    config["store"]["hooks"]["source"] = "blocks.1.hook_resid_pre"
    (hooks / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="different hooks"):
        run_circuit_tracer(CircuitTracerConfig(run=[plain, str(hooks)], out=str(tmp_path / "d")))


def test_a_non_empty_out_is_kept_unless_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        run_saelens(SAELensConfig(run=str(runs["plain"]), out=str(out)))
    run_saelens(SAELensConfig(run=str(runs["plain"]), out=str(out), overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "cfg.json").exists()
    # an earlier, larger set's layer files do not survive an overwrite
    run_circuit_tracer(CircuitTracerConfig(run=[str(runs["plain"]), str(as_layer(runs["skip"], 1, tmp_path / "l1"))],
                                           out=str(tmp_path / "ct")))
    run_circuit_tracer(CircuitTracerConfig(run=[str(runs["plain"])], out=str(tmp_path / "ct"), overwrite=True))
    assert sorted(p.name for p in (tmp_path / "ct").glob("layer_*")) == ["layer_0.safetensors"]


def test_the_command_line_says_what_is_wrong_in_one_line(runs, tmp_path):
    tc = Path(sys.executable).parent / "tc"
    done = subprocess.run([str(tc), "export", "circuit-tracer", "--run", f"{runs['plain']},{runs['skip']}",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "two runs of layer 0" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the peers' own loaders

@pytest.mark.slow
@pytest.mark.parametrize("tool", ["circuit-tracer", "saelens"])
def test_the_tools_own_loaders_give_tcs_outputs(runs, tmp_path, tool):
    """Each tool's venv (made once under ~/.cache/tc-peers; skipped when pip cannot make it) loads the
    export with its own loader; its encode and decode match tc's on the same rows."""
    import compare
    from venvs import VenvError, ensure

    try:
        ensure(tool)
    except VenvError as e:
        pytest.skip(str(e))
    chosen = [str(runs["matryoshka"]), str(as_layer(runs["matryoshka-skip"], 1, tmp_path / "l1"))]
    if tool == "circuit-tracer":
        export = run_circuit_tracer(CircuitTracerConfig(run=chosen, out=str(tmp_path / "ct")))
    else:
        chosen = chosen[1:]
        export = run_saelens(SAELensConfig(run=chosen[0], out=str(tmp_path / "sl")))
    compare.write_rows(tmp_path / "rows.npz", chosen, 2048)
    result = compare.run_peer(tool, export, tmp_path / "rows.npz")
    assert sorted(result["layers"]) == (["0", "1"] if tool == "circuit-tracer" else ["1"])
    for r in result["layers"].values():
        assert r["pre_max_abs_diff"] <= RTOL * r["pre_scale"]
        assert r["pred_max_abs_diff"] <= RTOL * r["pred_scale"]
        assert r["active_pairs_tc"] > 0 and r["active_pairs_differing"] <= 0.001 * r["active_pairs_tc"]
    if tool == "circuit-tracer":
        assert result["loader"] == "load_transcoders" and result["skip"]
    else:
        assert result["class"] == "JumpReLUSkipTranscoder" and result["hook_name_out"] == "blocks.1.hook_mlp_out"

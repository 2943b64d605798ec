"""The training loop: schedule, run folder, kill -9 resume identity, bad input, samples hook, W&B."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import rewrite_as_tc_0_1_transcoder, write_synthetic_store
from pipeline.store import Store, StoreWriter
from pipeline.train import KILL_ENV, TrainConfig, lr_at, merge_resume, run_train
from pipeline.transcoder import Transcoder
from pipeline.util import UserError

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(store, out, **kw) -> TrainConfig:
    base = dict(cache=str(store), out=str(out) if out else None, dict_size=128, groups=[16, 32, 64, 16], k=4,
                batch_size=128, steps=24, log_every=4, checkpoint_every=8, lr=3e-3, warmup_steps=4,
                sample_every=4, dead_tokens=1000, aux_k=16, keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- schedule

def test_schedule_warms_up_from_zero_and_ends_exactly_at_min_lr():
    lr, total, warm = 3e-4, 1000, 200
    values = [lr_at(s, total, lr, warm, 0.01) for s in range(total)]
    assert values[0] == 0.0
    assert values[warm] == pytest.approx(lr, rel=1e-12)
    assert values[warm // 2] == pytest.approx(lr / 2)
    assert values[-1] == lr * 0.01                     # exactly, not ~0
    assert all(a <= b for a, b in zip(values[:warm], values[1:warm + 1]))
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))
    # a run shorter than the warmup warms up over its first half, still ends at min_lr
    short = [lr_at(s, 10, lr, 200, 0.1) for s in range(10)]
    assert short[0] == 0 and max(short) == pytest.approx(lr) and short[-1] == lr * 0.1


# ----------------------------------------------------------------------------- a whole run

def test_run_folder_metrics_checkpoints_and_final_file(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = run_train(tiny(synthetic_store, None, steps=22, keep_checkpoints=2))
    name = re.escape("synthetic_blocks.0.hook_resid_mid_to_blocks.0.hook_mlp_out_128_matryoshka-skip-transcoder_4_0.003_")
    assert run.parent == Path("checkpoints/transcoder/synthetic")
    assert re.fullmatch(name + r"\d{8}-\d{6}", run.name)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 22]
    for r in rows:
        assert {"step", "loss", "fvu", "l0", "dead_features", "lr", "fvu_levels", "tokens_per_s"} <= set(r)
        assert len(r["fvu_levels"]) == 4 and r["fvu_levels"][-1] == pytest.approx(r["fvu"])
        assert r["l0"] == pytest.approx(4.0)
    assert rows[-1]["lr"] == 3e-3 * 0.01   # the last step's lr is min_lr
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_000016", "step_000022"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000022"
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"loss.png", "fvu.png", "l0.png"}
    config = json.loads((run / "config.json").read_text())
    assert config["groups"] == [16, 32, 64, 16] and config["total_steps"] == 22
    assert config["store"]["n_rows"] == 8192 and config["store"]["hooks"]["target"] == "blocks.0.hook_mlp_out"
    assert config["cache"] == str(Path(synthetic_store).resolve()) and "torch" in config["versions"]
    tc = Transcoder.load(run / "transcoder.safetensors")
    assert tc.groups == [16, 32, 64, 16] and tc.sparsity.threshold > 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 22


def test_default_length_is_one_pass_and_plain_batchtopk_is_named(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny(synthetic_store, None, steps=None, groups=[128], batch_size=1024, checkpoint_every=100)
    run = run_train(cfg)
    usable = int((Store(synthetic_store).flags == 0).sum())
    assert json.loads((run / "config.json").read_text())["total_steps"] == usable // 1024
    assert "_128_batchtopk-skip-transcoder_4_" in run.name


def test_predictions_are_in_target_units(tmp_path):
    """A store whose target is 1000x larger and offset: the trained transcoder's raw predictions
    must explain the raw target as well as its normalised predictions explain the normalised one."""
    rng = np.random.default_rng(0)
    n, d = 4096, 16
    codes = rng.uniform(0, 2, (n, 32)) * (rng.random((n, 32)) < 0.1)
    source = (codes @ rng.normal(size=(32, d)) + 5.0).astype(np.float32)
    target = (codes @ rng.normal(size=(32, d)) * 1000.0 + 300.0).astype(np.float32)
    tokens = rng.integers(3, 50, n).astype(np.int32)
    w = StoreWriter.create(tmp_path / "s.zarr", n_rows=n, d_model=d, chunk_rows=1024, vocab=[f"t{i}" for i in range(50)],
                           attrs={"model": "scaled", "layer": 0, "seq_len": 64, "hooks": {"source": "a", "target": "b"},
                                  "tokenizer": {"name": "x", "bos_id": 2, "vocab_size": 50}})
    for c in range(4):
        s = slice(c * 1024, (c + 1) * 1024)
        w.write_chunk(c, source[s], target[s], tokens[s], np.zeros(1024, bool))
    w.finalize(n)
    w.close()
    run = run_train(tiny(tmp_path / "s.zarr", tmp_path / "run", dict_size=64, groups=[64], steps=200, sample_every=0))
    tc = Transcoder.load(run / "transcoder.safetensors")
    x, y = torch.from_numpy(source.astype(np.float16).astype(np.float32)), torch.from_numpy(target.astype(np.float16).astype(np.float32))
    fvu = lambda pred, true: float((true - pred).pow(2).sum() / (true - true.mean(0)).pow(2).sum())  # noqa: E731
    raw = fvu(tc.predict(x), y)
    normalised = fvu(tc.normalize_target(tc.predict(x)), tc.normalize_target(y))
    assert raw < 0.9
    assert raw == pytest.approx(normalised, rel=1e-3)
    torch.testing.assert_close(tc.target_mean, y.double().mean(0).float(), rtol=1e-4, atol=1e-2)
    assert float(tc.target_scale) > 100 * float(tc.source_scale)


# ----------------------------------------------------------------------------- kill -9 and resume

# a training run in its own process (so it can be killed), at one thread as the in-process runs
TRAIN_CODE = ("import json, sys; from pipeline.train import TrainConfig, run_train; "
              "run_train(TrainConfig(**json.loads(sys.argv[1])))")
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_subprocess(cfg: TrainConfig, kill_at: int | None = None, **env: str) -> subprocess.CompletedProcess:
    env = {**ONE_THREAD_ENV, **env}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    return subprocess.run([sys.executable, "-c", TRAIN_CODE, json.dumps(dataclasses.asdict(cfg))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_kill_9_then_resume_ends_with_identical_weights(synthetic_store, tmp_path):
    run_train(tiny(synthetic_store, tmp_path / "whole"))   # uninterrupted, here (one thread too)
    killed = run_subprocess(tiny(synthetic_store, tmp_path / "killed"), kill_at=13)
    assert killed.returncode == -9
    run = tmp_path / "killed"
    assert (run / "checkpoints" / "latest").read_text() == "step_000008"
    assert not (run / "transcoder.safetensors").exists()
    steps_before = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_before == [4, 8, 12]   # the line of step 12 is past the checkpoint
    resumed = run_subprocess(TrainConfig(resume=str(run)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = load_file(tmp_path / "whole" / "transcoder.safetensors"), load_file(run / "transcoder.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = torch.load(tmp_path / "whole" / "checkpoints" / "step_000024" / "state.pt", weights_only=True)
    sb = torch.load(run / "checkpoints" / "step_000024" / "state.pt", weights_only=True)
    assert torch.equal(sa["tokens_since_fired"], sb["tokens_since_fired"])
    assert sa["loader_position"] == sb["loader_position"] == 24 * 128
    for ka, kb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ka["exp_avg_sq"], kb["exp_avg_sq"])
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                          for line in text.splitlines()]
    ma, mb = strip((tmp_path / "whole" / "metrics.jsonl").read_text()), strip((run / "metrics.jsonl").read_text())
    assert [r["step"] for r in mb] == [4, 8, 12, 16, 20, 24]   # no duplicated lines
    assert ma == mb
    samples = Path("activation_samples") / "samples.safetensors"
    if (tmp_path / "whole" / samples).exists():   # the samples collector survived the kill too
        xa, xb = load_file(tmp_path / "whole" / samples), load_file(run / samples)
        assert all(torch.equal(xa[k], xb[k]) for k in xa)


def test_a_run_interrupted_under_tc_0_1_resumes_to_the_same_weights(synthetic_store, tmp_path):
    """A checkpoint as tc 0.1 wrote it (a version 1 transcoder file; BatchTopK's update count as
    `threshold_updates` in state.pt) resumes, and the run ends exactly where an uninterrupted one does."""
    run_train(tiny(synthetic_store, tmp_path / "whole"))
    assert run_subprocess(tiny(synthetic_store, tmp_path / "killed"), kill_at=13).returncode == -9
    checkpoint = tmp_path / "killed" / "checkpoints" / "step_000008"
    rewrite_as_tc_0_1_transcoder(checkpoint / "transcoder.safetensors")
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    state["threshold_updates"] = state.pop("sparsity")["updates"]
    torch.save(state, checkpoint / "state.pt")
    run_train(TrainConfig(resume=str(tmp_path / "killed")))
    a = load_file(tmp_path / "whole" / "transcoder.safetensors")
    b = load_file(tmp_path / "killed" / "transcoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_skip_transcoder_trains_resumes_exactly_and_is_saved(synthetic_store, tmp_path):
    cfg = dict(skip=True, steps=16)
    run_train(tiny(synthetic_store, tmp_path / "whole", **cfg))
    assert run_subprocess(tiny(synthetic_store, tmp_path / "killed", **cfg), kill_at=11).returncode == -9
    assert run_subprocess(TrainConfig(resume=str(tmp_path / "killed"))).returncode == 0
    a = load_file(tmp_path / "whole" / "transcoder.safetensors")
    b = load_file(tmp_path / "killed" / "transcoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["W_skip"].shape == (32, 32) and a["W_skip"].abs().sum() > 0   # trained away from its zero init
    assert Transcoder.load(tmp_path / "whole" / "transcoder.safetensors").skip


def test_a_run_saved_before_an_option_existed_resumes_doing_what_it_did(tmp_path):
    """tc 0.1 trained on outlier rows (it had no rule) and had no skip path: a resume keeps that."""
    saved = dataclasses.asdict(tiny("store.zarr", tmp_path))
    for name in ("include_outliers", "skip", "encoder_init"):
        del saved[name]
    merged = merge_resume(TrainConfig(resume=str(tmp_path)), saved, tmp_path, given={"resume"})
    assert merged.include_outliers is True and merged.skip is False and merged.encoder_init == 0.1


def test_resume_of_a_finished_run_changes_nothing(synthetic_store, tmp_path):
    run = run_train(tiny(synthetic_store, tmp_path / "run", steps=8))
    before = snapshot(run)
    assert run_train(TrainConfig(resume=str(run))) == run
    assert snapshot(run) == before


def test_a_run_killed_right_after_it_was_made_resumes_with_its_config_file(synthetic_store, tmp_path):
    import tomllib

    cfg = tiny(synthetic_store, tmp_path / "run", steps=8)
    killed = run_subprocess(cfg, TC_KILL_AT="train_config_written:1")
    assert killed.returncode == -9
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "tc-train.toml").exists()
    run_train(TrainConfig(resume=str(tmp_path / "run")))
    recorded = tomllib.loads((tmp_path / "run" / "tc-train.toml").read_text())
    assert "resume" not in recorded
    assert recorded["steps"] == 8 and recorded["groups"] == cfg.groups and recorded["out"] == str(tmp_path / "run")


# ----------------------------------------------------------------------------- bad input

def unfinished_store(path: Path) -> Path:
    w = StoreWriter.create(path, n_rows=2048, d_model=8, chunk_rows=1024, attrs={
        "model": "x", "layer": 0, "seq_len": 64, "hooks": {"source": "a", "target": "b"}})
    w.close()
    return path


@pytest.mark.parametrize("change, message", [
    (dict(cache="/nonexistent/store.zarr"), "does not exist"),
    (dict(cache=None), "no store given"),
    (dict(groups=[16, 32, 64, 15]), "sum to 127"),
    (dict(groups=[64, 64, 0]), "must be positive"),
    (dict(k=129), "larger than --dict-size"),
    (dict(batch_size=0), "--batch-size must be positive"),
    (dict(encoder_init=0.0), "--encoder-init must be positive"),
    (dict(lr=0.0), "--lr must be a positive"),
    (dict(steps=0), "must be positive"),
    (dict(steps=10, tokens=1000), "not both"),
    (dict(min_lr_ratio=1.5), "--min-lr-ratio"),
    (dict(sparsity="jumprelu"), "--sparsity 'jumprelu' is not a rule tc knows"),
    (dict(dict_size=4, groups=None, k=2), "too small for the default groups"),
])
def test_bad_options_are_one_line_user_errors_and_write_nothing(synthetic_store, tmp_path, change, message):
    cfg = tiny(synthetic_store, tmp_path / "run", **change)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        run_train(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_unfinished_store_is_refused(tmp_path):
    store = unfinished_store(tmp_path / "u.zarr")
    with pytest.raises(UserError, match="unfinished"):
        run_train(tiny(store, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_wandb_missing_is_a_user_error(synthetic_store, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="pip install wandb"):
        run_train(tiny(synthetic_store, tmp_path / "run", wandb_project="p"))
    assert not (tmp_path / "run").exists()


def test_existing_output_folder_is_never_overwritten(synthetic_store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        run_train(tiny(synthetic_store, out))
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_resume_refuses_other_config_other_store_and_other_width(synthetic_store, tmp_path):
    run = tmp_path / "run"
    killed = run_subprocess(tiny(synthetic_store, run), kill_at=9)
    assert killed.returncode == -9
    before = snapshot(run)
    with pytest.raises(UserError, match=r"different configuration: --k 8 \(run: 4\)"):
        run_train(TrainConfig(resume=str(run), k=8))
    with pytest.raises(UserError, match="--steps 30"):
        run_train(TrainConfig(resume=str(run), steps=30))
    other = write_synthetic_store(tmp_path / "other.zarr", seed=5)
    with pytest.raises(UserError, match="not the store"):
        run_train(TrainConfig(resume=str(run), cache=str(other)))
    narrow = write_synthetic_store(tmp_path / "narrow.zarr", d_model=16)
    with pytest.raises(UserError, match="d_model 16"):
        run_train(TrainConfig(resume=str(run), cache=str(narrow)))
    with pytest.raises(UserError, match="not a tc train run"):
        run_train(TrainConfig(resume=str(tmp_path)))
    assert snapshot(run) == before
    # leftovers of a kill while a checkpoint was being written do not confuse the resume
    (run / "checkpoints" / ".tmp_step_000016").mkdir()
    (run / "checkpoints" / ".tmp_step_000016" / "state.pt").write_bytes(b"half")
    (run / "checkpoints" / "step_000016").mkdir()
    (run / "checkpoints" / "step_000016" / "config.json").write_text("{}")
    # the same store at another path is fine, and options that do not touch the weights may change
    moved = tmp_path / "moved.zarr"
    shutil.copytree(synthetic_store, moved)
    assert run_train(TrainConfig(resume=str(run), cache=str(moved), log_every=8)) == run
    assert (run / "transcoder.safetensors").exists()
    assert (run / "checkpoints" / "step_000016" / "state.pt").exists()
    assert not (run / "checkpoints" / ".tmp_step_000016").exists()


# ----------------------------------------------------------------------------- hooks for samples and W&B

class Recorder:
    def __init__(self):
        self.seen, self.finished, self.loaded = [], [], None

    def observe(self, step, out, row_ids):
        self.seen.append((step, len(out.cols), row_ids.clone()))

    def state_dict(self):
        return {"steps": torch.tensor([s for s, _, _ in self.seen], dtype=torch.int64)}

    def load_state_dict(self, state):
        self.loaded = state

    def finish(self, run, store):
        self.finished.append(run.path)


def test_sample_collector_is_fed_every_sample_every_steps_and_checkpointed(synthetic_store, tmp_path):
    rec = Recorder()
    run = run_train(tiny(synthetic_store, tmp_path / "run", steps=12, sample_every=5, checkpoint_every=6),
                    collector_factory=lambda settings, d, device, store: rec)
    assert [s for s, _, _ in rec.seen] == [5, 10]
    flags = Store(synthetic_store).flags
    for _, nnz, rows in rec.seen:
        assert nnz == 4 * 128 and len(rows) == 128 and rows.dtype == torch.int64
        assert (flags[rows.numpy()] == 0).all()
    state = torch.load(run / "checkpoints" / "step_000012" / "state.pt", weights_only=True)
    assert state["collector"]["steps"].tolist() == [5, 10]
    assert rec.finished == [run]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_logs_the_run(synthetic_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = run_train(tiny(synthetic_store, tmp_path / "run", steps=8, wandb_project="tc-test", sample_every=0))
    assert (run / "wandb_id.txt").exists()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())


def test_sparsity_topk_trains_a_per_token_topk_transcoder(synthetic_store, tmp_path):
    run = run_train(tiny(synthetic_store, tmp_path / "run", groups=[128], sparsity="topk", steps=8, sample_every=0))
    model = Transcoder.load(run / "transcoder.safetensors")
    assert model.sparsity.spec() == {"rule": "topk", "k": 4}
    assert json.loads((run / "config.json").read_text())["architecture"] == "topk-skip-transcoder"
    x = torch.from_numpy(Store(synthetic_store).source[:256].astype("float32"))
    assert int((model.encode(x) > 0).sum(1).max()) <= 4    # never more than k per token

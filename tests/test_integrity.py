"""Nothing silent: damaged stores, checkpoints and transcoders are caught with one line, and a
damaged store is repaired by re-running the `tc cache` that made it (docs/reliability.md)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from conftest import write_synthetic_store
from pipeline.store import DamagedStore, Store, crc32
from pipeline.train import TrainConfig, run_train
from pipeline.util import UserError

REPO = Path(__file__).resolve().parent.parent
TINY_CACHE = ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", "3000",
              "--seq-len", "64", "--chunk-rows", "256", "--batch-size", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tc(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: what a user sees on stderr, and the exit code."""
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]


def chunk_file(store: Path, array: str, c: int) -> Path:
    g = zarr.open_group(str(store), mode="r")
    arr = g[array]
    return store / array / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))


def scramble(path: Path, seed: int = 0) -> None:
    """Overwrite a file with random bytes of the same length (what a flaky disk might leave)."""
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def tiny_train(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(store), out=str(out), dict_size=128, groups=[16, 32, 64, 16], k=4, batch_size=128,
                steps=24, log_every=4, checkpoint_every=8, lr=3e-3, warmup_steps=4, sample_every=0,
                dead_tokens=1000, aux_k=16, keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_whole(tmp_path_factory) -> Path:
    """One uninterrupted tiny-model store, made once: what repaired and resumed stores must equal."""
    out = tmp_path_factory.mktemp("whole") / "whole.zarr"
    assert tc(*TINY_CACHE, "--out", str(out)).returncode == 0
    return out


@pytest.fixture
def store(tmp_path) -> Path:
    return write_synthetic_store(tmp_path / "s.zarr", n_rows=2048, chunk_rows=256)


# ----------------------------------------------------------------------------- damaged chunks

@pytest.mark.parametrize("array,damage", [("source", "scramble"), ("target", "delete"), ("tokens", "scramble"),
                                          ("flags", "delete")])
def test_a_damaged_chunk_is_caught_by_every_reader_and_by_verify(store, tmp_path, array, damage):
    intact = Store(store)
    assert intact.verify(progress=False) == []
    f = chunk_file(store, array, 3)
    scramble(f) if damage == "scramble" else f.unlink()
    s = Store(store)
    with pytest.raises(DamagedStore, match=f"chunk 3 of {array}"):
        if array in ("source", "target"):
            s.read_chunk(3)
        else:
            getattr(s, array)
    assert s.verify(progress=False) == [(array, 3)]
    r = tc("info", str(store), "--verify")
    assert_one_line_error(r, "damaged", f"chunk 3 of {array}", "tc cache")
    r = tc("train", "--cache", str(store), "--dict-size", "64", "--k", "4", "--batch-size", "128",
           "--steps", "40", "--out", str(tmp_path / "run"))
    assert_one_line_error(r, str(store), f"chunk 3 of {array}", "tc cache")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_statistics_and_vocabulary_are_checked_too(store):
    vocab = Store(store).vocab()
    path = store / "stats" / "source_var"
    chunk = next(p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    scramble(chunk)
    with pytest.raises(DamagedStore, match="stats/source_var"):
        Store(store).stats()
    assert Store(store).vocab() == vocab   # the others still read
    assert ("stats/source_var", None) in Store(store).verify(progress=False)


def test_a_compressed_chunk_that_cannot_be_decoded_is_damage_not_a_traceback(tmp_path):
    out = tmp_path / "z.zarr"
    assert tc(*TINY_CACHE, "--compress", "--out", str(out)).returncode == 0
    scramble(chunk_file(out, "source", 2))
    with pytest.raises(DamagedStore, match="chunk 2 of source"):
        Store(out).read_chunk(2)
    assert_one_line_error(tc("info", str(out), "--verify"), "chunk 2 of source")


def test_rerunning_the_same_cache_repairs_exactly_the_damaged_chunks(tmp_path, tiny_whole):
    from test_cache import assert_same_store

    original = tiny_whole
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(original, damaged)
    scramble(chunk_file(damaged, "source", 1))
    chunk_file(damaged, "tokens", 4).unlink()
    scramble(chunk_file(damaged, "chunk_meta", 6))
    untouched = chunk_file(damaged, "target", 0)
    before = untouched.stat().st_mtime_ns
    r = tc(*TINY_CACHE, "--out", str(damaged))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recomputing 3 chunk(s)" in r.stdout
    assert_same_store(original, damaged)
    assert untouched.stat().st_mtime_ns == before   # only the damaged chunks were written
    assert Store(damaged).verify(progress=False) == []
    again = tc(*TINY_CACHE, "--out", str(damaged))
    assert again.returncode == 0 and "every chunk matches its checksum" in again.stdout


def test_checksums_cover_what_is_stored(store):
    """The recorded checksum of each chunk is the checksum of that chunk's values as stored."""
    s = Store(store)
    for c in range(s.n_chunks):
        a, b = s.chunk_range(c)
        assert int(s.crc[c, 0]) == crc32(s.source[a:b])
        assert int(s.crc[c, 2]) == crc32(s.group["tokens"][a:b])


# ----------------------------------------------------------------------------- damaged store metadata

def set_attr(store: Path, **attrs) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(attrs)
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,message", [
    (lambda s: set_attr(s, d_model="abc"), "d_model"),
    (lambda s: set_attr(s, chunk_rows=-256), "chunk_rows"),
    (lambda s: set_attr(s, n_rows=10 ** 9), "rows"),
    (lambda s: set_attr(s, hooks=None), "hooks"),
    (lambda s: shutil.rmtree(s / "target"), "'target'"),
    (lambda s: (s / "tokens" / "zarr.json").write_text('{"zarr_format": 3, "node_t'), "'tokens'"),
    (lambda s: (s / "zarr.json").write_text((s / "zarr.json").read_text()[:40]), "zarr.json"),
])
def test_damaged_store_metadata_is_one_line_in_every_stage(store, tmp_path, damage, message):
    damage(store)
    for args in (["info", str(store)],
                 ["train", "--cache", str(store), "--dict-size", "64", "--k", "4", "--out", str(tmp_path / "r")]):
        assert_one_line_error(tc(*args), "damaged", message)
    with pytest.raises(UserError, match=message):
        Store(store)


def test_a_batch_larger_than_the_usable_rows_is_refused(store, tmp_path):
    with pytest.raises(UserError, match="larger than the .* usable rows"):
        run_train(tiny_train(store, tmp_path / "r", batch_size=4096))
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- checkpoints and runs

def interrupted_copy(whole: Path, to: Path, at: str) -> Path:
    """The run folder as a kill right after checkpoint `at` leaves it (later checkpoints, the final
    transcoder and summary.json not written yet)."""
    shutil.copytree(whole, to)
    for p in (to / "checkpoints").iterdir():
        if p.is_dir() and p.name > at:
            shutil.rmtree(p)
    (to / "checkpoints" / "latest").write_text(at)
    for name in ("summary.json", "transcoder.safetensors"):
        (to / name).unlink()
    return to


def test_resume_falls_back_to_the_newest_intact_checkpoint(store, tmp_path, capsys):
    whole = run_train(tiny_train(store, tmp_path / "whole"))
    run = interrupted_copy(whole, tmp_path / "run", "step_000016")
    scramble(run / "checkpoints" / "step_000016" / "state.pt")
    r = CliRunner().invoke(app, ["info", str(run), "--verify"])
    assert r.exit_code == 2 and "step_000016: state.pt does not match its checksum" in r.output
    capsys.readouterr()
    run_train(TrainConfig(resume=str(run)))
    out = capsys.readouterr().out
    assert "checkpoint step_000016 is damaged (state.pt does not match its checksum): resuming from step_000008" in out
    a, b = load_file(whole / "transcoder.safetensors"), load_file(run / "transcoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20, 24]   # the lines after step 8 were written once, again


def test_no_intact_checkpoint_starts_again_from_step_0(store, tmp_path, capsys):
    whole = run_train(tiny_train(store, tmp_path / "whole"))
    run = interrupted_copy(whole, tmp_path / "run", "step_000008")
    (run / "checkpoints" / "step_000008" / "transcoder.safetensors").write_bytes(b"")
    capsys.readouterr()
    run_train(TrainConfig(resume=str(run)))
    assert "starting again from step 0" in capsys.readouterr().out
    a, b = load_file(whole / "transcoder.safetensors"), load_file(run / "transcoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_final_transcoder_is_refused_with_what_to_do(store, tmp_path):
    run = run_train(tiny_train(store, tmp_path / "run"))
    assert CliRunner().invoke(app, ["info", str(run), "--verify"]).exit_code == 0
    data = bytearray((run / "transcoder.safetensors").read_bytes())
    data[-5] ^= 0xFF   # one flipped byte in the weights
    (run / "transcoder.safetensors").write_bytes(bytes(data))
    r = tc("samples", "collect", "--run", str(run))
    assert_one_line_error(r, "transcoder.safetensors is damaged", "step_000024")


# a NaN decoder bias makes the loss NaN (seen at the next log line, step 12); a NaN encoder weight
# can leave the loss finite (the latent just never wins the top-k), and is seen before the checkpoint
@pytest.mark.parametrize("param,message", [("b_dec", "stopped at step 12: the loss is nan"),
                                           ("W_enc", "stopped at step 16: a weight is NaN")])
def test_a_non_finite_loss_or_weight_stops_training_and_saves_nothing_after_it(store, tmp_path, monkeypatch,
                                                                                param, message):
    import pipeline.train as train

    real = train.train_step

    def poisoned(model, optimizer, x, y, lr):
        out = real(model, optimizer, x, y, lr)
        if optimizer.state[model.W_enc]["step"] >= 11:
            with torch.no_grad():
                getattr(model, param).view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(UserError, match=message):
        run_train(tiny_train(store, tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step_000008"
    assert not (run / "summary.json").exists() and not (run / "transcoder.safetensors").exists()
    saved = load_file(run / "checkpoints" / "step_000008" / "transcoder.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_a_second_process_on_one_run_folder_is_refused(store, tmp_path):
    run = run_train(tiny_train(store, tmp_path / "run", steps=8))
    interrupted = interrupted_copy(run, tmp_path / "again", "step_000008")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (interrupted / ".tc-run.lock").write_text(f"{socket.gethostname()} {holder.pid}")
        r = tc("train", "--resume", str(interrupted))
        assert_one_line_error(r, "another tc process", str(holder.pid))
        assert [json.loads(x)["step"] for x in (interrupted / "metrics.jsonl").read_text().splitlines()] == [4, 8]
    finally:
        holder.kill()
        holder.wait()
    r = tc("train", "--resume", str(interrupted))   # the holder is dead: its lock is taken over
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (interrupted / ".tc-run.lock").exists()


# ----------------------------------------------------------------------------- interrupts, full disks, limits

def ctrl_c_able() -> None:
    """Before the child's exec: Ctrl-C at its default. A pytest started in the background by a shell
    without job control ignores SIGINT, its children inherit that, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("point", ["chunk_before_commit:2", "chunk_committed:3", "before_finalize:1",
                                   "finalize_before_mark:1"])
def test_ctrl_c_in_any_phase_of_cache_is_one_line_and_resumes_identically(tmp_path, tiny_whole, point):
    from test_cache import assert_same_store

    whole = tiny_whole
    out = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-m", "cli", *TINY_CACHE, "--out", str(out)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "TC_INTERRUPT_AT": point}, timeout=600,
                       preexec_fn=ctrl_c_able)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [
        "error: interrupted: re-run the same command to continue where it stopped"]
    assert tc(*TINY_CACHE, "--out", str(out)).returncode == 0
    assert_same_store(whole, out)


@pytest.mark.parametrize("point,hint", [
    ("train_config_written:1", "no checkpoint was written yet (the first is at step 8): `tc train --resume {run}` "
                               "starts it again"),
    ("checkpoint_written:2", "continue from step_000016 with `tc train --resume {run}`")])
def test_ctrl_c_in_training_names_the_real_command(store, tmp_path, point, hint):
    whole = run_train(tiny_train(store, tmp_path / "whole"))
    run = tmp_path / "run"
    args = ["train", "--cache", str(store), "--dict-size", "128", "--groups", "16,32,64,16", "--k", "4",
            "--batch-size", "128", "--steps", "24", "--log-every", "4", "--checkpoint-every", "8", "--lr", "3e-3",
            "--warmup-steps", "4", "--sample-every", "0", "--dead-tokens", "1000", "--aux-k", "16",
            "--keep-checkpoints", "0", "--out", str(run)]
    r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TC_INTERRUPT_AT": point}, timeout=600,
                       preexec_fn=ctrl_c_able)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [x for x in r.stderr.splitlines() if x.startswith("error:")] == [f"error: interrupted: {hint.format(run=run)}"]
    assert tc("train", "--resume", str(run)).returncode == 0
    a, b = load_file(whole / "transcoder.safetensors"), load_file(run / "transcoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_caching_is_one_line_and_the_rerun_completes(tmp_path, tiny_whole, monkeypatch):
    import errno

    import pipeline.store as store_module
    from test_cache import assert_same_store

    whole = tiny_whole
    real, calls = store_module.write_chunk_file, []

    def filling(path, data):
        calls.append(path)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)
    monkeypatch.setattr(store_module, "write_chunk_file", filling)
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(app, [*TINY_CACHE, "--out", str(out)])
    assert r.exit_code == 2 and "the disk is full" in r.output and "re-run the same command" in r.output
    monkeypatch.undo()
    assert CliRunner().invoke(app, [*TINY_CACHE, "--out", str(out)]).exit_code == 0
    assert_same_store(whole, out)


def test_a_full_disk_while_checkpointing_names_the_resume_command(store, tmp_path, monkeypatch):
    from pipeline.transcoder import Transcoder

    real = Transcoder.save
    calls = []

    def filling(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:   # the second checkpoint: what safetensors raises on a full disk
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")
        return real(self, path, *a, **kw)
    monkeypatch.setattr(Transcoder, "save", filling)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--cache", str(store), "--dict-size", "128", "--k", "4",
                                 "--batch-size", "128", "--steps", "24", "--checkpoint-every", "8",
                                 "--out", str(run)])
    assert r.exit_code == 2, r.output
    assert f"the disk is full: free some space, then continue from step_000008 with `tc train --resume {run}`" \
        in " ".join(r.output.split())


def test_work_the_disk_cannot_hold_is_refused_before_anything_is_written(store, tmp_path, monkeypatch):
    import pipeline.util as util

    monkeypatch.setattr(util, "free_bytes", lambda path: 10_000)
    r = CliRunner().invoke(app, [*TINY_CACHE, "--out", str(tmp_path / "c.zarr")])
    need = 3008 * (2 * 2 * 64 + 5)   # 47 sequences of 64 tokens, fp16 source and target of d_model 64
    assert r.exit_code == 2 and f"needs about {need / 1000:.1f} KB" in r.output and "10.0 KB free" in r.output
    assert not (tmp_path / "c.zarr").exists()
    with pytest.raises(UserError, match="free some space"):
        run_train(tiny_train(store, tmp_path / "run"))
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_sequence_longer_than_the_models_context_is_refused(tmp_path):
    r = tc(*TINY_CACHE, "--seq-len", "9000", "--chunk-rows", "9000", "--tokens", "20000", "--out", str(tmp_path / "s"))
    assert_one_line_error(r, "--seq-len 9,000 is longer than tiny's context of 8,192 tokens")
    assert not (tmp_path / "s").exists()

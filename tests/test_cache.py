"""Stage one end to end on the tiny model: the right hooks, the right token ids, kill -9 and resume
giving a bit-identical store, refusals, and one clear line for each bad input."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli import app
from conftest import stop_store_creation_at
from pipeline import forward, models, text
from pipeline.cache import CacheConfig, run_cache
from pipeline.store import Store

ARRAYS = ["source", "target", "tokens", "flags", "chunk_stats", "chunk_norms", "chunk_meta",
          "stats/source_mean", "stats/source_var", "stats/target_mean", "stats/target_var",
          "vocab/offsets", "vocab/bytes"]
# 64-token sequences, 4 per chunk, forward batches of 3: batches straddle chunks on purpose
TINY_ARGS = ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", "3000",
             "--seq-len", "64", "--chunk-rows", "256", "--batch-size", "3"]


def tc(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=Path(__file__).parent.parent)


def tc_inproc(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "t.zarr"
    r = tc_inproc([*TINY_ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        assert np.array_equal(ga[name][:], gb[name][:]), name
    drop = {"versions", "config"}
    attrs_a = {k: v for k, v in ga.attrs.asdict().items() if k not in drop}
    attrs_b = {k: v for k, v in gb.attrs.asdict().items() if k not in drop}
    assert attrs_a == attrs_b
    assert (a / "tc-cache.toml").exists() and (b / "tc-cache.toml").exists()   # the record of the command


def check_hooks_and_tokens(store_path: Path, spec: str, n_seqs: int = 4) -> None:
    """Stored rows satisfy resid_post = resid_mid + mlp_out, and the ids are the tokenizer's."""
    s = Store(store_path)
    lm = models.load_model(spec)
    rows = n_seqs * s.seq_len
    toks = torch.from_numpy(s.tokens[:rows].astype(np.int64)).view(n_seqs, s.seq_len)
    post = forward.forward_hooks(lm, toks, s.attrs["layer"], ["hook_resid_post"])
    post = next(iter(post.values())).reshape(rows, -1).numpy()
    mid, out = (s.group[k][:rows].astype(np.float32) for k in ("source", "target"))
    keep = s.flags[:rows] == 0
    scale = np.abs(post[keep]).max()
    # fp16 keeps ~3 significant digits of each term
    np.testing.assert_allclose(mid[keep] + out[keep], post[keep], atol=2e-3 * scale, rtol=2e-3)
    assert not np.allclose(out[keep], 0)
    # token ids: the first sequence is BOS then the tokenizer's own ids for the first document
    doc = next(text.iter_documents("python-docs"))
    ids = lm.tokenizer(doc, add_special_tokens=False)["input_ids"][: s.seq_len - 1]
    assert s.tokens[0] == lm.bos_id
    assert s.tokens[1:1 + len(ids)].tolist() == ids
    packed = np.concatenate(list(text.pack_sequences(iter([doc]), lm.tokenizer, s.seq_len, lm.bos_id)))
    assert s.tokens[:min(len(packed), rows)].tolist() == packed[:rows].tolist()


def test_tiny_store_reads_the_right_hooks_and_tokens(tiny_store):
    s = Store(tiny_store)
    assert s.complete and s.n_rows == 3008 and s.attrs["hooks"] == {
        "source": "blocks.1.hook_resid_mid", "target": "blocks.1.hook_mlp_out"}
    assert s.source.dtype == np.float16 and s.tokens.dtype == np.int32
    assert (s.flags[:: s.seq_len] & 1).all()        # every sequence starts with a flagged BOS
    check_hooks_and_tokens(tiny_store, "tiny")


@pytest.mark.slow
def test_gemma3_store_reads_the_right_hooks_and_tokens(tmp_path):
    out = tmp_path / "g3.zarr"
    run_cache(CacheConfig(model="gemma-3-270m", dataset="python-docs", layer=6, tokens=1024, seq_len=128,
                          batch_size=4, out=str(out)))
    s = Store(out)
    assert s.d_model == 640 and s.n_rows == 1024
    check_hooks_and_tokens(out, "gemma-3-270m", n_seqs=2)


@pytest.mark.parametrize("kill_at", ["chunk_committed:2", "chunk_before_commit:3", "before_finalize:1",
                                     "finalize_before_mark:1"])
def test_kill_minus_9_then_resume_is_bit_identical(tiny_store, tmp_path, kill_at):
    out = tmp_path / "k.zarr"
    killed = tc([*TINY_ARGS, "--out", str(out)], TC_KILL_AT=kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert not Store(out).complete
    resumed = tc([*TINY_ARGS, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(tiny_store, out)


def test_kill_at_a_random_moment_then_resume_is_bit_identical(tiny_store, tmp_path):
    out = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *TINY_ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    while not (out / "chunk_meta").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert tc([*TINY_ARGS, "--out", str(out)]).returncode == 0
    assert_same_store(tiny_store, out)


def test_complete_store_is_reused(tiny_store):
    before = (tiny_store / "zarr.json").stat().st_mtime_ns
    r = tc_inproc([*TINY_ARGS, "--out", str(tiny_store)])
    assert r.exit_code == 0 and "already complete" in r.output
    assert (tiny_store / "zarr.json").stat().st_mtime_ns == before


def test_different_config_is_refused_unless_overwrite(tiny_store, tmp_path):
    out = tmp_path / "copy.zarr"
    assert tc_inproc([*TINY_ARGS, "--out", str(out)]).exit_code == 0
    r = tc_inproc([*TINY_ARGS, "--layer", "2", "--out", str(out)])
    assert r.exit_code == 2 and "different configuration (layer)" in r.output and "--overwrite" in r.output
    assert_same_store(tiny_store, out)
    r = tc_inproc([*TINY_ARGS, "--layer", "2", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Store(out).attrs["layer"] == 2


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "w.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *TINY_ARGS, "--tokens", "1M", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)
    try:
        while not (out / "chunk_meta").exists():
            assert proc.poll() is None
            time.sleep(0.05)
        r = tc([*TINY_ARGS, "--tokens", "1M", "--out", str(out)])
        assert r.returncode == 2 and "another tc process" in r.stderr
    finally:
        proc.kill()
        proc.wait()


def test_text_running_out_gives_a_valid_smaller_store(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("A short note about transcoders and sparse features. " * 40)
    out = tmp_path / "n.zarr"
    r = tc_inproc(["cache", "--model", "tiny", "--dataset", str(notes), "--layer", "1", "--tokens", "1M",
                   "--seq-len", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "text ran out" in r.output
    s = Store(out)
    assert s.complete and 0 < s.n_rows < 1_000_000 and s.n_rows % 32 == 0
    assert s.source.shape[0] == s.n_rows


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model-xyz"], "could not load no-such-model-xyz"),
    (["--model", "google/gemma-2-2b"], "could not load google/gemma-2-2b"),
    (["--layer", "99"], "layer 99 is out of range"),
    (["--source", "hook_nope"], "unknown hook"),
    (["--dataset", "/no/such/file.txt"], "/no/such/file.txt"),
    (["--tokens", "-5"], "bad count"),
    (["--tokens", "lots"], "bad count"),
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--chunk-rows", "100"], "multiple of --seq-len"),
    (["--device", "tpu"], "unknown --device"),
    (["--outlier-factor", "0.8"], "--outlier-factor must be 0 (flag none) or above 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    base = ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", "1000", "--seq-len", "64"]
    out = tmp_path / "bad.zarr"
    r = tc_inproc([*base, *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    # one error line; at most the status line of a model load before it
    lines = r.output.strip().splitlines()
    assert len([x for x in lines if x.startswith("error:")]) == 1
    assert all(x.startswith(("error:", "cache: loading")) for x in lines), lines
    assert not (out / "source").exists()


def test_empty_text_and_unwritable_output(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["cache", "--model", "tiny", "--layer", "1", "--tokens", "1000", "--seq-len", "64"]
    r = tc_inproc([*base, "--dataset", str(empty), "--out", str(tmp_path / "e.zarr")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "e.zarr").exists()
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    r = tc_inproc([*base, "--dataset", "python-docs", "--out", str(blocker / "x.zarr")])
    assert r.exit_code == 2 and "cannot write" in r.output, r.output
    assert blocker.read_text() == "mine"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    r = tc_inproc([*base, "--dataset", "python-docs", "--out", str(precious), "--overwrite"])
    assert r.exit_code == 2 and "not a tc store" in r.output
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_store_killed_while_being_created_is_made_again(tiny_store, tmp_path, monkeypatch):
    out = tmp_path / "c.zarr"
    stop_store_creation_at(monkeypatch, "tokens")   # after the first arrays
    tc_inproc([*TINY_ARGS, "--out", str(out)])
    monkeypatch.undo()
    assert (out / "source").exists() and not (out / "tokens").exists()
    r = tc_inproc([*TINY_ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert_same_store(tiny_store, out)


def test_nan_activations_end_in_one_line_and_leave_nothing(tmp_path, monkeypatch):
    from pipeline import forward

    real = forward.forward_hooks

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {name: value * float("nan") for name, value in out.items()}

    monkeypatch.setattr(forward, "forward_hooks", poisoned)
    out = tmp_path / "nan.zarr"
    r = tc_inproc([*TINY_ARGS, "--out", str(out)])
    assert r.exit_code == 2 and "NaN or inf" in r.output and "--dtype float32" in r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)   # a clean exit, not a crash
    assert not out.exists()   # the empty store this run made is removed


# ---- local text that cannot be read, and the identity of the text source ----

LOCAL_ARGS = ["cache", "--model", "tiny", "--layer", "1", "--tokens", "3000", "--seq-len", "64",
              "--chunk-rows", "256", "--batch-size", "3"]


def write_text_folder(root: Path, n_files: int = 12) -> Path:
    """A folder of .txt files holding python-docs text: enough for several chunks."""
    root.mkdir(parents=True, exist_ok=True)
    docs = iter(text.iter_documents("python-docs"))
    for i in range(n_files):
        (root / f"doc{i:02d}.txt").write_text(next(docs)[:3000])
    return root


@pytest.mark.parametrize("name, data, where", [
    ("latin1.txt", "café crème\n".encode("latin-1"), "latin1.txt is not UTF-8 text (byte 3, line 1)"),
    ("random.txt", bytes(np.random.default_rng(1).integers(128, 256, 2000, dtype=np.uint8)), "random.txt is not UTF-8"),
    ("broken.jsonl", b'{"text": "fine"}\n{"text": "no closing quote}\n', "broken.jsonl line 2 is not valid JSON"),
])
def test_bad_local_text_is_one_line_and_leaves_no_store(tmp_path, name, data, where):
    root = write_text_folder(tmp_path / "corpus", 2)
    (root / name).write_bytes(data)
    out = tmp_path / "bad.zarr"
    r = tc([*LOCAL_ARGS, "--dataset", str(root), "--out", str(out)])
    assert r.returncode == 2, r.stderr
    assert where in r.stderr and "--text-errors" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()   # checked before the store was made: nothing to resume, nothing to clean


def test_skip_and_replace_make_a_store_and_say_so(tmp_path):
    root = write_text_folder(tmp_path / "corpus", 2)
    (root / "zz_latin1.txt").write_bytes("café crème ".encode("latin-1") * 50)
    args = [a if a != "3000" else "1M" for a in LOCAL_ARGS]   # the text runs out: every document counts
    for errors, said in (("skip", "left out 1 undecodable document(s)"),
                         ("replace", "replaced bad bytes with U+FFFD in 1 undecodable document(s)")):
        out = tmp_path / f"{errors}.zarr"
        r = tc_inproc([*args, "--dataset", str(root), "--text-errors", errors, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert said in r.output and "zz_latin1.txt" in r.output
        info = Store(out).attrs["dataset"]
        assert info["text_errors"] == errors and info["undecodable"] == 1
    skipped, replaced = Store(tmp_path / "skip.zarr"), Store(tmp_path / "replace.zarr")
    n = min(skipped.n_rows, replaced.n_rows)
    assert np.array_equal(skipped.tokens[:n], replaced.tokens[:n])   # the good files come first in both
    assert skipped.n_rows < replaced.n_rows   # the replaced file's text is in one, not the other


def killed_then_changed(tmp_path: Path, change) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Cache a folder, kill -9 it after its first chunk, apply `change` to the folder, re-run."""
    root = write_text_folder(tmp_path / "corpus")
    out = tmp_path / "k.zarr"
    args = [*LOCAL_ARGS, "--dataset", str(root), "--out", str(out)]
    assert tc(args, TC_KILL_AT="chunk_committed:1").returncode == -signal.SIGKILL
    change(root)
    return root, out, tc(args)


def test_a_changed_folder_is_refused_on_resume_and_the_store_kept(tmp_path):
    root, out, r = killed_then_changed(tmp_path, lambda root: (root / "doc03.txt").write_text("other text"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "was begun on different text: 1 file(s) changed (doc03.txt)" in r.stderr
    assert "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not Store(out).complete and Store(out).attrs["dataset"]["sha256"]   # kept, still resumable
    write_text_folder(root)   # the text as it was
    r = tc([*LOCAL_ARGS, "--dataset", str(root), "--out", str(out)])
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh.zarr"
    assert tc_inproc([*LOCAL_ARGS, "--dataset", str(root), "--out", str(fresh)]).exit_code == 0
    assert_same_store(fresh, out)


def test_files_added_or_removed_are_refused_on_resume(tmp_path):
    _, _, r = killed_then_changed(tmp_path, lambda root: (root / "doc00.txt").unlink())
    assert r.returncode == 2 and "1 file(s) removed (doc00.txt)" in r.stderr
    _, _, r = killed_then_changed(tmp_path / "2", lambda root: (root / "a_new.txt").write_text("new"))
    assert r.returncode == 2 and "1 file(s) added (a_new.txt)" in r.stderr


def test_a_store_from_before_the_identity_resumes_as_before(tmp_path):
    def forget_identity(root: Path) -> None:
        group = zarr.open_group(str(tmp_path / "k.zarr"), mode="r+")
        group.attrs["dataset"] = {k: v for k, v in group.attrs["dataset"].items()
                                  if k not in ("contents", "sha256", "text_errors", "undecodable")}

    root, out, r = killed_then_changed(tmp_path, forget_identity)
    assert r.returncode == 0, r.stderr
    assert Store(out).complete


def test_a_hub_error_mid_stream_is_one_line_and_leaves_no_store(tmp_path, monkeypatch):
    import datasets

    def stream(*args, **kwargs):
        def rows():
            yield {"text": "a first document that is read"}
            raise ConnectionError("connection reset by peer")
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", stream)
    out = tmp_path / "hub.zarr"
    r = tc_inproc([*LOCAL_ARGS, "--dataset", "someone/some-data", "--out", str(out)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    last = r.output.strip().splitlines()[-1]   # the lines before it are the progress bar's
    assert "dataset someone/some-data: reading stopped after 1 records: ConnectionError" in last
    assert "Traceback" not in r.output and not out.exists()


def test_bad_local_text_fails_before_the_model_loads_or_the_store_is_made(tmp_path, monkeypatch):
    from pipeline import cache

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached with a bad file in the dataset")

    monkeypatch.setattr(models, "load_model", must_not_run)
    monkeypatch.setattr(cache.StoreWriter, "create", must_not_run)
    root = write_text_folder(tmp_path / "corpus", 2)
    (root / "d.jsonl").write_bytes(b'{"text": "fine"}\n' * 100 + b'{"text": "caf\xe9"}\n')
    r = tc_inproc([*LOCAL_ARGS, "--dataset", str(root), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 2 and "d.jsonl line 101 is not UTF-8" in r.output, r.output

"""Stores on object storage, against a real S3 API: moto's server, on 127.0.0.1, started and stopped
by this module. cache -> train -> samples -> eval on an s3:// store, the store equal to the local
one bit for bit, kill -9 and resume, the writer lock (a conditional PUT), damage caught by the
checksums, and one line for each bad input (docs/object-storage.md)."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="needs s3fs and moto[server]: pip install -e '.[dev]'")
pytest.importorskip("moto.server", reason="needs s3fs and moto[server]: pip install -e '.[dev]'")

import zarr  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from test_integrity import assert_one_line_error  # noqa: E402
from pipeline.storage import Location, ObjectLock, filesystem  # noqa: E402
from pipeline.store import LOCK_NAME, Store  # noqa: E402
from pipeline.util import UserError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUCKET = "tc-test"
TINY_CACHE = ["cache", "--model", "tiny", "--dataset", "python-docs", "--layer", "1", "--tokens", "3000",
              "--seq-len", "64", "--chunk-rows", "256", "--batch-size", "3"]
TINY_TRAIN = ["--dict-size", "128", "--groups", "16,32,64,16", "--k", "4", "--batch-size", "128", "--steps", "24",
              "--checkpoint-every", "8", "--log-every", "4"]
ARRAYS = ["source", "target", "tokens", "flags", "chunk_stats", "chunk_norms", "chunk_crc", "chunk_meta",
          "stats/source_mean", "stats/source_var", "stats/target_mean", "stats/target_var",
          "vocab/offsets", "vocab/bytes"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback with one bucket; the AWS variables point every tc process at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        mp.delenv("TC_STORAGE_OPTIONS", raising=False)
        fs, _ = filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield endpoint
        fs.invalidate_cache()
    server.stop()


def tc(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)


def arrays(path: str | Path) -> zarr.Group:
    return zarr.open_group(Location(path).zarr_store(read_only=True), mode="r")


def assert_same_store(a: str | Path, b: str | Path) -> None:
    """Every array equal bit for bit, and every attribute but the recorded command and versions."""
    ga, gb = arrays(a), arrays(b)
    for name in ARRAYS:
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)), name
    drop = {"versions", "config"}
    assert ({k: v for k, v in ga.attrs.asdict().items() if k not in drop}
            == {k: v for k, v in gb.attrs.asdict().items() if k not in drop})
    assert Location(a).exists("tc-cache.toml") and Location(b).exists("tc-cache.toml")


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    """The tiny store on local disk, uninterrupted: what every s3:// store must equal."""
    out = tmp_path_factory.mktemp("local") / "t.zarr"
    r = tc(*TINY_CACHE, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def s3_store(s3, local_store) -> str:
    url = f"s3://{BUCKET}/whole.zarr"
    r = tc(*TINY_CACHE, "--out", url)
    assert r.returncode == 0, r.stderr[-2000:]
    return url


def objects(where: Location) -> list[str]:
    where.fs.invalidate_cache()
    return sorted(where.fs.find(where.root))


def key(url: str, array: str, c: int) -> str:
    """The object that holds chunk c of an array."""
    arr = arrays(url)[array]
    where = Location(url)
    return f"{where.root}/{array}/" + arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))


# ----------------------------------------------------------------------------- the pipeline

def test_an_s3_store_equals_the_local_one_and_every_stage_reads_it(s3_store, local_store, tmp_path):
    assert_same_store(s3_store, local_store)
    assert Location(s3_store).exists(LOCK_NAME) is False   # released at the end
    info = tc("info", s3_store, "--verify")
    assert info.returncode == 0, info.stderr[-2000:]
    assert "complete: 3,008 tokens in 12 chunks" in info.stdout and "verified   all 12" in info.stdout

    runs = {}
    for name, store in (("s3", s3_store), ("local", str(local_store))):
        run = tmp_path / name
        r = tc("train", "--cache", store, *TINY_TRAIN, "--out", str(run))
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = run
    # the same rows in the same order: the same weights, whichever store they came from
    a, b = load_file(runs["s3"] / "transcoder.safetensors"), load_file(runs["local"] / "transcoder.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    config = json.loads((runs["s3"] / "config.json").read_text())
    assert config["cache"] == s3_store   # the URL, as given, is what later stages reopen

    run = str(runs["s3"])
    for args in (("samples", "collect", "--run", run), ("eval", "--run", run, "--tokens", "2k")):
        r = tc(*args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    ev = json.loads((runs["s3"] / "eval.json").read_text())
    assert ev["store"] == s3_store and ev["rows"]["rows_are_training_rows"] is True
    assert 0 < ev["rows"]["fvu"] < 2
    assert any((runs["s3"] / "samples").iterdir())


def test_kill_9_while_caching_to_s3_and_resume_equals_the_local_store(s3, local_store):
    url = f"s3://{BUCKET}/killed.zarr"
    # between a chunk's objects and its commit: objects of an uncommitted chunk are left behind
    r = tc(*TINY_CACHE, "--out", url, TC_KILL_AT="chunk_before_commit:4")
    assert r.returncode == -9, r.stderr[-2000:]
    store = Store(url)
    committed = store.committed_chunks()
    assert not store.complete and 0 < len(committed) < 12
    # the killed writer's lock is still there, naming a pid of this host that no longer runs
    holder = json.loads(Location(url).read_text(LOCK_NAME))
    assert holder["host"] == socket.gethostname()
    r = tc(*TINY_CACHE, "--out", url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_store(url, local_store)
    assert not Location(url).exists(LOCK_NAME)


def test_two_torchrun_ranks_write_an_s3_store_equal_to_the_local_one(s3, local_store):
    url = f"s3://{BUCKET}/two-ranks.zarr"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), "-m", "cli", *TINY_CACHE, "--out", url],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(url, local_store)


# ----------------------------------------------------------------------------- one writer

def test_the_lock_object_is_made_with_a_conditional_put(s3):
    where = Location(f"s3://{BUCKET}/locks.zarr")
    assert where.create("x", "first") is True
    assert where.create("x", "second") is False   # the server refused: If-None-Match: *
    assert where.read_text("x") == "first"
    first, second = ObjectLock(where, LOCK_NAME), ObjectLock(where, LOCK_NAME)
    first.acquire()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()   # free again
    assert second.held
    second.release()
    assert not where.exists(LOCK_NAME)


def test_a_second_writer_on_an_s3_store_is_refused_and_changes_nothing(s3_store):
    where = Location(s3_store)
    before = objects(where)
    # a writer on another machine (a live one on this host: test_the_lock_object_is_made_...)
    where.write_text(LOCK_NAME, json.dumps({"host": "node-7", "pid": 12345, "since": "2026-01-01T00:00:00Z"}))
    r = tc(*TINY_CACHE, "--out", s3_store, "--overwrite")
    assert_one_line_error(r, "being written", "node-7", "cannot be checked", f"remove {s3_store}/{LOCK_NAME}")
    assert objects(where) == sorted(before + [f"{where.root}/{LOCK_NAME}"])   # nothing else touched
    where.remove(LOCK_NAME)
    assert objects(where) == before
    assert_same_store(s3_store, s3_store)   # still readable and whole
    assert Store(s3_store).verify(progress=False) == []


def test_a_dead_writers_lock_on_this_host_is_taken_over(s3):
    where = Location(f"s3://{BUCKET}/stale.zarr")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    where.write_text(LOCK_NAME, json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "x"}))
    lock = ObjectLock(where, LOCK_NAME)
    lock.acquire()
    assert json.loads(where.read_text(LOCK_NAME))["pid"] == os.getpid()
    lock.release()


# ----------------------------------------------------------------------------- damage

def test_a_damaged_object_is_caught_and_a_rerun_repairs_it(s3_store, local_store, tmp_path):
    url = f"s3://{BUCKET}/damaged.zarr"
    where = Location(url)
    where.fs.copy(Location(s3_store).root, where.root, recursive=True)   # a whole store of its own
    assert_same_store(url, local_store)
    target = key(url, "source", 3)
    size = len(where.fs.cat_file(target))
    where.fs.pipe_file(target, np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    where.fs.rm(key(url, "tokens", 5))
    assert sorted(Store(url).verify(progress=False)) == [("source", 3), ("tokens", 5)]
    assert_one_line_error(tc("info", url, "--verify"), "damaged", "chunk 3 of source", "chunk 5 of tokens")
    r = tc("train", "--cache", url, *TINY_TRAIN, "--out", str(tmp_path / "run"))
    assert_one_line_error(r, url, "chunk 5 of tokens", "tc cache")
    r = tc(*TINY_CACHE, "--out", url)   # the same command recomputes exactly what is damaged
    assert r.returncode == 0 and "recomputing 2 chunk(s)" in r.stdout, r.stdout[-2000:]
    assert_same_store(url, local_store)


# ----------------------------------------------------------------------------- bad input

def test_bad_object_store_input_is_one_line(s3, tmp_path, local_store):
    assert_one_line_error(tc(*TINY_CACHE, "--out", "s3://no-such-bucket-here/t.zarr"), "cannot write to",
                          "no-such-bucket-here")
    assert_one_line_error(tc("train", "--cache", f"s3://{BUCKET}/nothing.zarr", *TINY_TRAIN,
                             "--out", str(tmp_path / "r")), "does not exist")
    assert_one_line_error(tc("train", "--cache", str(local_store), *TINY_TRAIN, "--out", f"s3://{BUCKET}/run"),
                          "a run folder is a local path")
    assert_one_line_error(tc("info", f"s3://{BUCKET}/nothing.zarr"), "not a tc store")
    assert_one_line_error(tc(*TINY_CACHE, "--out", f"s3://{BUCKET}/x.zarr", TC_STORAGE_OPTIONS="{nope"),
                          "TC_STORAGE_OPTIONS is not JSON")
    assert not Location(f"s3://{BUCKET}/x.zarr").exists()


def test_a_missing_filesystem_package_names_the_pip_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_gcsfs(name, *args, **kw):
        if name.split(".")[0] == "gcsfs":
            raise ImportError("No module named 'gcsfs'")
        return real(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(UserError, match=r"gs:// stores need the gcsfs package: pip install 'tc\[gcs\]'"):
        Location("gs://bucket/l8.zarr")

"""Stage one under torchrun (gloo, CPU, one thread per rank): the stores several processes write
equal the one-process store bit for bit, whatever the number of processes that made, resumed or
repaired them; a killed rank, a second job and bad input each end in one line."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_cache import TINY_ARGS, assert_same_store, tiny_store   # noqa: F401 (a fixture)
from test_integrity import chunk_file, scramble
from pipeline.store import Store

REPO = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "cli", *args]


def job_env(**env: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}


def torchrun(nproc: int, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(nproc, args), capture_output=True, text=True, cwd=REPO,
                          env=job_env(**env), timeout=600)


def tc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=job_env(), timeout=600)


def tc_errors(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_from_tc(r: subprocess.CompletedProcess, *words: str) -> None:
    """One `error:` line for the whole job and no traceback through tc's code (torchrun's launcher
    adds its own report of which rank failed after it)."""
    assert r.returncode != 0
    errors = tc_errors(r)
    assert len(errors) == 1, r.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    assert "pipeline/" not in r.stderr and "cli.py" not in r.stderr, r.stderr[-3000:]


def committed(store: Path) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")["chunk_meta"][:, 0]


def test_two_ranks_write_the_one_process_store_and_repair_it(tiny_store, tmp_path):
    out = tmp_path / "two.zarr"
    r = torchrun(2, [*TINY_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tiny_store, out)
    # rank 0 speaks for the job: one estimate, one summary, one model-load line
    assert r.stdout.count("caching 3,008 tokens") == 1 and r.stdout.count("wrote 3,008 tokens") == 1, r.stdout
    assert r.stderr.count("cache: loading tiny") == 1
    # damage a chunk of each rank's and repair with two processes again
    scramble(chunk_file(out, "source", 3))
    chunk_file(out, "tokens", 4).unlink()
    untouched = chunk_file(out, "target", 0)
    before = untouched.stat().st_mtime_ns
    r = torchrun(2, [*TINY_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("recomputing 2 chunk(s)") == 1
    assert_same_store(tiny_store, out)
    assert untouched.stat().st_mtime_ns == before


def test_a_killed_rank_stops_the_job_in_one_line_and_any_world_size_resumes(tiny_store, tmp_path):
    out = tmp_path / "k.zarr"
    r = torchrun(2, [*TINY_ARGS, "--out", str(out)], TC_KILL_AT="chunk_committed:2", TC_KILL_RANK="1")
    assert_one_line_from_tc(r, "rank 0 of 2 stopped", "another process of this job ended", "re-run")
    assert "SIGKILL" in r.stderr   # torchrun's report names the rank that died
    assert not Store(out).complete
    done = committed(out)
    assert done[1] and done[3] and not done.all()   # rank 1's first two chunks survived it
    again = tmp_path / "k2.zarr"
    shutil.copytree(out, again)
    r = tc([*TINY_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tiny_store, out)
    r = torchrun(2, [*TINY_ARGS, "--out", str(again)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tiny_store, again)


def test_a_single_process_store_resumes_under_two_ranks(tiny_store, tmp_path):
    out = tmp_path / "p.zarr"
    killed = subprocess.run([sys.executable, "-m", "cli", *TINY_ARGS, "--out", str(out)], cwd=REPO,
                            env=job_env(TC_KILL_AT="chunk_committed:5"), capture_output=True)
    assert killed.returncode == -signal.SIGKILL and committed(out).sum() == 5
    r = torchrun(2, [*TINY_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tiny_store, out)


def long_text(path: Path, copies: int = 4) -> Path:
    """python-docs over and over: minutes of caching, so a job is still writing when the next one starts."""
    from pipeline import text

    docs = "\n\n".join(d for _, d in zip(range(200), text.iter_documents("python-docs")))
    path.write_text("\n\n".join([docs] * copies))
    return path


def job_processes(pid: int) -> list[int]:
    """torchrun and its workers: torchrun starts each worker in a session of its own, so signalling
    torchrun's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue   # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def signal_job(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.slow   # minutes here: three jobs on two shared cores
def test_a_second_job_on_the_same_store_is_refused(tmp_path):
    out = tmp_path / "w.zarr"
    args = [*TINY_ARGS, "--dataset", str(long_text(tmp_path / "long.txt")), "--tokens", "1M", "--out", str(out)]
    first = subprocess.Popen(torchrun_command(2, args), cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    pids = [first.pid]
    try:
        while not (out / "chunk_meta" / "c").exists():   # a first chunk is committed
            assert first.poll() is None
            time.sleep(0.1)
        pids = job_processes(first.pid)
        assert len(pids) == 3, pids   # torchrun and its two workers
        signal_job(pids, signal.SIGSTOP)   # alive and holding the store, but off the two cores
        r = torchrun(2, args)
        assert_one_line_from_tc(r, "another tc process")
        r = tc(args)   # nor may a plain run write into it
        assert r.returncode == 2 and "another tc process" in r.stderr
        assert first.poll() is None and not Store(out).complete   # the first job was not disturbed
    finally:
        signal_job(pids, signal.SIGKILL)
        first.wait()


def test_world_size_one_under_torchrun_is_a_plain_run(tiny_store, tmp_path):
    out = tmp_path / "one.zarr"
    r = torchrun(1, [*TINY_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_store(tiny_store, out)


def test_bad_input_under_torchrun_is_one_line(tmp_path):
    # --chunk-rows: rank 0's checks before the store; --layer: every rank's model check
    for bad, words in ((["--chunk-rows", "100"], "multiple of --seq-len"), (["--layer", "99"], "layer 99")):
        out = tmp_path / "bad.zarr"
        r = torchrun(2, [*TINY_ARGS, *bad, "--out", str(out)])
        assert_one_line_from_tc(r, words)
        assert r.returncode != 0 and not (out / "source").exists()

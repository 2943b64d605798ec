"""Run one command as a child process and measure it: wall seconds and peak resident memory.

Peak RSS comes from the kernel's rusage of the reaped child (os.wait4), the same number
`/usr/bin/time -v` prints as "Maximum resident set size"; it covers the child and any
descendants it waited for.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class BenchError(RuntimeError):
    """A measured command failed: the message names its log."""


@dataclass
class Measured:
    wall_s: float
    peak_rss_mib: float
    log: str

    def output(self) -> str:
        return Path(self.log).read_text(errors="replace")


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` with stdout+stderr to `log`; raise BenchError on a non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise BenchError(f"command failed with exit {code} (log: {log}):\n{' '.join(cmd)}\n{tail}")
    return Measured(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024, log=str(log))   # ru_maxrss is KiB


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

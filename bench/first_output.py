"""When a command's first output comes, and its longest silences (progress within 5 s of starting).

    python bench/first_output.py tc eval --run data/demo/run --tokens 4000

Runs the command, reads its stdout and stderr as they come, and prints the exit status, the total
seconds, when the first bytes came (and on which stream) and the three longest silences with the
output on each side of them (progress bars draw with carriage returns: shown as ' | ').
"""
from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time


def short(text: str) -> str:
    return text.replace("\r", " | ").replace("\n", " / ").strip()[:110]


def main() -> None:
    cmd = sys.argv[1:]
    if not cmd:
        raise SystemExit(__doc__)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    events: list[tuple[float, str, str]] = []        # (seconds, stream, text)
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            data = key.fileobj.read1(65536)
            if not data:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            events.append((time.perf_counter() - start, key.data, data.decode(errors="replace")))
    proc.wait()
    end = time.perf_counter() - start
    first = events[0] if events else (end, "-", "")
    print(f"rc {proc.returncode}  total {end:.1f}s  first output {first[0]:.1f}s [{first[1]}] {short(first[2])!r}")
    gaps, prev = [], (0.0, "start", "(process start)")
    for e in events + [(end, "end", "(exit)")]:
        gaps.append((e[0] - prev[0], prev, e))
        prev = e
    for gap, a, b in sorted(gaps, reverse=True)[:3]:
        print(f"  silent {gap:5.1f}s after {a[0]:.1f}s {short(a[2])[-70:]!r} -> {short(b[2])[:70]!r}")


if __name__ == "__main__":
    main()

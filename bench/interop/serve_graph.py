"""circuit-tracer's own graph viewer on graph files, on loopback only. Runs ONLY in the circuit-tracer venv.

    ~/.cache/tc-peers/venv-circuit-tracer/bin/python bench/interop/serve_graph.py --graph GRAPH_DIR \
        [--slug tc-graph-0] [--screenshot docs/img/x.png] [--port 8032]

GRAPH_DIR is what attribution_graph.py wrote (graph-metadata.json and one JSON per slug). The
frontend and request handler are circuit-tracer's (`circuit_tracer.frontend.local_server`); only the
socket is bound here, to 127.0.0.1 (its `serve` listens on every interface). With --screenshot the
page is opened in headless Chromium, a screenshot written, and the server stopped; without it the
server runs until Ctrl-C. Prints one JSON line: the URL, the scripts the page loads from other
hosts (which an offline machine cannot fetch), and the requests the server answered.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from circuit_tracer.frontend import local_server
from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler, ReusableTCPServer


def remote_scripts(frontend: Path) -> list[str]:
    """The <script src> of the viewer's page that point at other hosts."""
    page = (frontend / "index.html").read_text(encoding="utf-8")
    return re.findall(r"<script src=['\"](https?://[^'\"]+)", page)


def screenshot(url: str, shot: Path, wait_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--screenshot needs headless Chromium (Debian package `chromium`)")
    shot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
                        f"--virtual-time-budget={wait_ms}", "--window-size=1600,1000", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=180, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description="circuit-tracer's graph viewer on 127.0.0.1, optionally one screenshot.")
    p.add_argument("--graph", required=True, help="folder of graph files (attribution_graph.py --out)")
    p.add_argument("--slug", default=None, help="graph to open (default: the viewer's first)")
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--screenshot", default=None, help="write a PNG of the page, then stop")
    p.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets before the screenshot")
    a = p.parse_args()
    requests: list[str] = []
    handler_log = logging.Handler()
    handler_log.emit = lambda record: requests.append(record.getMessage())
    local_server.logger.addHandler(handler_log)
    local_server.logger.setLevel(logging.INFO)
    frontend = Path(str(DEFAULT_FRONTEND_DIR))
    handler = functools.partial(CircuitGraphHandler, frontend_dir=frontend, data_dir=str(Path(a.graph).resolve()))
    httpd = ReusableTCPServer(("127.0.0.1", a.port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{a.port}/index.html" + (f"?slug={a.slug}" if a.slug else "")
    try:
        if a.screenshot:
            screenshot(url, Path(a.screenshot), a.wait_ms)
        else:
            print(f"serving {url} (Ctrl-C stops)", flush=True)
            thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        httpd.server_close()
    answered = sorted({m.split("Received request for ")[1] for m in requests if "Received request for " in m})
    print(json.dumps({"url": url, "remote_scripts": remote_scripts(frontend), "requests": answered,
                      "screenshot": a.screenshot}))


if __name__ == "__main__":
    main()

"""circuit-tracer's own graph viewer on graph files, on loopback only. Runs ONLY in the circuit-tracer venv.

    ~/.cache/tc-peers/venv-circuit-tracer/bin/python bench/interop/serve_graph.py --graph GRAPH_DIR \
        [--slug tc-graph-0] [--clicked NODE_ID] [--screenshot docs/img/x.png] [--port 8032]

GRAPH_DIR is what attribution_graph.py wrote (graph-metadata.json and one JSON per slug). The
frontend and request handler are circuit-tracer's (`circuit_tracer.frontend.local_server`); only the
socket is bound here, to 127.0.0.1 (its `serve` listens on every interface). With --screenshot the
page is opened in headless Chromium, a screenshot written, and the server stopped; without it the
server runs until Ctrl-C. Prints one JSON line: the URL, the scripts the page still loads from other
hosts (none once offline), and the requests the server answered.

Offline: the page names scripts on transformer-circuits.pub and unpkg.com. index.html is rewritten as
it is served so that those URLs point at /_offline/NAME, answered from the npm packages that
bench/interop/viewer_libs.sh installs into --libs (see OFFLINE for which file stands in for which) and
from viewer_shim.js here. The hot-reload client (development only) and the .npy loader (only the
"addition" pages read .npy) are dropped. --online serves the page unchanged.
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
import urllib.parse
from pathlib import Path

from circuit_tracer.frontend import local_server
from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler, ReusableTCPServer

HERE = Path(__file__).resolve().parent
DEFAULT_LIBS = Path.home() / ".cache/tc-peers/viewer-libs"
# Remote script (by its last path part) -> the local files served in its place, in order: under
# LIBS/node_modules, or next to this script ("shim:"); an empty list drops the tag.
OFFLINE = {
    "hotserver-client-ws.js": [],
    "d3.js": ["d3/dist/d3.min.js"],
    "jetpack_2024-07-20.js": ["shim:viewer_shim.js", "d3-jetpack/build/d3-jetpack.cjs"],
    "npy_v0.js": [],
    "dagre.min.js": ["dagre/dist/dagre.min.js"],
    "pako.min.js": ["pako/dist/pako.min.js"],
}
SCRIPT_TAG = re.compile(r"<script src=['\"](https?://[^'\"]+)['\"]></script>")


def served_name(where: str) -> str:
    """The NAME in /_offline/NAME for an OFFLINE entry."""
    return where.removeprefix("shim:").rsplit("/", 1)[-1]


def offline_files(libs: Path) -> dict[str, Path]:
    """/_offline/NAME -> local file; exits with one line if viewer_libs.sh has not been run."""
    files = {}
    for where in (w for ws in OFFLINE.values() for w in ws):
        path = HERE / where[5:] if where.startswith("shim:") else libs / "node_modules" / where
        if not path.is_file():
            raise SystemExit(f"serve_graph: {path} missing; run bash bench/interop/viewer_libs.sh {libs}")
        files[served_name(where)] = path
    return files


def offline_page(page: str) -> str:
    """index.html with each remote script pointed at /_offline/NAME, or dropped."""
    def swap(m: re.Match) -> str:
        name = m.group(1).rsplit("/", 1)[1]
        if name not in OFFLINE:
            return m.group(0)  # unknown: left as is, and reported in remote_scripts
        return "".join(f"<script src='/_offline/{served_name(w)}'></script>" for w in OFFLINE[name])
    return SCRIPT_TAG.sub(swap, page)


class OfflineHandler(CircuitGraphHandler):
    """circuit-tracer's handler, with index.html rewritten and /_offline/ answered from local files."""

    def __init__(self, *args, files: dict[str, Path], **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)

    def _do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/", "/index.html") or path.startswith("/_offline/"):
            local_server.logger.info(f"Received request for {self.path}")  # as the parent logs its own
        if path in ("/", "/index.html"):
            page = offline_page((Path(self.directory) / "index.html").read_text(encoding="utf-8"))
            return self._send(page.encode("utf-8"), "text/html; charset=utf-8")
        if path.startswith("/_offline/"):
            local = self.files.get(path[len("/_offline/"):])
            if local is None:
                self.send_response(404)
                self.end_headers()
                return
            return self._send(local.read_bytes(), "text/javascript; charset=utf-8")
        super()._do_GET()

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def remote_scripts(frontend: Path, online: bool) -> list[str]:
    """The <script src> of the page as served that point at other hosts."""
    page = (frontend / "index.html").read_text(encoding="utf-8")
    if not online:
        page = offline_page(page)
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
    p.add_argument("--clicked", default=None, help="node_id to open clicked (its edges drawn), e.g. a logit's")
    p.add_argument("--port", type=int, default=8032)
    p.add_argument("--screenshot", default=None, help="write a PNG of the page, then stop")
    p.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets before the screenshot")
    p.add_argument("--libs", default=str(DEFAULT_LIBS), help="folder viewer_libs.sh installed into")
    p.add_argument("--online", action="store_true", help="serve the page unchanged (scripts from other hosts)")
    a = p.parse_args()
    requests: list[str] = []
    handler_log = logging.Handler()
    handler_log.emit = lambda record: requests.append(record.getMessage())
    local_server.logger.addHandler(handler_log)
    local_server.logger.setLevel(logging.INFO)
    frontend = Path(str(DEFAULT_FRONTEND_DIR))
    data_dir = str(Path(a.graph).resolve())
    if a.online:
        handler = functools.partial(CircuitGraphHandler, frontend_dir=frontend, data_dir=data_dir)
    else:
        handler = functools.partial(OfflineHandler, frontend_dir=frontend, data_dir=data_dir,
                                    files=offline_files(Path(a.libs).expanduser()))
    httpd = ReusableTCPServer(("127.0.0.1", a.port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    query = urllib.parse.urlencode({k: v for k, v in (("slug", a.slug), ("clickedId", a.clicked)) if v})
    url = f"http://127.0.0.1:{a.port}/index.html" + (f"?{query}" if query else "")
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
    print(json.dumps({"url": url, "remote_scripts": remote_scripts(frontend, a.online), "requests": answered,
                      "screenshot": a.screenshot}))


if __name__ == "__main__":
    main()

"""The peer tools' virtual environments, made once under ~/.cache/tc-peers (TC_PEERS_DIR overrides).

    python bench/interop/venvs.py [circuit-tracer] [saelens]

Each tool lives in its own venv and tc never imports it: circuit-tracer 0.5 needs nnsight 0.6.3 and
an older transformers than tc's, SAELens 6 its own transformer-lens. torch is installed first, so
pip keeps the local CPU wheel instead of pulling a CUDA build as a dependency.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PEERS = {
    "circuit-tracer": {"venv": "venv-circuit-tracer",
                       "pins": ["torch==2.13.0", "circuit-tracer==0.5.0 nnsight==0.6.3"],
                       "probe": "import circuit_tracer, importlib.metadata as m; "
                                "assert m.version('circuit-tracer') == '0.5.0'"},
    "saelens": {"venv": "venv-saelens", "pins": ["torch==2.13.0", "sae-lens==6.54.12"],
                "probe": "import sae_lens; assert sae_lens.__version__ == '6.54.12'"},
}


class VenvError(Exception):
    """The venv could not be made (pip failed, no network): one line naming the log."""


def peers_dir() -> Path:
    return Path(os.environ.get("TC_PEERS_DIR") or Path.home() / ".cache" / "tc-peers")


def works(python: Path, probe: str) -> bool:
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def ensure(name: str) -> Path:
    """The python of `name`'s venv, made with the pinned versions when missing or broken."""
    peer = PEERS[name]
    venv = peers_dir() / peer["venv"]
    python = venv / "bin" / "python"
    if works(python, peer["probe"]):
        return python
    log = peers_dir() / f"{peer['venv']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"making the {name} environment {venv} (log: {log})...", file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)]]
    steps += [[str(python), "-m", "pip", "install", "-q", *pin.split()] for pin in peer["pins"]]
    with open(log, "w") as f:
        for cmd in steps:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
            except OSError as e:
                code = str(e)
            if code != 0:
                raise VenvError(f"could not make the {name} environment: `{' '.join(cmd[-3:])}` failed ({code}); "
                                f"see {log}")
    if not works(python, peer["probe"]):
        raise VenvError(f"the {name} environment {venv} was made but does not import the tool; see {log}")
    return python


if __name__ == "__main__":
    for tool in sys.argv[1:] or list(PEERS):
        print(tool, ensure(tool))

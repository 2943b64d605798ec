"""Writes docs/cli.md from the config dataclasses, so the reference never drifts from the code.

    python docs/gen_cli.py          # rewrite docs/cli.md
    python docs/gen_cli.py --check  # exit 1 if docs/cli.md is out of date (the tests run this)
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cache, collect, demo, evaluate, export, interop, train  # noqa: E402

COMMANDS = [
    ("tc demo", demo.DemoConfig),
    ("tc cache", cache.CacheConfig),
    ("tc train", train.TrainConfig),
    ("tc samples collect", collect.CollectConfig),
    ("tc samples export", export.ExportConfig),
    ("tc eval", evaluate.EvalConfig),
    ("tc export circuit-tracer", interop.CircuitTracerConfig),
    ("tc export saelens", interop.SAELensConfig),
]
OUT = Path(__file__).parent / "cli.md"


def shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value is None or value == "":
        return ""
    return f"`{value}`"


def section(name: str, cfg_cls: type) -> list[str]:
    lines = [f"## `{name}`", "", "| option | default | what |", "|---|---|---|"]
    panel = None
    for f in dataclasses.fields(cfg_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.metadata.get("panel") != panel:
            panel = f.metadata.get("panel")
            lines.append(f"| **{panel}** | | |")
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"| `{flag}` | {shown(default)} | {f.metadata.get('help', '')} |")
    return lines + [""]


def render() -> str:
    lines = ["# CLI reference", "",
             "Generated from the config dataclasses by `python docs/gen_cli.py`; `tc COMMAND --help` shows the same.",
             "Counts accept `5M`, `200k` or `5000000`. Every command also takes `--config FILE.toml` whose keys are",
             "option names (dashes or underscores); options on the command line win over the file.", "",
             "Other commands: `tc info PATH [--verify]` (describe a store or a run folder; `--verify` checks every",
             "chunk, checkpoint and transcoder against its checksum) and",
             "`tc samples show RUN FEATURE [--n 10] [--context 20]` (one feature's samples in the terminal).", ""]
    for name, cfg_cls in COMMANDS:
        lines += section(name, cfg_cls)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")

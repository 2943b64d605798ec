"""Small helpers every stage shares: the user-error type, option metadata, counts, versions."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import platform
import re
import socket
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

TC_VERSION = "0.1.0"


class UserError(Exception):
    """Bad input or state the user can fix. The CLI prints the message as one line, exits 2."""


def opt(default: Any, help: str, panel: str | None = None, parse: Callable[[str], Any] | None = None,
        flag: str | None = None) -> Any:
    """A dataclass field that also describes its CLI option (help text, help panel, parser)."""
    meta = {"help": help, "panel": panel, "parse": parse, "flag": flag}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}


def parse_count(text: str | int) -> int:
    """'5M' -> 5_000_000, '200k' -> 200_000, '5000000' -> 5_000_000, '1.5M' -> 1_500_000."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", str(text).replace("_", ""))
        if not m:
            raise UserError(f"bad count {text!r}: write a whole number, optionally with k or M (e.g. 200k, 5M)")
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
        if value != int(value):
            raise UserError(f"bad count {text!r}: it is not a whole number")
        value = int(value)
    if value <= 0:
        raise UserError(f"bad count {text!r}: it must be positive")
    return value


def short_count(n: int) -> str:
    """100000 -> '100k', 5000000 -> '5M', 1234 -> '1234': the inverse of parse_count for round numbers."""
    for factor, suffix in ((10 ** 9, "B"), (10 ** 6, "M"), (10 ** 3, "k")):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def parse_int_list(text: str | list) -> list[int]:
    """'64,128,256' -> [64, 128, 256]; a list of whole numbers as it is."""
    if isinstance(text, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in text):
            raise UserError(f"bad list {text!r}: write whole numbers, e.g. [64, 128, 256]")
        return list(text)
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bad list {text!r}: write whole numbers separated by commas, e.g. 64,128,256") from None


def versions() -> dict[str, str]:
    """Versions of the software that made an artefact, recorded beside it."""
    out = {"tc": TC_VERSION, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "transformer-lens", "zarr", "numcodecs", "datasets", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def user_cache_dir() -> Path:
    """Where converted models and other reusable downloads live (TC_CACHE_DIR overrides)."""
    root = os.environ.get("TC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tc")
    return Path(root)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextlib.contextmanager
def replaced_atomically(path: str | Path, fsync: bool = False, shared: bool = False) -> Iterator[Path]:
    """A temporary path to write in full; on leaving the block it replaces `path`, so a kill at any
    moment leaves the old file or the new one. An error inside the block removes the temporary.

    Its name is fixed, so the next write after a kill reuses it and nothing piles up (a transcoder
    is hundreds of MB); `shared=True` (a file several processes may write at once, such as the
    corpus in the user cache) puts the pid in the name instead."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file_atomic(path: str | Path, data: str | bytes, fsync: bool = False, shared: bool = False) -> None:
    """Replace `path` with `data` (str as UTF-8), atomically (see replaced_atomically)."""
    with replaced_atomically(path, fsync, shared) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def file_checksum(path: str | Path) -> dict[str, int]:
    """CRC-32 and size of a file, read in blocks: what a checkpoint or a transcoder records of its files."""
    import zlib

    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"crc32": crc, "bytes": size}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a kill at any moment leaves either the old file or the new one."""
    write_file_atomic(path, json.dumps(to_jsonable(obj), indent=2), fsync=True)


def pick_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'. An unavailable 'cuda' is a user error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda")
    return name


def process_alive(host: str, pid: int | str) -> bool:
    """Whether a lock's holder may still be running: checked for this host's processes; another
    machine's cannot be checked from here, so it counts as alive."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, OverflowError):   # gone, or not a pid at all
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """One tc process writing a folder (a store, a run): a lock file in it holding host and pid,
    made with O_EXCL; a lock left by a dead process on this host is taken over."""

    def __init__(self, folder: Path, name: str):
        self.file = Path(folder) / name
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    raise UserError(f"{self.file.parent} is being written by another tc process "
                                    f"({self.file.read_text().strip()}): wait for it or stop it first")
                self.file.unlink(missing_ok=True)   # stale: its writer was killed
                continue
            os.close(fd)
            self.write()
            self.held = True
            return
        raise UserError(f"could not take the writer lock {self.file}: remove it if no tc process is writing")

    def write(self) -> None:
        self.file.write_text(f"{socket.gethostname()} {os.getpid()}")

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.file.read_text().split()
        except (OSError, ValueError):
            return False
        return process_alive(host, pid)

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def status(line: str) -> None:
    """A one-line status on stderr at the start of a slow step that has no progress bar (a model
    load): the user sees within seconds that something is happening."""
    import sys

    print(line, file=sys.stderr, flush=True)


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


DISK_MARGIN = 1.05   # estimates leave this much room for metadata and what they do not count


def check_free_space(path: str | Path, need: int, what: str, fix: str) -> None:
    """Refuse, in one line, work whose output the filesystem at `path` cannot hold."""
    free = free_bytes(path)
    if need * DISK_MARGIN > free:
        raise UserError(f"{what} needs about {human_bytes(need)} but its filesystem has {human_bytes(free)} free: "
                        f"{fix}")


_DISK_FULL_WORDS = ("no space left", "storagefull", "os error 28", "disk quota exceeded", "file write failed")


def is_disk_full(e: BaseException) -> bool:
    """An error that means the disk filled up: OSError ENOSPC/EDQUOT, or the message of a library
    (safetensors, torch.save) that wraps one without its errno."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(w in str(e).lower() for w in _DISK_FULL_WORDS)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: for short steps that
    run in library threads (zarr's resizes and metadata writes), where an interrupt in the middle
    prints their tracebacks. Only in the main thread; elsewhere the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _ResumeHint:
    """What a stage says an interrupted or failed run should do next ("tc train --resume runs/x"):
    set by the stage once it knows, read by the CLI's one-line message."""

    def __init__(self) -> None:
        self.text: str | Callable[[], str] | None = None

    def set(self, text: str | Callable[[], str]) -> None:
        """The words, or a function that gives them when asked (they may change as the run goes on)."""
        self.text = text

    def get(self) -> str | None:
        return self.text() if callable(self.text) else self.text

    def clear(self) -> None:
        self.text = None


resume_hint = _ResumeHint()

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Crash-test hook: with TC_KILL_AT="name:n", the n-th pass through `name` kills this process
    with SIGKILL, as `kill -9` would; with TC_INTERRUPT_AT="name:n" it sends SIGINT, as Ctrl-C would.
    Tests use them to stop a run at an exact point; unset, they are free."""
    for env, sig in (("TC_KILL_AT", signal.SIGKILL), ("TC_INTERRUPT_AT", signal.SIGINT)):
        spec = os.environ.get(env)
        if not spec or not spec.startswith(name + ":"):
            continue
        key = f"{env}:{name}"
        _fault_counts[key] = _fault_counts.get(key, 0) + 1
        if _fault_counts[key] == int(spec.rsplit(":", 1)[1]):
            os.kill(os.getpid(), sig)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))   # a JSON string is a valid TOML basic string


def write_config_toml(path: str | Path, cfg: Any) -> Path:
    """The resolved config as TOML with option names as keys, so `--config` repeats the command."""
    write_file_atomic(path, config_toml(cfg, Path(path).name))
    return Path(path)


def config_toml(cfg: Any, name: str) -> str:
    """write_config_toml's text, for a file called `name`. None values are left out (None is each
    option's 'not given')."""
    lines = [f"# written by tc {TC_VERSION}; repeat with: tc <command> --config {name}"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None:
            lines.append(f"{f.name.replace('_', '-')} = {toml_value(value)}")
    return "\n".join(lines) + "\n"

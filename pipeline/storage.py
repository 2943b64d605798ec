"""Where a store lives: a local folder, or a prefix on an object store reached through fsspec
(`s3://bucket/l8.zarr`, `gs://...`; docs/object-storage.md).

A local path (or a `file://` URL) stays a plain folder that zarr opens as its LocalStore, so the
store's direct chunk-file writes (store.chunk_folder) keep working there. Any other URL is an
fsspec filesystem; zarr reads and writes it through its FsspecStore, and tc's few own files (the
writer lock, the config record) are single objects put whole. A PUT replaces an object at once,
so a reader sees the old object or the new one, as with a local rename.

Endpoint and credentials come from the filesystem's own settings (for S3: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_PROFILE, ...); TC_STORAGE_OPTIONS (a JSON object) is passed to fsspec for
anything else (for example {"anon": true} or {"client_kwargs": {"region_name": "eu-west-1"}}).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.util import UserError, process_alive, write_file_atomic

# The fsspec package each protocol needs, and the tc extra that installs it.
PACKAGES = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
# zarr's async.concurrency for object stores: how many requests one read or write keeps in flight.
# A whole-row read (tokens, flags: every chunk's object) is one request per chunk, each waiting tens
# of ms on S3, so zarr's default of 10 would leave the link idle. Not measured against real S3 here
# (docs/object-storage.md); ZARR_ASYNC__CONCURRENCY overrides it.
CONCURRENCY = 64
OPTIONS_VAR = "TC_STORAGE_OPTIONS"


def is_remote(path: str | Path) -> bool:
    """A URL other than file://: a store on an object store."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | Path) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def resolved(path: str | Path) -> str:
    """The name to record for a store: an absolute path, or the URL as given (without a trailing /)."""
    return str(path).rstrip("/") if is_remote(path) else str(local_path(path).resolve())


def storage_options() -> dict[str, Any]:
    text = os.environ.get(OPTIONS_VAR, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        raise UserError(f"{OPTIONS_VAR} is not JSON ({e}): set it to a JSON object of fsspec options, "
                        'e.g. {"anon": true}') from None
    if not isinstance(options, dict):
        raise UserError(f"{OPTIONS_VAR} must be a JSON object of fsspec options, not {text[:60]}")
    return options


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a missing package is one line naming the pip command."""
    import fsspec

    protocol = url.split("://", 1)[0]
    package, extra = PACKAGES.get(protocol, (None, None))
    try:
        return fsspec.url_to_fs(url, **storage_options())
    except ImportError:
        if package is None:
            raise UserError(f"{url}: fsspec has no installed filesystem for {protocol}://: install the "
                            "package fsspec names for it") from None
        raise UserError(f"{url}: {protocol}:// stores need the {package} package: pip install 'tc[{extra}]' "
                        f"(or pip install {package})") from None
    except ValueError as e:
        raise UserError(f"{url}: {e}: use s3://, gs://, file:// or a local path") from None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:200]


class Location:
    """A store's place: `remote` false for a local folder (`root` a Path), true for an object-store
    prefix (`fs` an fsspec filesystem, `root` the path inside it)."""

    def __init__(self, path: str | Path):
        self.remote = is_remote(path)
        if self.remote:
            self.url = str(path).rstrip("/")
            self.fs, self.root = filesystem(self.url)
        else:
            self.root = local_path(path)
            self.url, self.fs = str(self.root), None

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _fresh(self) -> Any:
        # zarr writes through its own (async) filesystem instance, whose writes this one's
        # listing cache does not see: every question starts from the store itself
        self.fs.invalidate_cache()
        return self.fs

    def exists(self, name: str = "") -> bool:
        """Whether `name` (a file, or with "" the store itself: any object under the prefix) is there."""
        if not self.remote:
            return (self.root / name).exists()
        return bool(self._fresh().exists(self._key(name)))

    def is_file(self, name: str = "") -> bool:
        if not self.remote:
            return (self.root / name).is_file()
        return bool(self._fresh().isfile(self._key(name)))

    def names(self) -> list[str]:
        """The entries directly inside (files and folders), [] when there is nothing."""
        if not self.remote:
            return [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fresh().ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def read_text(self, name: str) -> str:
        if not self.remote:
            return (self.root / name).read_text()
        return self.fs.cat_file(self._key(name)).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        """Replace `name` in one step: a local rename, or one PUT (the old object or the new one)."""
        if not self.remote:
            write_file_atomic(self.root / name, text, fsync=True)
        else:
            self.fs.pipe_file(self._key(name), text.encode("utf-8"))

    def create(self, name: str, text: str) -> bool:
        """Write `name` only if it does not exist (False if it does), in one request: fsspec's
        exclusive create, which s3fs sends as a conditional PUT (If-None-Match: *)."""
        try:
            self.fs.pipe_file(self._key(name), text.encode("utf-8"), mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError) as e:   # an fsspec or backend from before exclusive create
            raise UserError(f"{self.url}: this filesystem cannot create an object only if it is absent "
                            f"({_one_line(e)}), which tc's writer lock needs: upgrade fsspec and its backend "
                            "(pip install 'tc[s3]' or 'tc[gcs]')") from None
        return True

    def remove(self, name: str) -> None:
        if not self.remote:
            p = self.root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return
        try:
            self.fs.rm(self._key(name), recursive=True)
        except FileNotFoundError:
            pass

    def remove_all(self, keep: tuple[str, ...] = ()) -> None:
        """Everything inside, but the entries named in `keep`; the folder itself too when keep is empty."""
        if not keep:
            if self.remote:
                self.remove("")
            else:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        for name in self.names():
            if name not in keep:
                self.remove(name)

    def size(self) -> int:
        """Bytes stored under it."""
        if not self.remote:
            return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return int(self._fresh().du(self.root, total=True))

    def zarr_store(self, read_only: bool = False) -> Any:
        """What zarr.open_group takes: the local path (zarr's LocalStore), or an FsspecStore."""
        if not self.remote:
            return str(self.root)
        import zarr
        from zarr.storage import FsspecStore

        if "ZARR_ASYNC__CONCURRENCY" not in os.environ:   # a user's own setting wins
            zarr.config.set({"async.concurrency": max(CONCURRENCY, zarr.config.get("async.concurrency"))})
        return FsspecStore.from_url(self.url, storage_options=storage_options(), read_only=read_only)

    def check_writable(self) -> None:
        """One small object written and removed: a missing bucket, bad credentials or an unreachable
        endpoint fail here in one line, before minutes of model loading."""
        probe = f".tc-write-test-{time.time_ns()}"
        try:
            self.fs.pipe_file(self._key(probe), b"")
            self.fs.rm(self._key(probe))
        except Exception as e:
            raise UserError(f"cannot write to {self.url} ({_one_line(e)}): check the bucket, the credentials "
                            "and the endpoint (docs/object-storage.md), or choose another --out") from None


class ObjectLock:
    """util.FolderLock on an object store: the lock is an object made with an exclusive create (a
    conditional PUT), holding the writer's host, pid and start time. A lock left by a dead process
    on this host is taken over; one from another host cannot be checked from here, so it is refused
    with what it says and how to remove it (docs/object-storage.md)."""

    def __init__(self, location: Location, name: str):
        self.location, self.name = location, name
        self.file = f"{location.url}/{name}"
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            if self.location.create(self.name, self._holder_text()):
                self.held = True
                return
            holder = self._holder()
            if holder is not None and process_alive(holder.get("host", ""), holder.get("pid", -1)):
                raise UserError(f"{self.location} is being written by another tc process (host {holder['host']}, "
                                f"pid {holder['pid']}, since {holder.get('since', '?')}): wait for it or stop it; "
                                f"if it is gone (another machine's writer cannot be checked from here), remove "
                                f"{self.file} and run again")
            self.location.remove(self.name)   # stale: its writer on this host was killed (or the lock is garbled)
        raise UserError(f"could not take the writer lock {self.file}: remove it if no tc process is writing")

    def _holder_text(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.location.read_text(self.name))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def write(self) -> None:
        self.location.write_text(self.name, self._holder_text())

    def release(self) -> None:
        if self.held:
            self.location.remove(self.name)
            self.held = False

    def __enter__(self) -> "ObjectLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

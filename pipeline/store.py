"""The on-disk activation store: a Zarr v3 group of row-aligned arrays (format in docs/store.md).

Rows are tokens. Row r belongs to sequence r // seq_len at position r % seq_len, and to chunk
r // chunk_rows. Every chunk is written whole and then committed by writing its row of
`chunk_meta` last, so a crash leaves at most an uncommitted chunk that a resume rewrites.
Chunks are independent, so several writers may each own a disjoint set of chunks (tc cache under
torchrun: docs/distributed.md).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.storage import Location, ObjectLock
from pipeline.util import FolderLock, UserError, fault_point, versions

SCHEMA = "tc-store"
SCHEMA_VERSION = 1
FLAG_BOS = 1        # row is a BOS token: excluded from statistics, training and samples by default
FLAG_OVERFLOW = 2   # a value exceeded the fp16 range and was clamped to +-65504
FLAG_OUTLIER = 4    # source norm far beyond its chunk's typical row (outlier_mask): excluded by default
OUTLIER_FACTOR = 2.5   # measured: bench/outliers.py, docs/store.md ("Outlier rows")
OUTLIER_RULE = "source_norm_over_chunk_median"
FP16_MAX = 65504.0
DEFAULT_CHUNK_ROWS = 4096   # measured fastest for random whole-chunk reads (design brief)
CHUNKED_ARRAYS = ("source", "target", "tokens", "flags", "chunk_stats", "chunk_norms", "chunk_crc", "chunk_meta")
META_COLUMNS = ["committed", "rows", "stat_rows", "overflow_source", "overflow_target", "overflow_rows"]
# One CRC-32 per chunk of each of these arrays (in this order), in `chunk_crc`, written just before
# the commit; the whole-store arrays written at finalize get one each, in the `array_crc` attribute.
CRC_ARRAYS = ("source", "target", "tokens", "flags", "chunk_stats", "chunk_norms", "chunk_meta")
CHECKSUM = "crc32 of each chunk's values, little-endian, rows written only"
LOCK_NAME = ".tc-writer.lock"


def skip_flags(include_bos: bool = False, include_outliers: bool = False) -> int:
    """The flags of rows every stage leaves out: clamped rows always, BOS and outlier rows unless asked for."""
    return FLAG_OVERFLOW | (0 if include_bos else FLAG_BOS) | (0 if include_outliers else FLAG_OUTLIER)


def usable_mask(flags: np.ndarray, include_bos: bool = False, include_outliers: bool = False) -> np.ndarray:
    """Which rows statistics, training, samples and eval use: the one definition of "usable".
    Statistics always leave BOS and outlier rows out; the options are for the stages."""
    return (flags & skip_flags(include_bos, include_outliers)) == 0


def outlier_mask(source16: np.ndarray, flags: np.ndarray, factor: float = OUTLIER_FACTOR) -> np.ndarray:
    """(n,) bool: the rows of one chunk (not BOS, not clamped) whose source L2 norm is above `factor`
    times the median norm of those rows. Per chunk, so a writer needs no other chunk, and a reader can
    apply it to a store made before the rule and get the bits a writer would have written.
    factor <= 0 flags nothing."""
    candidates = (flags & (FLAG_BOS | FLAG_OVERFLOW)) == 0
    if factor <= 0 or not candidates.any():
        return np.zeros(len(flags), dtype=bool)
    x = source16.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    return candidates & (norms > factor * np.median(norms[candidates]))


def chunk_rows_for(seq_len: int, target: int = DEFAULT_CHUNK_ROWS) -> int:
    """Whole sequences per chunk, about `target` rows: a chunk never splits a sequence."""
    return max(1, round(target / seq_len)) * seq_len


def crc32(values: np.ndarray) -> int:
    """The checksum of an array's values: CRC-32 of their little-endian bytes (zlib: about 4 GB/s)."""
    a = np.ascontiguousarray(values)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return zlib.crc32(a.data)


class DamagedStore(UserError):
    """A chunk or array whose bytes no longer match the checksum written with them."""


@dataclass
class Rows:
    """A contiguous block of store rows, starting at row `start`."""
    start: int
    source: np.ndarray   # (n, d_model) float16
    target: np.ndarray   # (n, d_model) float16
    tokens: np.ndarray   # (n,) int32
    flags: np.ndarray    # (n,) uint8


def is_store(path: str | Path) -> bool:
    """A local path or an object-store URL (storage.Location) that holds a tc store."""
    where = Location(path)
    return where.exists("zarr.json") and where.exists("chunk_meta/zarr.json")


def creation_interrupted(path: str | Path) -> bool:
    """A tc store stopped while its empty arrays were being made: it holds no data and may be
    made again. (`chunk_meta`, the last array made, is what `is_store` looks for.)"""
    where = Location(path)
    if is_store(path) or not where.exists("zarr.json"):
        return False
    try:
        attrs = json.loads(where.read_text("zarr.json")).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("schema") == SCHEMA


# ----------------------------------------------------------------------------- writing

class WriterLock(FolderLock):
    """One writer per store (see util.FolderLock)."""

    def __init__(self, path: Path):
        super().__init__(Path(path), LOCK_NAME)


def writer_lock(path: str | Path) -> WriterLock | ObjectLock:
    """The store's writer lock: a lock file in a local folder, a lock object on an object store."""
    where = Location(path)
    return ObjectLock(where, LOCK_NAME) if where.remote else WriterLock(where.root)


class StoreWriter:
    """Creates or reopens a store and writes whole chunks into it."""

    def __init__(self, path: str | Path, group: zarr.Group, lock: WriterLock | ObjectLock):
        self.path = Location(path)
        self.group = group
        self.lock = lock
        self.chunk_rows = int(group.attrs["chunk_rows"])
        self.n_rows_planned = int(group.attrs["n_rows_planned"])
        self.n_chunks = int(group["chunk_meta"].shape[0])
        # a store begun before the outlier rule stays without it, so all its chunks agree
        self.outlier_factor = float(group.attrs.get("outlier_rule", {}).get("factor", 0.0))
        # a store begun before checksums has no chunk_crc: it stays without, like the outlier rule
        self.arrays = {name: group[name] for name in CHUNKED_ARRAYS if name in group}
        self.checksums = "chunk_crc" in self.arrays
        self.folders = {name: chunk_folder(a) for name, a in self.arrays.items()}

    @classmethod
    def create(cls, path: str | Path, *, n_rows: int, d_model: int, chunk_rows: int,
               attrs: dict[str, Any], vocab: list[str] | None = None, compress: bool = False,
               outlier_factor: float = OUTLIER_FACTOR) -> "StoreWriter":
        """A new, empty store planned for `n_rows` rows. The caller has checked it may write here."""
        where = Location(path)
        if not where.remote:
            where.root.mkdir(parents=True, exist_ok=True)
        lock = writer_lock(path)
        lock.acquire()
        try:
            # all attributes in the group's first zarr.json, before any array: a store cut short
            # here is recognisable as tc's and empty (see creation_interrupted)
            group = zarr.open_group(where.zarr_store(), mode="w", attributes={   # clears the folder, the lock too
                **attrs, "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "versions": versions(),
                "d_model": d_model, "chunk_rows": chunk_rows, "n_rows_planned": n_rows, "n_rows": 0,
                "complete": False, "flags": {"bos": FLAG_BOS, "overflow": FLAG_OVERFLOW, "outlier": FLAG_OUTLIER},
                "outlier_rule": {"rule": OUTLIER_RULE, "factor": float(outlier_factor)},
                "checksum": {"rule": CHECKSUM, "arrays": list(CRC_ARRAYS)}})
            lock.write()
            n_chunks = -(-n_rows // chunk_rows)
            # fp16 activations barely compress (zstd 1.08x) and reads get 2-4x slower: raw by default
            compressors = "auto" if compress else None
            for name in ("source", "target"):
                group.create_array(name, shape=(n_rows, d_model), chunks=(chunk_rows, d_model),
                                   dtype="float16", compressors=compressors, fill_value=0)
            # the small arrays are a few bytes per row next to kilobytes of activations: raw too
            group.create_array("tokens", shape=(n_rows,), chunks=(chunk_rows,), dtype="int32", fill_value=0,
                               compressors=None)
            group.create_array("flags", shape=(n_rows,), chunks=(chunk_rows,), dtype="uint8", fill_value=0,
                               compressors=None)
            group.create_array("chunk_stats", shape=(n_chunks, 4, d_model), chunks=(1, 4, d_model),
                               dtype="float64", fill_value=0, compressors=None)
            group.create_array("chunk_norms", shape=(n_chunks, 2), chunks=(1, 2), dtype="float64", fill_value=0,
                               compressors=None)
            group.create_array("chunk_crc", shape=(n_chunks, len(CRC_ARRAYS)), chunks=(1, len(CRC_ARRAYS)),
                               dtype="uint32", fill_value=0, compressors=None)
            if vocab is not None:
                write_vocab(group, vocab)
            # last: its presence is what makes the folder a store (is_store)
            group.create_array("chunk_meta", shape=(n_chunks, len(META_COLUMNS)), chunks=(1, len(META_COLUMNS)),
                               dtype="int64", fill_value=0, compressors=None)
        except BaseException:
            lock.release()
            raise
        return cls(path, group, lock)

    @classmethod
    def reopen(cls, path: str | Path) -> "StoreWriter":
        """An existing, unfinished store, to continue writing its uncommitted chunks."""
        lock = writer_lock(path)
        lock.acquire()
        return cls(path, zarr.open_group(Location(path).zarr_store(), mode="r+"), lock)

    @classmethod
    def attach(cls, path: str | Path) -> "StoreWriter":
        """A store whose lock another process of the same job holds (rank 0 under torchrun), to write
        the chunks this process owns; its own lock is never taken, so closing it releases nothing."""
        return cls(path, zarr.open_group(Location(path).zarr_store(), mode="r+"), writer_lock(path))

    def pending_chunks(self) -> list[int]:
        committed = self.group["chunk_meta"][:, 0]
        return [int(c) for c in np.flatnonzero(committed == 0)]

    def write_chunk(self, c: int, source: Any, target: Any, tokens: np.ndarray, bos_mask: np.ndarray,
                    clamped: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Write chunk c (all its rows at once) and commit it.

        `source` and `target` are activations in any float dtype, cast here by `to_fp16`; or fp16
        arrays that `to_fp16` already made, with its clamped-row masks in `clamped`.
        """
        n = len(tokens)
        if clamped is None:
            (src16, src_over), (tgt16, tgt_over) = to_fp16(source), to_fp16(target)
        else:
            (src16, tgt16), (src_over, tgt_over) = (source, target), clamped
        flags = np.where(bos_mask, FLAG_BOS, 0).astype(np.uint8)
        flags |= np.where(src_over | tgt_over, FLAG_OVERFLOW, 0).astype(np.uint8)
        flags |= np.where(outlier_mask(src16, flags, self.outlier_factor), FLAG_OUTLIER, 0).astype(np.uint8)
        keep = usable_mask(flags)
        # statistics of what is stored (the fp16 values), so a reader can recompute them exactly
        src_sum, src_sq, src_norm = chunk_sums(src16[keep])
        tgt_sum, tgt_sq, tgt_norm = chunk_sums(tgt16[keep])
        meta = [1, n, int(keep.sum()), int(src_over.sum()), int(tgt_over.sum()), int((src_over | tgt_over).sum())]
        values = {"source": src16, "target": tgt16, "tokens": tokens.astype(np.int32), "flags": flags,
                  "chunk_stats": np.stack([src_sum, src_sq, tgt_sum, tgt_sq])[None],
                  "chunk_norms": np.array([[src_norm, tgt_norm]]), "chunk_meta": np.array([meta], dtype=np.int64)}
        for name in CRC_ARRAYS[:-1]:
            self._put(name, c, values[name])
        if self.checksums:   # checksums of everything, the commit row's too, just before the commit
            self._put("chunk_crc", c, np.array([[crc32(values[k]) for k in CRC_ARRAYS]], dtype=np.uint32))
        fault_point("chunk_before_commit")
        self._put("chunk_meta", c, values["chunk_meta"])   # the commit: written last
        fault_point("chunk_committed")

    def uncommit(self, chunks: list[int]) -> None:
        """Mark chunks to be written again (damaged ones): the store is unfinished until they are."""
        if self.group.attrs.get("complete"):
            self.group.update_attributes({"complete": False})
        for c in chunks:
            self._put("chunk_meta", c, np.zeros((1, len(META_COLUMNS)), dtype=np.int64))

    def _put(self, name: str, c: int, value: np.ndarray) -> None:
        """`value` (at most one chunk of rows) as chunk c of array `name`."""
        arr, folder = self.arrays[name], self.folders[name]
        rows = arr.chunks[0]
        if folder is None:
            arr[c * rows:c * rows + len(value)] = value
            return
        # what zarr itself would write: the whole chunk, padded with the fill value (0), little-endian;
        # and like zarr, no file for a chunk that is all fill value
        path = folder / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
        if value.flat[0] == 0 and not value.any():   # the first value settles it for almost every chunk
            path.unlink(missing_ok=True)
            return
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        if len(value) == rows and value.dtype == dtype and value.flags.c_contiguous:
            chunk = value   # already the chunk's bytes: no copy
        else:
            chunk = np.zeros(arr.chunks, dtype=dtype)
            chunk[:len(value)] = value
        write_chunk_file(path, chunk.data)

    def finalize(self, n_rows: int, vocab: list[str] | None = None) -> dict[str, Any]:
        """Shrink to the rows written (text may run out early), aggregate statistics, write the
        vocabulary if given, mark complete."""
        g = self.group
        whole: dict[str, np.ndarray] = {}
        if vocab is not None:
            whole.update(write_vocab(g, vocab))
        n_chunks = -(-n_rows // self.chunk_rows)
        meta = g["chunk_meta"][:n_chunks]
        if n_chunks and not meta[:, 0].all():
            missing = np.flatnonzero(meta[:, 0] == 0).tolist()
            raise RuntimeError(f"cannot finalize: chunks {missing[:5]} are not committed")
        # each array on its own: a run killed part-way through the resizes finishes them on resume
        for name in self.arrays:
            length = n_chunks if name.startswith("chunk_") else n_rows
            if g[name].shape[0] != length:
                g[name].resize((length, *g[name].shape[1:]))
        stats = aggregate_stats(g["chunk_stats"][:], g["chunk_norms"][:], meta)
        sg = g.require_group("stats")
        for side in ("source", "target"):
            for key in ("mean", "var"):
                arr = stats[side].pop(key)
                sg.create_array(f"{side}_{key}", shape=arr.shape, dtype="float64", overwrite=True)[:] = arr
                whole[f"stats/{side}_{key}"] = arr
        overflow = {"source": int(meta[:, 3].sum()), "target": int(meta[:, 4].sum()), "rows": int(meta[:, 5].sum())}
        flags = g["flags"][:n_rows]
        summary = {"n_rows": n_rows, "complete": True, "stats": stats, "overflow": overflow,
                   "n_bos_rows": int(np.count_nonzero(flags & FLAG_BOS))}
        if "outlier_rule" in g.attrs:
            summary["n_outlier_rows"] = int(np.count_nonzero(flags & FLAG_OUTLIER))
        if self.checksums:
            if "vocab" in g and "vocab/offsets" not in whole:   # written at creation: read it back
                whole.update({k: g[k][:] for k in ("vocab/offsets", "vocab/bytes")})
            summary["array_crc"] = {k: crc32(v) for k, v in whole.items()}
        fault_point("finalize_before_mark")
        # one write of zarr.json: `attrs.update` would write it once per key, and a kill between
        # "complete" and the keys after it left a store that claimed to be complete without them
        g.update_attributes(summary)
        return summary

    def close(self) -> None:
        self.lock.release()


def chunk_folder(arr: zarr.Array) -> Path | None:
    """The folder of a local, uncompressed array whose chunks tc writes as plain files, else None.

    Such a chunk file is the raw little-endian bytes of the whole chunk (zarr's `bytes` codec; a
    test checks tc's files equal zarr's). Writing it directly takes 0.1 ms where zarr's async
    machinery takes about 2 ms per array; any other store or codec goes through zarr.
    """
    from zarr.codecs import BytesCodec
    from zarr.codecs.bytes import Endian
    from zarr.storage import LocalStore

    # endian None: one-byte values, which have no byte order
    little = isinstance(arr.serializer, BytesCodec) and arr.serializer.endian in (None, Endian.little)
    plain = isinstance(arr.store, LocalStore) and not arr.compressors and not arr.filters and little
    return Path(arr.store.root) / arr.path if plain else None


def write_chunk_file(path: Path, data: Any) -> None:
    """Replace `path` with `data` in one step, so a crash leaves the old file or the new one: what
    util.write_file_atomic does, with the same fixed temporary name (a resume overwrites what a
    killed writer left), trimmed for the per-chunk hot path: the folder is made on its first file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    with f:
        f.write(data)
    os.replace(tmp, path)


def chunk_sums(x16: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-dimension sum and sum of squares, and the sum of row L2 norms, of (n, d) fp16 rows.
    In float64, where fp16 values and their squares are exact."""
    x = x16.astype(np.float64)
    sq = x * x
    return x.sum(0), sq.sum(0), float(np.sqrt(sq.sum(1)).sum())


def to_fp16(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Activations (a torch tensor on any device, or an array; (..., d)) as (rows, d) fp16 numpy,
    clamped to +-65504, and a per-row 'was clamped' mask. NaN or inf raise a UserError (a dtype problem).

    torch casts about 10x faster than numpy, and on a GPU the cast halves what crosses the bus.
    """
    t = torch.as_tensor(x)
    t = t.reshape(-1, t.shape[-1])
    lo, hi = (v.item() for v in torch.aminmax(t)) if t.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError("the model produced NaN or inf activations: check the model's dtype (try --dtype float32)")
    if max(hi, -lo) <= FP16_MAX:   # the usual case: one cheap pass
        return t.half().cpu().numpy(), np.zeros(len(t), dtype=bool)
    row_over = (t.abs() > FP16_MAX).any(dim=1)
    return t.clamp(-FP16_MAX, FP16_MAX).half().cpu().numpy(), row_over.cpu().numpy()


def aggregate_stats(chunk_stats: np.ndarray, chunk_norms: np.ndarray, meta: np.ndarray) -> dict[str, Any]:
    """Mean, variance, mean norm and mean squared norm over the unflagged rows of all chunks."""
    count = max(int(meta[:, 2].sum()), 1)
    out = {}
    for i, side in enumerate(("source", "target")):
        s, sq = chunk_stats[:, 2 * i].sum(0), chunk_stats[:, 2 * i + 1].sum(0)
        mean = s / count
        out[side] = {"count": count, "mean": mean, "var": np.maximum(sq / count - mean ** 2, 0.0),
                     "mean_norm": float(chunk_norms[:, i].sum() / count),
                     "mean_sq_norm": float(sq.sum() / count)}
    return out


def write_vocab(group: zarr.Group, vocab: list[str]) -> dict[str, np.ndarray]:
    """Token strings as UTF-8 bytes plus offsets, so samples decode without the tokenizer.
    Returns the arrays written, by name."""
    encoded = [t.encode("utf-8", "replace") for t in vocab]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    vg = group.require_group("vocab")
    vg.create_array("offsets", shape=offsets.shape, dtype="int64", overwrite=True)[:] = offsets
    padded = np.zeros(max(len(blob), 1), dtype=np.uint8)
    padded[:len(blob)] = blob
    vg.create_array("bytes", shape=padded.shape, dtype="uint8", overwrite=True)[:] = padded
    return {"vocab/offsets": offsets, "vocab/bytes": padded}


# ----------------------------------------------------------------------------- reading

def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:200]


def open_group_checked(path: str) -> zarr.Group:
    try:
        return zarr.open_group(Location(path).zarr_store(read_only=True), mode="r")
    except Exception as e:   # a truncated or garbled zarr.json
        raise UserError(f"{path} is damaged: its zarr.json cannot be read ({_one_line(e)}): re-create the "
                        "store (`tc cache ... --overwrite`)") from None


def _whole_number(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_attrs(path: str, attrs: dict[str, Any]) -> None:
    """The attributes every stage relies on, with the types and ranges they must have."""
    need = {"d_model": 1, "seq_len": 2, "chunk_rows": 1, "n_rows_planned": 0}
    if attrs.get("complete"):
        need["n_rows"] = 1
    for key, low in need.items():
        if not _whole_number(attrs.get(key), low):
            raise UserError(f"{path} is damaged: its attribute {key} is {attrs.get(key)!r}, not a whole number of "
                            f"at least {low}: re-create the store (`tc cache ... --overwrite`)")
    if attrs["chunk_rows"] % attrs["seq_len"]:
        raise UserError(f"{path} is damaged: chunk_rows {attrs['chunk_rows']} is not a multiple of seq_len "
                        f"{attrs['seq_len']}: re-create the store (`tc cache ... --overwrite`)")
    hooks = attrs.get("hooks")
    if not (isinstance(hooks, dict) and all(isinstance(hooks.get(k), str) for k in ("source", "target"))):
        raise UserError(f"{path} is damaged: its attribute hooks is {hooks!r}, not the source and target hook "
                        "names: re-create the store (`tc cache ... --overwrite`)")


class Store:
    """Read access to a store. Everything another stage needs goes through here.

    Opening checks the layout (attributes, arrays, shapes) and says in one line what is wrong;
    every chunk read is checked against the checksum written with it (DamagedStore if not)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._arrays: dict[str, zarr.Array] = {}
        if not is_store(path):
            raise UserError(f"{path} is not a tc activation store: make one with `tc cache --out {path}`")
        self.group = open_group_checked(self.path)
        self.attrs: dict[str, Any] = self.group.attrs.asdict()
        if self.attrs.get("schema") != SCHEMA or self.attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path} has store schema {self.attrs.get('schema')}/{self.attrs.get('schema_version')}, "
                            f"this tc reads {SCHEMA}/{SCHEMA_VERSION}: re-run `tc cache`")
        check_attrs(self.path, self.attrs)
        self.d_model = int(self.attrs["d_model"])
        self.seq_len = int(self.attrs["seq_len"])
        self.chunk_rows = int(self.attrs["chunk_rows"])
        self.complete = bool(self.attrs.get("complete"))
        self.source = self._array("source")
        self.target = self._array("target")
        self.n_rows = int(self.attrs["n_rows"]) if self.complete else int(self.source.shape[0])
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        self._check_arrays()
        self.has_checksums = "chunk_crc" in self.group
        self._crc: np.ndarray | None = None
        self._tokens: np.ndarray | None = None
        self._flags: np.ndarray | None = None
        self._stats: dict[str, dict[str, Any]] | None = None
        # stores made before the outlier rule get its bits at read time (one pass over source)
        self.outliers_at_read = self.complete and "outlier_rule" not in self.attrs

    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except Exception as e:   # missing, or its zarr.json is damaged
            raise UserError(f"{self.path} is damaged: its array {name!r} is missing or unreadable "
                            f"({_one_line(e)}): re-create the store (`tc cache ... --overwrite`)") from None

    def _check_arrays(self) -> None:
        rows = self.source.shape[0]
        expect = {"source": (rows, self.d_model), "target": (rows, self.d_model), "tokens": (rows,),
                  "flags": (rows,)}
        for name, shape in expect.items():
            arr = self._array(name)
            if arr.shape != shape or arr.chunks[0] != self.chunk_rows:
                raise UserError(f"{self.path} is damaged: array {name!r} has shape {arr.shape} in chunks of "
                                f"{arr.chunks[0]} rows, but the store's attributes say {shape} in chunks of "
                                f"{self.chunk_rows}: re-create the store (`tc cache ... --overwrite`)")
        if self.n_rows > rows:
            raise UserError(f"{self.path} is damaged: its attributes say {self.n_rows:,} rows but its arrays hold "
                            f"{rows:,}: re-create the store (`tc cache ... --overwrite`)")
        meta = self._array("chunk_meta")
        if meta.shape[0] < self.n_chunks or meta.shape[1:] != (len(META_COLUMNS),):
            raise UserError(f"{self.path} is damaged: chunk_meta has shape {meta.shape} for {self.n_chunks} chunks")
        if self.complete and "stats" not in self.group:
            raise UserError(f"{self.path} is damaged: it is marked complete but has no statistics: re-run the "
                            "same `tc cache` command")

    # -- checked reads

    @property
    def crc(self) -> np.ndarray | None:
        """(n_chunks, len(CRC_ARRAYS)) uint32 checksums, None for a store made before them."""
        if self._crc is None and self.has_checksums:
            self._crc = self._read("chunk_crc", 0, self.n_chunks)
        return self._crc

    def damage(self, name: str, c: int | None = None) -> DamagedStore:
        where = f"array {name}" if c is None else f"chunk {c} of {name} (rows {c * self.chunk_rows:,}-" \
                                                  f"{min((c + 1) * self.chunk_rows, self.n_rows) - 1:,})"
        return DamagedStore(f"{self.path} is damaged: {where} does not match the checksum written with it: "
                            "re-run the `tc cache` command that made the store to recompute what is damaged "
                            f"(`tc info --verify {self.path}` checks every chunk)")

    def _read(self, name: str, start: int, stop: int, c: int | None = None) -> np.ndarray:
        """Rows start..stop of an array; a chunk that cannot be decoded is damage, not a traceback."""
        try:
            return self._opened(name)[start:stop]
        except Exception as e:
            if isinstance(e, UserError):
                raise
            raise self.damage(name, c if c is not None else start // self.chunk_rows) from None

    def _opened(self, name: str) -> zarr.Array:
        # opened once: each opening reads the array's zarr.json, a round trip on an object store
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _checked(self, name: str, c: int, values: np.ndarray) -> np.ndarray:
        crc = self.crc
        if crc is not None and crc32(values) != int(crc[c, CRC_ARRAYS.index(name)]):
            raise self.damage(name, c)
        return values

    def _chunk(self, name: str, c: int) -> np.ndarray:
        a, b = self.chunk_range(c)
        return self._checked(name, c, self._read(name, a, b, c))

    def _whole_rows(self, name: str) -> np.ndarray:
        """A per-row array (tokens, flags) in full, every chunk of it checked."""
        values = self._read(name, 0, self.n_rows)
        if self.crc is not None:
            for c in range(self.n_chunks):
                self._checked(name, c, values[slice(*self.chunk_range(c))])
        return values

    def _whole(self, name: str) -> np.ndarray:
        """A whole-store array written at finalize (statistics, vocabulary), checked."""
        values = self._read(name, 0, None)
        expected = self.attrs.get("array_crc", {}).get(name)
        if expected is not None and crc32(values) != int(expected):
            raise self.damage(name)
        return values

    def require_complete(self) -> "Store":
        if not self.complete:
            done = int(self.group["chunk_meta"][:, 0].sum())
            raise UserError(f"{self.path} is unfinished ({done} of {self.group['chunk_meta'].shape[0]} chunks): "
                            "re-run the same `tc cache` command to finish it")
        return self

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n_rows)

    def read_chunk(self, c: int) -> Rows:
        """Chunk c's rows, source and target checked against their checksums."""
        a, b = self.chunk_range(c)
        return Rows(a, self._chunk("source", c), self._chunk("target", c), self.tokens[a:b], self.flags[a:b])

    def read_rows(self, start: int, stop: int) -> Rows:
        """Rows start..stop, read as the whole chunks that hold them (so every byte is checked)."""
        first, last = start // self.chunk_rows, -(-stop // self.chunk_rows)
        parts = [self.read_chunk(c) for c in range(first, last)]
        lo, hi = start - first * self.chunk_rows, stop - first * self.chunk_rows
        if len(parts) == 1:
            p = parts[0]
            return Rows(start, p.source[lo:hi], p.target[lo:hi], p.tokens[lo:hi], p.flags[lo:hi])
        return Rows(start, np.concatenate([p.source for p in parts])[lo:hi],
                    np.concatenate([p.target for p in parts])[lo:hi], self.tokens[start:stop], self.flags[start:stop])

    @property
    def tokens(self) -> np.ndarray:
        """All token ids (int32, one per row): small enough to hold in memory."""
        if self._tokens is None:
            self._tokens = self._whole_rows("tokens")
        return self._tokens

    @property
    def flags(self) -> np.ndarray:
        """(n_rows,) uint8 row flags; for a store made before the outlier rule, with its bits added."""
        if self._flags is None:
            if self.outliers_at_read:
                self._apply_outlier_rule()
            else:
                self._flags = self._whole_rows("flags")
        return self._flags

    @property
    def n_outlier_rows(self) -> int:
        return int(np.count_nonzero(self.flags & FLAG_OUTLIER))

    def usable(self, include_bos: bool = False, include_outliers: bool = False) -> np.ndarray:
        """(n_rows,) bool: the rows a stage may use (see usable_mask)."""
        return usable_mask(self.flags, include_bos, include_outliers)

    def n_usable(self, include_bos: bool = False, include_outliers: bool = False) -> int:
        return int(self.usable(include_bos, include_outliers).sum())

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-side mean (d,), var (d,), mean_norm, mean_sq_norm, count over the usable rows
        (BOS, clamped and outlier rows left out)."""
        self.require_complete()
        if self.outliers_at_read:
            self.flags   # computes the statistics without the outlier rows too
            return {side: dict(v) for side, v in self._stats.items()}
        out = {}
        for side in ("source", "target"):
            out[side] = dict(self.attrs["stats"][side])
            out[side]["mean"] = self._whole(f"stats/{side}_mean")
            out[side]["var"] = self._whole(f"stats/{side}_var")
        return out

    def _apply_outlier_rule(self) -> None:
        """A store made before the rule: flag its outlier rows as a writer would have (outlier_mask,
        chunk by chunk) and take their sums out of the stored per-chunk statistics."""
        from tqdm import tqdm

        flags = self._whole_rows("flags")
        chunk_stats, chunk_norms = self.group["chunk_stats"][:], self.group["chunk_norms"][:]
        meta = self.group["chunk_meta"][: self.n_chunks].copy()
        for c in tqdm(range(self.n_chunks), desc="flagging outlier rows (store made before the rule)",
                      disable=self.n_chunks < 16, leave=False):
            a, b = self.chunk_range(c)
            new = outlier_mask(self._chunk("source", c), flags[a:b]) & ((flags[a:b] & FLAG_OUTLIER) == 0)
            if not new.any():
                continue
            rows = a + np.flatnonzero(new)
            for i, side in enumerate((self.source, self.target)):
                s, sq, norm = chunk_sums(side.get_orthogonal_selection((rows, slice(None))))
                chunk_stats[c, 2 * i] -= s
                chunk_stats[c, 2 * i + 1] -= sq
                chunk_norms[c, i] -= norm
            meta[c, 2] -= len(rows)
            flags[rows] |= FLAG_OUTLIER
        self._stats = aggregate_stats(chunk_stats, chunk_norms, meta)
        self._flags = flags

    def verify(self, progress: bool = True) -> list[tuple[str, int | None]]:
        """Check every committed chunk of every checksummed array, and the whole-store arrays, against
        their checksums: the damaged ones as (array, chunk), chunk None for a whole array. A store
        made before checksums has nothing to check against (has_checksums is False): []."""
        from tqdm import tqdm

        if not self.has_checksums:
            return []
        committed = self.committed_chunks()
        damaged: list[tuple[str, int | None]] = []
        for c in tqdm(committed, desc=f"verify {Path(self.path).name}", unit="chunk", disable=not progress,
                      leave=False):
            damaged += [(name, int(c)) for name in self.verify_chunk(int(c))]
        for name in self.attrs.get("array_crc", {}) if self.complete else ():
            try:
                self._whole(name)
            except DamagedStore:
                damaged.append((name, None))
        return damaged

    def committed_chunks(self) -> list[int]:
        meta = self._read("chunk_meta", 0, self.n_chunks)
        return [int(c) for c in np.flatnonzero(meta[:, 0] != 0)]

    def verify_chunk(self, c: int) -> list[str]:
        """The arrays whose chunk c does not match its checksum (all of them are read)."""
        crc = self.crc[c]
        bad = []
        try:
            meta = self._read("chunk_meta", c, c + 1)
        except DamagedStore:
            return ["chunk_meta"]
        if crc32(meta) != int(crc[CRC_ARRAYS.index("chunk_meta")]):
            return ["chunk_meta"]   # its row count cannot be trusted: the chunk is rewritten whole anyway
        start, n = c * self.chunk_rows, int(meta[0, 1])
        for i, name in enumerate(CRC_ARRAYS[:-1]):
            a, b = (c, c + 1) if name.startswith("chunk_") else (start, start + n)
            try:
                ok = crc32(self._read(name, a, b, c)) == int(crc[i])
            except DamagedStore:
                ok = False
            if not ok:
                bad.append(name)
        return bad

    def vocab(self) -> list[str]:
        """Token id -> token text, as stored at cache time."""
        offsets = self._whole("vocab/offsets")
        blob = self._whole("vocab/bytes").tobytes()
        return [blob[offsets[i]:offsets[i + 1]].decode("utf-8", "replace") for i in range(len(offsets) - 1)]

    def sequence_start(self, row: int) -> int:
        return row - row % self.seq_len

    @property
    def hooks(self) -> dict[str, str]:
        return self.attrs["hooks"]

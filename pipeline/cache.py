"""Stage one: run the model once and write source/target activations plus token ids to a store.

text -> packed sequences -> forward to the layer -> chunk buffers -> background writer -> store.
Resume: the text stream is deterministic, so a re-run re-reads it, skips the sequences of chunks
already committed, and recomputes the rest with the same forward batches (batches are aligned to
multiples of `batch_size` sequences from the start), which makes a resumed store bit-identical.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import checked
from pipeline.storage import Location, is_remote, local_path
from pipeline.store import (LOCK_NAME, OUTLIER_FACTOR, Store, StoreWriter, chunk_rows_for, creation_interrupted,
                            is_store, to_fp16, writer_lock)
from pipeline.util import (UserError, check_free_space, config_toml, fault_point, human_bytes, interrupts_deferred,
                           opt, parse_count, pick_device, status)

# Fields that define what the store holds: a re-run must agree on all of them to resume.
IDENTITY_FIELDS = ("model", "dataset", "dataset_config", "split", "text_column", "layer", "tokens",
                   "source", "target", "seq_len", "chunk_rows", "dtype", "compress")


@dataclass
class CacheConfig:
    model: str = opt("google/gemma-2-2b", "Hugging Face id, or a built-in: gemma-3-270m, tiny, gemma-2-2b-random.", "Model")
    layer: int = opt(8, "Layer whose MLP is read.", "Model")
    source: str = opt("hook_resid_mid", "Input hook (the transcoder's source).", "Model")
    target: str = opt("hook_mlp_out", "Target hook (what the transcoder predicts).", "Model")
    dataset: str = opt("HuggingFaceFW/fineweb-edu", "HF dataset id (streamed), a local .txt/.jsonl/.parquet file or folder, or python-docs.", "Text")
    dataset_config: str | None = opt(None, "HF dataset config name.", "Text")
    split: str = opt("train", "HF dataset split.", "Text")
    text_column: str = opt("text", "Column that holds the text.", "Text")
    text_errors: str = opt("strict", "Local text that is not UTF-8, or a JSONL line that is not a JSON object: "
                           "strict (stop, naming the file and line), replace (bad bytes become U+FFFD) or skip "
                           "(leave that .txt file or JSONL line out; the count is printed).", "Text")
    tokens: int = opt(5_000_000, "Tokens to cache (5M, 200k, 5000000); rounded up to whole sequences.", "Text", parse=parse_count)
    seq_len: int = opt(1024, "Tokens per sequence, BOS included.", "Text")
    out: str | None = opt(None, "Store path (default data/l{layer}.zarr), or an object-store URL: s3://bucket/l8.zarr, "
                          "gs://... (docs/object-storage.md).", "Output")
    chunk_rows: int | None = opt(None, "Rows per chunk (default: whole sequences, about 4096 rows).", "Output")
    compress: bool = opt(False, "Compress activations with zstd (about 1.08x smaller, reads 2-4x slower).", "Output")
    outlier_factor: float = opt(OUTLIER_FACTOR, "Flag rows whose source norm is above this many times their chunk's "
                                "median (0 flags none); flagged rows are left out of statistics, training and "
                                "samples unless asked for (docs/store.md).", "Output")
    overwrite: bool = opt(False, "Replace an existing store made with a different configuration.", "Output")
    batch_size: int = opt(8, "Sequences per forward pass.", "Compute")
    device: str = opt("auto", "auto, cpu or cuda.", "Compute")
    dtype: str = opt("auto", "Model compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.", "Compute")

    def resolved_out(self) -> Path | str:
        """A local Path, or an object-store URL as a string (a Path would fold its //)."""
        out = self.out or f"data/l{self.layer}.zarr"
        return out.rstrip("/") if is_remote(out) else local_path(out)


def validate(cfg: CacheConfig) -> None:
    """Checks that need no model: everything here fails in one line before minutes of loading."""
    for name in ("tokens", "seq_len", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise UserError("--seq-len must be at least 2 (BOS plus one token)")
    if cfg.layer < 0:
        raise UserError(f"--layer must be 0 or more, got {cfg.layer}")
    if cfg.chunk_rows is not None and (cfg.chunk_rows <= 0 or cfg.chunk_rows % cfg.seq_len):
        raise UserError(f"--chunk-rows must be a positive multiple of --seq-len ({cfg.seq_len})")
    if cfg.outlier_factor != 0 and not cfg.outlier_factor > 1:   # <= 1 would flag about half the rows
        raise UserError(f"--outlier-factor must be 0 (flag none) or above 1, got {cfg.outlier_factor}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"unknown --dtype {cfg.dtype!r}: use auto, float32, bfloat16 or float16")


def identity(cfg: CacheConfig) -> dict[str, Any]:
    return {k: asdict(cfg)[k] for k in IDENTITY_FIELDS}


def prepare_output(cfg: CacheConfig) -> str:
    """Decide what to do with the output path: 'create', 'resume' or 'done'. Refuses unsafe cases."""
    out = cfg.resolved_out()
    where = Location(out)
    if where.is_file():
        raise UserError(f"{out} exists and is a file: choose another --out")
    if is_store(out):
        attrs = Store(out).attrs
        old = attrs.get("config", {})
        diff = [k for k in IDENTITY_FIELDS if old.get(k) != identity(cfg)[k]]
        # a store made before the outlier rule has none recorded: readers apply the default one
        rule = attrs.get("outlier_rule")
        if rule is not None and float(rule["factor"]) != float(cfg.outlier_factor):
            diff.append("outlier_factor")
        if not diff and not cfg.overwrite:
            check_text_source(cfg, out, attrs)
            return "done" if Store(out).complete else "resume"
        if not cfg.overwrite:
            raise UserError(f"{out} holds a store made with a different configuration ({', '.join(diff)}): "
                            "pass --overwrite to replace it, or choose another --out")
        return "create"
    if creation_interrupted(out):
        return "create"   # tc's own, stopped before it held any data
    if any(name != LOCK_NAME for name in where.names()):
        raise UserError(f"{out} exists and is not a tc store: choose another --out (tc never deletes it)")
    return "create"


def damaged_chunks(out: Path) -> list[int]:
    """The committed chunks of an existing store that fail their checksums: a re-run recomputes them
    (caching is deterministic, so the repaired store equals the undamaged one bit for bit)."""
    store = Store(out)
    damaged = store.verify()
    chunks = sorted({c for _, c in damaged if c is not None})
    if any(c is None for _, c in damaged):   # statistics or vocabulary: rewritten by finalize
        chunks = chunks or [0]
    if damaged:
        names = ", ".join(f"{name}" + ("" if c is None else f" chunk {c}") for name, c in damaged[:6])
        more = f" and {len(damaged) - 6} more" if len(damaged) > 6 else ""
        print(f"{out}: {len(damaged)} damaged ({names}{more}): recomputing {len(chunks)} chunk(s)")
    return chunks


def check_context(cfg: CacheConfig, lm: Any) -> None:
    n_ctx = getattr(getattr(lm.model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and cfg.seq_len > n_ctx:
        raise UserError(f"--seq-len {cfg.seq_len:,} is longer than {cfg.model}'s context of {n_ctx:,} tokens: "
                        f"use --seq-len {n_ctx:,} or less")


def bytes_per_row(d_model: int) -> int:
    return 2 * 2 * d_model + 4 + 1   # fp16 source and target, int32 token, uint8 flags


def check_disk(cfg: CacheConfig, out: Path, action: str, d_model: int) -> None:
    """Say what the store will take, and refuse when the filesystem cannot hold what is left to write."""
    chunk_rows = cfg.chunk_rows or chunk_rows_for(cfg.seq_len)
    total = -(-cfg.tokens // cfg.seq_len) * cfg.seq_len
    if action == "create":
        rows = total
    else:
        store = Store(out)
        rows = max(0, store.n_chunks - len(store.committed_chunks())) * chunk_rows
    need = rows * bytes_per_row(d_model)
    print(f"caching {total:,} tokens ({total // cfg.seq_len:,} sequences of {cfg.seq_len:,}) into {out}: about "
          f"{human_bytes(total * bytes_per_row(d_model))} {'stored' if is_remote(out) else 'on disk'}"
          + (f", {human_bytes(need)} of it still to write" if action != "create" else ""), flush=True)
    if not is_remote(out):   # an object store has no free space to ask about
        check_free_space(out, need, f"the store {out}", "free some space, choose another --out, or cache fewer --tokens")


def check_text_source(cfg: CacheConfig, out: Path, attrs: dict) -> None:
    """A store resumes only on the text it was begun on: re-reading a changed folder would mix two streams."""
    from pipeline import text

    now = text.describe_dataset(cfg.dataset, cfg.split, cfg.dataset_config, cfg.text_column, cfg.text_errors)
    change = text.source_change(attrs.get("dataset") or {}, now)
    if change:
        raise UserError(f"{out} was begun on different text: {change}; restore the text as it was to resume, "
                        "or pass --overwrite to start the store again, or choose another --out")


def check_writable(out: Path | str) -> None:
    if is_remote(out):
        return Location(out).check_writable()
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    probe = parent / f".tc-write-test-{time.time_ns()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}; choose another --out") from None


def compute_dtype(cfg: CacheConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, cfg.dtype)


class BackgroundWriter:
    """Writes chunks on a thread so the forward pass never waits on disk. Errors surface on submit/close."""

    def __init__(self, writer: StoreWriter, depth: int = 2):
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_chunk(*job)
                except BaseException as e:  # handed to the main thread
                    self.error = e

    def submit(self, *job: Any) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def prefetch(items: Iterator[Any], depth: int = 4) -> Iterator[Any]:
    """Produce `items` on a thread, `depth` ahead, so tokenizing overlaps the forward pass.
    An exception in the producer is raised here, in the consumer, at the same point."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:   # handed to the consumer
            q.put((end, e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def batches(seqs: Iterator[np.ndarray], n_seqs: int, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first sequence, (B, seq_len) tokens) for consecutive batches of the stream."""
    buf: list[np.ndarray] = []
    first = 0
    for i, seq in enumerate(seqs):
        if i >= n_seqs:
            break
        buf.append(seq)
        if len(buf) == batch_size:
            yield first, np.stack(buf)
            first, buf = i + 1, []
    if buf:
        yield first, np.stack(buf)


def run_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Stage one end to end. Returns the summary it prints. Under torchrun each process writes its own
    chunks and rank 0 speaks for the job (docs/distributed.md); a plain run is a job of one."""
    from pipeline import dist
    cfg = checked(cfg)
    job = dist.join(dist.from_env())
    try:
        with dist.quiet_stdout(job):
            return cache_job(cfg, job)
    finally:
        dist.leave(job)


def cache_job(cfg: CacheConfig, job: Any) -> dict[str, Any]:
    plan = job.on_main(lambda: plan_store(cfg))   # the others wait here, then learn rank 0's decision
    if plan["done"] is not None:
        return plan["done"]
    docs, lm, hooks = job.on_all(lambda: load(cfg, job))
    out, writer = cfg.resolved_out(), None

    def create() -> list[int]:
        nonlocal writer
        check_disk(cfg, out, plan["action"], lm.d_model)
        writer = open_writer(cfg, out, plan["action"], lm, hooks)
        if plan["damaged"]:
            writer.uncommit(plan["damaged"])
        return writer.pending_chunks()

    try:
        pending = job.on_main(create)   # the store exists, with its damaged chunks uncommitted, once this returns
        writer = writer or StoreWriter.attach(out)
        # chunk c is rank c % world's: the only process that writes any of its objects
        owned = [c for c in pending if c % job.world == job.rank]
        vocab = ThreadPoolExecutor(1).submit(vocab_strings, lm) if job.main else None
        try:
            n_rows, seconds = job.on_all(lambda: write_store(cfg, writer, lm, hooks, docs, owned, job.main))
        except UserError:
            if job.main and plan["action"] == "create" and not writer.n_chunks - len(writer.pending_chunks()):
                writer.close()
                Location(out).remove_all()   # made by this run and still empty: leave nothing behind
            raise
        if not job.main:   # every chunk is committed (on_all was the barrier): rank 0 finalises
            return {"store": str(out), "rank": job.rank, "chunks": len(owned)}
        return finish(cfg, writer, n_rows, seconds, vocab.result())
    finally:
        if writer is not None:
            writer.close()


def plan_store(cfg: CacheConfig) -> dict[str, Any]:
    """What rank 0 decides before any model loads: create, resume or done, and the damaged chunks."""
    from pipeline import text

    validate(cfg)
    out = cfg.resolved_out()
    check_writable(out)
    action = prepare_output(cfg)
    damaged = damaged_chunks(out) if action in ("done", "resume") else []
    if action == "done" and not damaged:
        store = Store(out)
        checked_note = "every chunk matches its checksum" if store.has_checksums else "made before checksums"
        print(f"{out} is already complete ({store.n_rows:,} rows; {checked_note}): nothing to do")
        return {"done": {"store": str(out), "tokens": store.n_rows, "skipped": True}}
    text.prescan(cfg.dataset, cfg.text_column, cfg.text_errors)   # a bad local file fails before the store exists
    return {"action": action, "damaged": damaged, "done": None}


def load(cfg: CacheConfig, job: Any) -> tuple[Iterator[str], Any, list[str]]:
    """The text stream, the model and its hooks: every rank needs all three."""
    from pipeline import forward, models, text

    docs = text.iter_documents(cfg.dataset, split=cfg.split, config=cfg.dataset_config, text_column=cfg.text_column,
                               text_errors=cfg.text_errors)
    device = job.device(pick_device(cfg.device))
    if job.main:
        status(f"cache: loading {cfg.model} on {device}")
    lm = models.load_model(cfg.model, device=device, dtype=compute_dtype(cfg, device))
    check_context(cfg, lm)
    return docs, lm, forward.check_hooks(lm, cfg.layer, [cfg.source, cfg.target])


def vocab_strings(lm: Any) -> list[str]:
    from pipeline import models

    return models.vocab_strings(lm.tokenizer)


def open_writer(cfg: CacheConfig, out: Path, action: str, lm: Any, hooks: list[str]) -> StoreWriter:
    from pipeline import text

    if action in ("resume", "done"):   # done: complete, with damaged chunks to recompute
        return StoreWriter.reopen(out)
    if Location(out).exists():   # --overwrite of a store: take its lock first so a live writer is never clobbered
        lock = writer_lock(out)
        lock.acquire()
        Location(out).remove_all(keep=(LOCK_NAME,))
        lock.release()
    seq_len = cfg.seq_len
    n_rows = -(-cfg.tokens // seq_len) * seq_len
    chunk_rows = cfg.chunk_rows or chunk_rows_for(seq_len)
    attrs = {
        "model": cfg.model, "hf_name": lm.hf_name, "layer": cfg.layer,
        "hooks": {"source": hooks[0], "target": hooks[1]}, "seq_len": seq_len, "dtype": "float16",
        "compute_dtype": str(lm.dtype).replace("torch.", ""),
        "tokenizer": {"name": getattr(lm.tokenizer, "name_or_path", cfg.model), "bos_id": lm.bos_id,
                      "vocab_size": lm.vocab_size},
        "dataset": text.describe_dataset(cfg.dataset, cfg.split, cfg.dataset_config, cfg.text_column, cfg.text_errors),
        "config": asdict(cfg),
    }
    return StoreWriter.create(out, n_rows=n_rows, d_model=lm.d_model, chunk_rows=chunk_rows, attrs=attrs,
                              compress=cfg.compress, outlier_factor=cfg.outlier_factor)


def write_store(cfg: CacheConfig, writer: StoreWriter, lm: Any, hooks: list[str], docs: Iterator[str],
                owned: list[int], progress: bool = True) -> tuple[int, float]:
    """Compute and write the chunks in `owned` (uncommitted ones): (rows the text gave, seconds).

    Every batch that holds a sequence of an owned chunk is computed whole, so a batch that straddles
    two processes' chunks is computed by both, each keeping its own rows: the batches, and so the
    bits, are the single-process run's whatever the number of processes."""
    from pipeline import forward, text

    seq_len, chunk_rows = cfg.seq_len, writer.chunk_rows
    spc = chunk_rows // seq_len                       # sequences per chunk
    n_seqs = writer.n_rows_planned // seq_len
    pending = set(owned)
    todo = sum(min(chunk_rows, n_seqs * seq_len - c * chunk_rows) for c in pending)
    bar = tqdm(total=n_seqs * seq_len, initial=n_seqs * seq_len - todo, unit="tok", unit_scale=True,
               desc=f"cache {cfg.model} L{cfg.layer}", smoothing=0.05, disable=not progress)
    bg = BackgroundWriter(writer)
    buffers: dict[int, ChunkBuffer] = {}
    seen = 0
    t0 = time.perf_counter()
    try:
        seqs = text.pack_sequences(docs, lm.tokenizer, seq_len, lm.bos_id)
        for first, toks in prefetch(batches(seqs, n_seqs, cfg.batch_size)):
            seen = first + len(toks)
            chunks = {s // spc for s in range(first, seen)}
            if not chunks & pending:
                continue                              # on disk, or another process's: only the tokenizer ran
            acts = forward.forward_hooks(lm, torch.from_numpy(toks), cfg.layer, hooks, on_device=True)
            (src, src_over), (tgt, tgt_over) = (to_fp16(acts[h]) for h in hooks)   # (B * T, d) rows
            for j in range(len(toks)):
                c, slot = divmod(first + j, spc)
                if c in pending:
                    rows = slice(j * seq_len, (j + 1) * seq_len)
                    if c not in buffers:
                        buffers[c] = ChunkBuffer(spc, seq_len, lm.d_model)
                    buf = buffers[c]
                    buf.put(slot, src[rows], tgt[rows], toks[j], src_over[rows], tgt_over[rows])
                    bar.update(seq_len)
                    if buf.full():
                        bg.submit(c, *buffers.pop(c).parts(lm.bos_id))
        for c, buf in sorted(buffers.items()):        # text ran out inside this chunk
            bg.submit(c, *buf.parts(lm.bos_id))
        bg.close()
    finally:
        bar.close()
    if seen == 0:
        raise UserError(f"{cfg.dataset} gave no text long enough for one {seq_len}-token sequence: "
                        "check the dataset, its --text-column, or lower --seq-len")
    return min(seen, n_seqs) * seq_len, time.perf_counter() - t0


class ChunkBuffer:
    """One chunk's rows, filled sequence by sequence (slots in chunk order) until whole."""

    def __init__(self, n_seqs: int, seq_len: int, d_model: int):
        rows = n_seqs * seq_len
        self.seq_len, self.filled = seq_len, 0
        self.source = np.empty((rows, d_model), np.float16)
        self.target = np.empty((rows, d_model), np.float16)
        self.tokens = np.empty(rows, np.int64)
        self.clamped = np.empty((2, rows), bool)

    def put(self, slot: int, source: np.ndarray, target: np.ndarray, tokens: np.ndarray,
            source_clamped: np.ndarray, target_clamped: np.ndarray) -> None:
        rows = slice(slot * self.seq_len, (slot + 1) * self.seq_len)
        self.source[rows], self.target[rows], self.tokens[rows] = source, target, tokens
        self.clamped[0, rows], self.clamped[1, rows] = source_clamped, target_clamped
        self.filled = max(self.filled, slot + 1)

    def full(self) -> bool:
        return self.filled * self.seq_len == len(self.tokens)

    def parts(self, bos_id: int) -> tuple:
        """write_chunk's arguments after the chunk index: the rows filled so far, in order."""
        n = self.filled * self.seq_len
        toks = self.tokens[:n]
        return (self.source[:n], self.target[:n], toks, toks == bos_id,
                (self.clamped[0, :n], self.clamped[1, :n]))


def finish(cfg: CacheConfig, writer: StoreWriter, n_rows: int, seconds: float, vocab: list[str]) -> dict[str, Any]:
    planned = writer.n_rows_planned
    fault_point("before_finalize")
    out = cfg.resolved_out()
    Location(out).write_text("tc-cache.toml", config_toml(cfg, "tc-cache.toml"))   # before `complete`: a complete store always has it
    with interrupts_deferred():   # seconds of zarr work, in its threads: Ctrl-C waits for the end
        summary = writer.finalize(n_rows, vocab)
    nbytes = Location(out).size()
    result = {"store": str(out), "tokens": n_rows, "rows": n_rows, "bytes": nbytes,
              "bytes_per_token": nbytes / max(n_rows, 1), "seconds": round(seconds, 1),
              "overflow_rows": summary["overflow"]["rows"], "bos_rows": summary["n_bos_rows"],
              "outlier_rows": summary.get("n_outlier_rows", 0)}
    if n_rows < planned:
        print(f"the text ran out: wrote {n_rows:,} of the {planned:,} tokens asked for; the store is complete for what it holds")
    print(f"wrote {n_rows:,} tokens to {out}: {nbytes / 1e6:,.1f} MB ({result['bytes_per_token']:,.0f} bytes/token), "
          f"{seconds:,.1f} s this run, {summary['overflow']['rows']} rows clamped to fp16 range, "
          f"{summary['n_bos_rows']} BOS rows and {result['outlier_rows']} outlier rows left out of statistics "
          "and training")
    return result

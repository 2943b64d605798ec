"""Text sources and packing: documents in a fixed order -> BOS-started token sequences.

A dataset spec is one of:

- ``python-docs``: an embedded corpus made from documentation text that ships inside CPython's
  standard library, read without a download: the ``pydoc_data.topics`` help topics (sorted by
  name), then the docstrings of every stdlib source file (files in sorted path order; read with
  ``ast``, nothing imported; test folders skipped). It depends only on the Python version. The
  first use saves it under the user cache folder (parsing the stdlib takes about 4 s); later uses
  read that copy.
- a local file or folder of ``.txt`` (one document per file), ``.jsonl`` or ``.parquet`` (one
  document per record, from the text column). A folder is searched recursively; its files are
  read in sorted path order, grouped by kind (all .txt, then all .jsonl, then all .parquet).
  .txt and .jsonl are read by tc itself, giving the documents ``datasets`` gives for valid files
  (stores made through ``datasets`` resume on them) and naming the file and line of a bad one;
  .parquet goes through ``datasets`` (streaming). ``prescan`` reads and hashes every file before
  a store is made, so a bad file fails with nothing written, and the hash is the store's record
  of its source.
- anything else: a Hugging Face dataset id, streamed with ``datasets.load_dataset``.

The same spec always gives the same documents in the same order, which lets a resumed cache
re-read the stream from the start and skip what is already written.
"""
from __future__ import annotations

import ast
import codecs
import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
import tokenize
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.util import UserError, user_cache_dir, write_file_atomic

PYTHON_DOCS = "python-docs"
_PYTHON_DOCS_FORMAT = 1   # bump when the extraction below changes, so saved copies are redone
# File suffix -> `datasets` builder; the order here is the order kinds are read within a folder.
LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
# What text that is not UTF-8, or a JSONL line that is not a JSON object, does (--text-errors).
TEXT_ERRORS = ("strict", "replace", "skip")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}


# ---- python-docs -------------------------------------------------------------------------------

def python_docs() -> list[str]:
    """Every document of the embedded ``python-docs`` corpus, in its fixed order."""
    return list(_python_docs_cached())


@functools.lru_cache(maxsize=1)
def _python_docs_cached() -> tuple[str, ...]:
    return tuple(_iter_python_docs())


def python_docs_file() -> Path:
    """The corpus saved once per Python version: parsing the stdlib takes seconds, reading this milliseconds."""
    python = f"{sys.implementation.name}{sys.version.split()[0]}"
    return user_cache_dir() / "corpora" / f"python-docs-{python}-v{_PYTHON_DOCS_FORMAT}.jsonl"


def _iter_python_docs() -> Iterator[str]:
    path = python_docs_file()
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(path, "".join(json.dumps(d) + "\n" for d in extract_python_docs()), shared=True)
        except OSError:   # an unwritable cache folder costs only speed
            yield from extract_python_docs()
            return
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def extract_python_docs() -> Iterator[str]:
    """The corpus read from the standard library itself."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        doc = _module_docs(path, root)
        if doc:
            yield doc


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_docs(path: Path, root: Path) -> str:
    """One document per source file: the module, class and function docstrings, each under its name."""
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return ""
    module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    parts = []
    for qualname, node in _documented(tree, module):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            parts.append(f"{qualname}\n{doc.strip()}")
    return "\n\n".join(parts)


def _documented(node: ast.AST, qualname: str) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) for the module and its classes and functions, in source order."""
    yield qualname, node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _documented(child, f"{qualname}.{child.name}")


# ---- local files and the hub -------------------------------------------------------------------

def _is_local(spec: str) -> bool:
    """A spec names a local path if it exists or looks like one (so a typo is not sent to the hub)."""
    return (os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1
            or Path(spec).suffix in LOCAL_KINDS)


def local_files(spec: str) -> dict[str, list[Path]]:
    """Files of a local spec grouped by kind ({'.txt': [...], ...}, sorted); UserError if none."""
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise UserError(f"dataset {spec}: no such file or folder (give a .txt/.jsonl/.parquet file or a folder "
                        f"of them, a Hugging Face dataset id, or {PYTHON_DOCS})")
    if path.is_file():
        if path.suffix not in LOCAL_KINDS:
            raise UserError(f"dataset {spec}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
        return {path.suffix: [path.resolve()]}
    found: dict[str, list[Path]] = {}
    for folder, dirs, names in os.walk(path, onerror=_unreadable_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            suffix = Path(name).suffix
            if suffix in LOCAL_KINDS and not name.startswith("."):
                found.setdefault(suffix, []).append((Path(folder) / name).resolve())
    if not found:
        raise UserError(f"dataset {spec}: the folder has no .txt, .jsonl or .parquet files")
    return {k: sorted(found[k], key=lambda p: p.as_posix()) for k in LOCAL_KINDS if k in found}


def _unreadable_folder(e: OSError) -> None:
    # os.walk would skip a folder it cannot list, and its files would silently be left out
    raise UserError(f"cannot list {e.filename}: {e.strerror}; fix its permissions or move it out of the dataset")


def _check_errors(text_errors: str) -> None:
    if text_errors not in TEXT_ERRORS:
        raise UserError(f"unknown --text-errors {text_errors!r}: use strict, replace or skip")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[Any]:
    """The file opened for binary reading; an OS error (gone, no permission) as one line."""
    try:
        with open(path, "rb") as f:
            yield f
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path} is gone (it was listed when the cache started): restore it and re-run") from None
        raise UserError(f"cannot read {path}: {e.strerror}; fix its permissions or move it out of the dataset") from None


class _Undecodable:
    """Where --text-errors replace or skip acted, for the report and the store's record."""

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self.replaced: list[str] = []


def _txt_documents(path: Path, text_errors: str, seen: _Undecodable, hasher: Any = None) -> Iterator[str]:
    """The file as one document, decoded exactly as ``datasets``' text builder does (UTF-8, BOM kept,
    universal newlines: \\r\\n and \\r become \\n)."""
    with _reading(path) as f:
        data = f.read()
    if hasher is not None:
        hasher.update(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        if text_errors == "strict":
            raise UserError(f"{path} is not UTF-8 text (byte {e.start}, line {line}): convert it to UTF-8, or pass "
                            "--text-errors replace (bad bytes become U+FFFD) or --text-errors skip (leave the "
                            "file out)") from None
        if text_errors == "skip":
            seen.skipped.append(str(path))
            return
        seen.replaced.append(str(path))
        text = data.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text:
        yield text


_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()


def _json_values(line: str) -> Iterator[Any]:
    """The JSON values on one line: pyarrow (behind ``datasets``) also reads several values separated
    by spaces or a lone \\r, so this does too."""
    pos = _JSON_SPACE.match(line).end()
    while pos < len(line):
        value, pos = _DECODER.raw_decode(line, pos)
        yield value
        pos = _JSON_SPACE.match(line, pos).end()


def _jsonl_documents(path: Path, column: str, text_errors: str, seen: _Undecodable,
                     hasher: Any = None) -> Iterator[str]:
    """The `column` of each JSON object, line by line, as ``datasets``' json builder gives them for a
    valid file: a leading BOM and blank lines ignored, a null or missing field skipped."""
    found, first_keys = False, None
    with _reading(path) as f:
        for number, raw in enumerate(f, 1):
            if hasher is not None:
                hasher.update(raw)
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            objects = _jsonl_line(raw, path, number, text_errors, seen)
            for obj in objects:
                first_keys = sorted(obj) if first_keys is None else first_keys
                if obj.get(column) is None:
                    found = found or column in obj
                    continue
                found = True
                text = obj[column]
                if not isinstance(text, str):
                    raise UserError(f"{path} line {number}: field {column!r} holds a {type(text).__name__}, "
                                    "not text: fix the line, or use --text-column")
                if text:
                    yield text
    if first_keys is not None and not found:
        raise UserError(f"{path} has no column {column!r} on any line; its first object's columns are "
                        f"{first_keys} (use --text-column)")


def _jsonl_line(raw: bytes, path: Path, number: int, text_errors: str, seen: _Undecodable) -> list[dict]:
    """The objects on one line; [] for a line --text-errors skip leaves out."""
    where = f"{path} line {number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if text_errors == "strict":
            raise UserError(f"{where} is not UTF-8 (byte {e.start} of the line): fix it, or pass --text-errors "
                            "replace (bad bytes become U+FFFD) or --text-errors skip (leave the line out)") from None
        if text_errors == "skip":
            seen.skipped.append(where)
            return []
        seen.replaced.append(where)
        line = raw.decode("utf-8", errors="replace")
    try:
        objects = list(_json_values(line))
        problem = None if all(isinstance(o, dict) for o in objects) else "is valid JSON but not an object"
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        problem = "is JSON nested too deeply to read"
    if problem is None:
        return objects
    if text_errors == "skip":
        seen.skipped.append(where)
        return []
    raise UserError(f"{where} {problem}: fix the line, or pass --text-errors skip to leave such lines out")


def _file_documents(path: Path, column: str, text_errors: str, seen: _Undecodable,
                    hasher: Any = None) -> Iterator[str]:
    if path.suffix == ".txt":
        return _txt_documents(path, text_errors, seen, hasher)
    return _jsonl_documents(path, column, text_errors, seen, hasher)


def _iter_local(spec: str, text_column: str, text_errors: str) -> Iterator[str]:
    """.txt and .jsonl through tc's own reader (it can name the line that fails), .parquet through
    ``datasets``; the documents are the same as ``datasets`` gives for valid files (a test checks)."""
    seen = _Undecodable()
    for suffix, files in local_files(spec).items():
        if suffix != ".parquet":
            for path in files:
                yield from _file_documents(path, text_column, text_errors, seen)
            continue
        from datasets import load_dataset

        try:
            ds = load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
        except Exception as e:
            raise UserError(f"dataset {spec}: could not read the {suffix} files: {_one_line(e)}") from None
        yield from _column(ds, text_column, f"dataset {spec} ({suffix} files)")


# ---- the identity of a local source: one pass that reads, checks and hashes every file ----------

def scan_local(spec: str, text_column: str = "text", text_errors: str = "strict") -> dict:
    """Read every file of a local spec as the cache will: decode each .txt, parse each .jsonl line
    (UserError at the first bad one unless --text-errors says otherwise), and hash each file's
    bytes. Remembered while no file's size or mtime changes, so a run scans once; not while a file
    is younger than the filesystem's clock can tell apart (two writes in one tick keep the mtime)."""
    files = [f for group in local_files(spec).values() for f in group]
    stamps = []
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}") from None
        stamps.append((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
    if any(mtime > time.time_ns() - _RACY_NS for _, _, mtime, _ in stamps):
        return _scan_cached.__wrapped__(spec, text_column, text_errors, tuple(stamps))
    return _scan_cached(spec, text_column, text_errors, tuple(stamps))


_RACY_NS = 2_000_000_000


@functools.lru_cache(maxsize=8)
def _scan_cached(spec: str, text_column: str, text_errors: str, stamps: tuple) -> dict:
    root = Path(os.path.expanduser(spec)).resolve()
    seen = _Undecodable()
    contents, total, documents = [], hashlib.sha256(), 0
    for name, size, _, _ in stamps:
        path = Path(name)
        hasher = hashlib.sha256()
        if path.suffix == ".parquet":   # read by `datasets` at cache time: only hashed here
            with _reading(path) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(block)
        else:
            documents += sum(1 for _ in _file_documents(path, text_column, text_errors, seen, hasher))
        rel = path.name if root == path else Path(os.path.relpath(path, root)).as_posix()
        contents.append([rel, size, hasher.hexdigest()[:16]])
        total.update(f"{rel}\0{hasher.hexdigest()}\n".encode())
    return {"contents": contents, "sha256": total.hexdigest(), "documents": documents,
            "skipped": seen.skipped, "replaced": seen.replaced}


def prescan(spec: str, text_column: str = "text", text_errors: str = "strict") -> None:
    """Check a local source before a store is made: a bad file fails here, with nothing written.
    Prints what --text-errors replace or skip did. Other sources need no pass."""
    _check_errors(text_errors)
    if spec == PYTHON_DOCS or not _is_local(spec):
        return
    scan = scan_local(spec, text_column, text_errors)
    for verb, where in (("left out", scan["skipped"]), ("replaced bad bytes with U+FFFD in", scan["replaced"])):
        if where:
            names = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
            print(f"--text-errors {text_errors}: {verb} {len(where)} undecodable document(s): {names}")


def _iter_hub(spec: str, split: str, config: str | None, text_column: str) -> Iterator[str]:
    """Open the hub dataset now (so an unreachable id fails at once), read it lazily."""
    from datasets import load_dataset

    try:
        ds = load_dataset(spec, config, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"could not open dataset {spec} (config {config}, split {split}) from the Hugging Face hub "
                        f"(no network, no access, or a wrong id/config/split): {_one_line(e)}") from None
    return _column(ds, text_column, f"dataset {spec}")


def _rows(ds: Any, what: str) -> Iterator[dict]:
    """The rows of a streamed dataset; an error while streaming (network, a bad file) as one line."""
    rows, n = iter(ds), 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise UserError(f"{what}: reading stopped after {n} records: {_one_line(e)} (if it is the network, "
                            "re-run: the cache resumes)") from None
        n += 1
        yield row


def _column(ds: Any, column: str, what: str) -> Iterator[str]:
    """The text column of a streamed dataset; UserError naming the columns if it is missing."""
    for row in _rows(ds, what):
        if column not in row:
            raise UserError(f"{what} has no column {column!r}; its columns are {sorted(row)} (use --text-column)")
        text = row[column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{what}: column {column!r} holds {type(text).__name__} values, not text "
                            f"(use --text-column)")
        if text:
            yield text


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


def iter_documents(spec: str, split: str = "train", config: str | None = None,
                   text_column: str = "text", text_errors: str = "strict") -> Iterator[str]:
    """Documents of `spec` (see the module docstring), always in the same order.

    Errors a user can fix raise UserError: a missing path, a folder without usable files or an
    unreachable hub id at once; a missing or non-text column, text that is not UTF-8 or a JSONL
    line that is not a JSON object when reached (`prescan` finds those in local files up front).
    `text_errors` (strict, replace, skip) says what undecodable local text does.
    """
    _check_errors(text_errors)
    if spec == PYTHON_DOCS:
        return _iter_python_docs()
    if _is_local(spec):
        local_files(spec)  # fail now, not at the first next()
        return _iter_local(spec, text_column, text_errors)
    return _iter_hub(spec, split, config, text_column)


def describe_dataset(spec: str, split: str = "train", config: str | None = None,
                     text_column: str = "text", text_errors: str = "strict") -> dict:
    """What a store records about its text source, its identity included (docs/store.md): for local
    files each file's size and hash, for python-docs a hash of the corpus, for the hub the revision
    when it can be asked for."""
    _check_errors(text_errors)
    if spec == PYTHON_DOCS:
        corpus = hashlib.sha256("".join(json.dumps(d) + "\n" for d in _python_docs_cached()).encode())
        return {"kind": PYTHON_DOCS, "spec": spec, "python": sys.version.split()[0], "sha256": corpus.hexdigest()}
    if _is_local(spec):
        files = local_files(spec)
        scan = scan_local(spec, text_column, text_errors)
        return {"kind": "local", "spec": spec, "path": str(Path(os.path.expanduser(spec)).resolve()),
                "files": [str(f) for k in files for f in files[k]], "text_column": text_column,
                "text_errors": text_errors, "undecodable": len(scan["skipped"]) + len(scan["replaced"]),
                "contents": scan["contents"], "sha256": scan["sha256"]}
    return {"kind": "hf", "spec": spec, "config": config, "split": split, "text_column": text_column,
            "revision": _hub_revision(spec)}


def _hub_revision(spec: str) -> str | None:
    """The commit the hub serves the dataset at now; None offline or on any failure (then a resume
    cannot compare it, as for a store made before it was recorded)."""
    try:
        import huggingface_hub

        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return None
        return huggingface_hub.HfApi().dataset_info(spec, timeout=10).sha
    except Exception:
        return None


def source_change(old: dict, new: dict) -> str | None:
    """How the text source given now differs from the one a store recorded, in words; None if it
    does not, or if the store recorded nothing to compare (made before tc hashed its sources)."""
    if old.get("kind") != new.get("kind"):
        return None if "sha256" not in old and old.get("revision") is None else "a different kind of source"
    if old.get("kind") == PYTHON_DOCS and old.get("sha256") not in (None, new["sha256"]):
        return (f"the python-docs corpus differs (the store's was made with Python {old.get('python')}, "
                f"this one with Python {new['python']})")
    if old.get("kind") == "hf" and None not in (old.get("revision"), new.get("revision")) \
            and old["revision"] != new["revision"]:
        return f"the hub dataset moved from revision {old['revision'][:12]} to {new['revision'][:12]}"
    if old.get("kind") == "local" and "sha256" in old:
        return _files_change(old, new)
    return None


def _files_change(old: dict, new: dict) -> str | None:
    before = {rel: (size, digest) for rel, size, digest in old["contents"]}
    after = {rel: (size, digest) for rel, size, digest in new["contents"]}
    parts = []
    for what, names in (("added", [r for r in after if r not in before]),
                        ("removed", [r for r in before if r not in after]),
                        ("changed", [r for r in after if r in before and after[r] != before[r]])):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{len(names)} file(s) {what} ({shown})")
    if parts:
        return "; ".join(parts)
    if old["sha256"] != new["sha256"]:
        return "the files' contents changed"
    errors = (old.get("text_errors", "strict"), new["text_errors"])
    if (old.get("undecodable") or new["undecodable"]) and errors[0] != errors[1]:
        return f"--text-errors was {errors[0]}, now {errors[1]}, and the files hold undecodable text"
    return None


# ---- packing -----------------------------------------------------------------------------------

def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: no special tokens added, text that spells one tokenized as plain text.

    A fast Hugging Face tokenizer is called through its Rust backend directly: the same ids (a test
    checks) at about twice the speed, since the wrapper's per-call Python work is skipped.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False,
                         return_attention_mask=False)["input_ids"]
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def pack_sequences(docs: Iterable[str], tokenizer: Any, seq_len: int, bos_id: int,
                   batch_docs: int = 128, batch_chars: int = 256_000) -> Iterator[np.ndarray]:
    """Tokenize and pack documents into int64 rows of `seq_len` tokens, each starting with BOS.

    The rule (docs/store.md):

    1. Each document is tokenized on its own, without special tokens; text that spells a special
       token (e.g. "<bos>") is tokenized as plain text. Documents with no tokens are dropped.
    2. The stream is the concatenation of ``[BOS] + tokens`` over documents, in order.
    3. Rows are cut from the stream one after another. A row starting where the stream has a
       document's BOS takes ``seq_len`` stream tokens (that BOS is the row's first token);
       otherwise the row is a BOS followed by the next ``seq_len - 1`` stream tokens.
    4. The last, incomplete row is dropped.

    So every row starts with BOS, BOS never appears twice in a row, and removing the BOS tokens
    from the rows gives the documents' tokens, in order, with none lost or repeated.
    Documents are tokenized in batches (fast tokenizers run them in parallel).
    """
    if seq_len < 2:
        raise UserError(f"sequence length {seq_len} is too short: use at least 2")
    buf: list[int] = []  # stream tokens not yet in a row
    for batch in _batches(docs, batch_docs, batch_chars):
        for toks in encode_texts(tokenizer, batch):
            if toks:
                buf.append(bos_id)
                buf.extend(toks)
        pos = 0
        while True:
            take = seq_len if buf[pos:pos + 1] == [bos_id] else seq_len - 1
            if len(buf) - pos < take:
                break
            row = np.empty(seq_len, dtype=np.int64)
            row[0] = bos_id
            row[seq_len - take:] = buf[pos:pos + take]
            pos += take
            yield row
        del buf[:pos]


def _batches(docs: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch

"""Text sources and packing: documents in a fixed order -> BOS-started token sequences.

A dataset spec is one of:

- ``python-docs``: an embedded corpus made from documentation text that ships inside CPython's
  standard library, read without a download: the ``pydoc_data.topics`` help topics (sorted by
  name), then the docstrings of every stdlib source file (files in sorted path order; read with
  ``ast``, nothing imported; test folders skipped). It depends only on the Python version. The
  first use saves it under the user cache folder (parsing the stdlib takes about 4 s); later uses
  read that copy.
- a local file or folder of ``.txt`` (one document per file), ``.jsonl`` or ``.parquet`` (one
  document per record, from the text column), loaded through ``datasets`` (streaming). A folder
  is searched recursively; its files are read in sorted path order, grouped by kind (all .txt,
  then all .jsonl, then all .parquet).
- anything else: a Hugging Face dataset id, streamed with ``datasets.load_dataset``.

The same spec always gives the same documents in the same order, which lets a resumed cache
re-read the stream from the start and skip what is already written.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from pipeline.util import UserError, user_cache_dir, write_file_atomic

PYTHON_DOCS = "python-docs"
_PYTHON_DOCS_FORMAT = 1   # bump when the extraction below changes, so saved copies are redone
# File suffix -> `datasets` builder; the order here is the order kinds are read within a folder.
LOCAL_KINDS = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
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
    for folder, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            suffix = Path(name).suffix
            if suffix in LOCAL_KINDS and not name.startswith("."):
                found.setdefault(suffix, []).append((Path(folder) / name).resolve())
    if not found:
        raise UserError(f"dataset {spec}: the folder has no .txt, .jsonl or .parquet files")
    return {k: sorted(found[k], key=lambda p: p.as_posix()) for k in LOCAL_KINDS if k in found}


def _iter_local(spec: str, text_column: str) -> Iterator[str]:
    from datasets import load_dataset

    for suffix, files in local_files(spec).items():
        builder = LOCAL_KINDS[suffix]
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
        except Exception as e:
            raise UserError(f"dataset {spec}: could not read the {suffix} files: {_one_line(e)}") from None
        column = "text" if builder == "text" else text_column
        yield from _column(ds, column, f"dataset {spec} ({suffix} files)")


def _iter_hub(spec: str, split: str, config: str | None, text_column: str) -> Iterator[str]:
    """Open the hub dataset now (so an unreachable id fails at once), read it lazily."""
    from datasets import load_dataset

    try:
        ds = load_dataset(spec, config, split=split, streaming=True)
    except Exception as e:
        raise UserError(f"could not open dataset {spec} (config {config}, split {split}) from the Hugging Face hub "
                        f"(no network, no access, or a wrong id/config/split): {_one_line(e)}") from None
    return _column(ds, text_column, f"dataset {spec}")


def _column(ds: Any, column: str, what: str) -> Iterator[str]:
    """The text column of a streamed dataset; UserError naming the columns if it is missing."""
    for row in ds:
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
                   text_column: str = "text") -> Iterator[str]:
    """Documents of `spec` (see the module docstring), always in the same order.

    Errors a user can fix raise UserError: a missing path, a folder without usable files or an
    unreachable hub id at once; a missing or non-text column at the first ``next()``.
    """
    if spec == PYTHON_DOCS:
        return _iter_python_docs()
    if _is_local(spec):
        local_files(spec)  # fail now, not at the first next()
        return _iter_local(spec, text_column)
    return _iter_hub(spec, split, config, text_column)


def describe_dataset(spec: str, split: str = "train", config: str | None = None,
                     text_column: str = "text") -> dict:
    """What a store records about its text source."""
    if spec == PYTHON_DOCS:
        return {"kind": PYTHON_DOCS, "spec": spec, "python": sys.version.split()[0]}
    if _is_local(spec):
        files = local_files(spec)
        return {"kind": "local", "spec": spec, "path": str(Path(os.path.expanduser(spec)).resolve()),
                "files": [str(f) for k in files for f in files[k]], "text_column": text_column}
    return {"kind": "hf", "spec": spec, "config": config, "split": split, "text_column": text_column}


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

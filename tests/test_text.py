"""Text sources (python-docs, local files, the hub) and the packing of documents into sequences."""
from __future__ import annotations

import itertools

import json
import os
import socket
import sys

import numpy as np
import pytest

from pipeline.models import load_tokenizer
from pipeline.text import (describe_dataset, encode_texts, extract_python_docs, iter_documents, pack_sequences,
                           prescan, python_docs_file, source_change)
from pipeline.util import UserError

BOS = 2
DOCS = [
    "The first document is short.",
    "",  # empty: no tokens, no BOS
    "A document that spells <bos> and <eos> as text must not produce special tokens.",
    "naïve café 日本語 ✓ " * 7,
    "x" * 300,  # longer than several rows
    "def f(x):\n    return x + 1\n",
    "end",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _doc_tokens(tok, docs):
    """Each document tokenized on its own: the reference the packed rows must match."""
    return [tok(d, add_special_tokens=False, split_special_tokens=True)["input_ids"] for d in docs]


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_packing_follows_the_documented_rule(tok, seq_len):
    rows = list(pack_sequences(DOCS, tok, seq_len, BOS, batch_docs=3))
    assert rows and all(r.dtype == np.int64 and r.shape == (seq_len,) for r in rows)
    # The rule, replayed on the tokenizer's own output for each document.
    stream = [t for ids in _doc_tokens(tok, DOCS) if ids for t in [BOS] + ids]
    pos = 0
    for row in rows:
        expected = stream[pos:pos + seq_len] if stream[pos] == BOS else [BOS] + stream[pos:pos + seq_len - 1]
        assert row.tolist() == expected
        pos += seq_len if stream[pos] == BOS else seq_len - 1
    assert len(stream) - pos < seq_len  # only the last partial row was dropped


@pytest.mark.parametrize("seq_len", [2, 5, 16])
def test_packed_rows_hold_every_token_once(tok, seq_len):
    rows = np.stack(list(pack_sequences(DOCS, tok, seq_len, BOS)))
    assert (rows[:, 0] == BOS).all()
    assert not ((rows[:, 1:] == BOS) & (rows[:, :-1] == BOS)).any()  # never BOS, BOS
    content = rows[rows != BOS].tolist()
    all_tokens = [t for ids in _doc_tokens(tok, DOCS) for t in ids]
    assert BOS not in all_tokens  # "<bos>" in the text stayed text
    assert content == all_tokens[:len(content)]
    assert len(all_tokens) - len(content) < seq_len
    assert tok.decode(all_tokens) == "".join(DOCS)  # and those tokens are the text


def test_packing_is_deterministic_and_batch_independent(tok):
    docs = list(itertools.islice(iter_documents("python-docs"), 40))
    a = list(pack_sequences(docs, tok, 128, BOS))
    b = list(pack_sequences(iter(docs), tok, 128, BOS, batch_docs=1))
    c = list(pack_sequences(docs, tok, 128, BOS, batch_docs=1000, batch_chars=10_000))
    assert len(a) > 100
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a, b, c))
    assert len(a) == len(b) == len(c)


def test_no_text_gives_no_sequences(tok):
    assert list(pack_sequences([], tok, 16, BOS)) == []
    assert list(pack_sequences(["", ""], tok, 16, BOS)) == []
    assert list(pack_sequences(["too short"], tok, 64, BOS)) == []
    with pytest.raises(UserError):
        list(pack_sequences(DOCS, tok, 1, BOS))


def test_python_docs_corpus(tok, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("python-docs must not use the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setenv("TC_CACHE_DIR", str(tmp_path))
    saved = python_docs_file()
    assert not saved.exists()
    docs = list(iter_documents("python-docs"))   # extracts and saves the corpus
    assert saved.exists() and str(saved).startswith(str(tmp_path))
    assert list(extract_python_docs()) == docs   # the saved copy is the stdlib's text, document for document
    assert list(iter_documents("python-docs")) == docs   # read back from the saved copy
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("TC_CACHE_DIR", str(blocked))   # cannot save: still reads the stdlib
    assert next(iter_documents("python-docs")) == docs[0]
    from pydoc_data.topics import topics

    assert docs[:len(topics)] == [topics[k] for k in sorted(topics)]
    assert any(d.startswith("json\n") and "JSON" in d for d in docs)  # stdlib docstrings follow
    assert "antigravity" not in sys.modules  # read with ast, never imported
    assert sum(len(d) for d in docs) > 1_500_000
    n_tokens = sum(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
    assert n_tokens > 300_000
    assert describe_dataset("python-docs")["kind"] == "python-docs"


@pytest.fixture
def corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second file\n\nwith a blank line\n")
    (root / "a.txt").write_text("first file")
    (root / "sub" / "c.txt").write_text("nested file")
    (root / "notes.md").write_text("ignored")
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "n": i}) for i, t in enumerate(["j0", "j1"])))
    pq.write_table(pa.table({"text": ["p0", None, "p1"], "body": ["x", "y", "z"], "n": [1, 2, 3]}),
                   root / "e.parquet")
    return root


def test_local_files_and_folders(corpus):
    assert list(iter_documents(str(corpus / "a.txt"))) == ["first file"]
    assert list(iter_documents(str(corpus / "b.txt"))) == ["second file\n\nwith a blank line\n"]  # one doc per file
    assert list(iter_documents(str(corpus / "d.jsonl"))) == ["j0", "j1"]
    assert list(iter_documents(str(corpus / "e.parquet"))) == ["p0", "p1"]
    assert list(iter_documents(str(corpus / "e.parquet"), text_column="body")) == ["x", "y", "z"]
    # A folder: .txt files (sorted, recursive), then .jsonl, then .parquet; other files ignored.
    everything = ["first file", "second file\n\nwith a blank line\n", "nested file", "j0", "j1", "p0", "p1"]
    assert list(iter_documents(str(corpus))) == everything
    assert list(iter_documents(str(corpus))) == everything  # same order every time
    info = describe_dataset(str(corpus))
    assert info["kind"] == "local" and [p.rsplit("/", 1)[-1] for p in info["files"]] == [
        "a.txt", "b.txt", "c.txt", "d.jsonl", "e.parquet"]


def test_local_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        iter_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="no such file"):
        iter_documents("./missing-folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet"):
        iter_documents(str(empty))
    with pytest.raises(UserError, match="unsupported file type"):
        iter_documents(str(empty / "x.csv"))
    with pytest.raises(UserError, match=r"no column 'body'.*\['n', 'text'\]"):
        list(iter_documents(str(corpus / "d.jsonl"), text_column="body"))
    with pytest.raises(UserError, match="int values, not text"):
        list(iter_documents(str(corpus / "e.parquet"), text_column="n"))


def test_hub_dataset_offline_is_user_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HuggingFaceFW/fineweb-edu") as err:
        iter_documents("HuggingFaceFW/fineweb-edu")  # fails at once, not at the first document
    assert "\n" not in str(err.value)
    assert describe_dataset("HuggingFaceFW/fineweb-edu", "train", None)["kind"] == "hf"


@pytest.mark.parametrize("model", ["tiny", pytest.param("gemma-3-270m", marks=pytest.mark.slow)])
def test_fast_encoding_equals_the_tokenizer_call(model):
    tok = load_tokenizer(model)
    texts = DOCS + list(itertools.islice(iter_documents("python-docs"), 60))
    texts += ["<bos><eos> <start_of_turn>x", "é 🎉 中文"]
    expected = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    tok.backend_tokenizer.encode_special_tokens = False
    assert encode_texts(tok, texts) == expected
    assert tok.backend_tokenizer.encode_special_tokens is False   # the tokenizer is left as it was


# ---- tc's own .txt/.jsonl reader: the documents `datasets` gives, and one line for a bad file ----

def datasets_documents(spec: str, text_column: str = "text") -> list[str]:
    """The documents as tc read local .txt/.jsonl files before it had its own reader (through
    `datasets`): stores made then resume by re-reading the stream, so it must not change."""
    from datasets import load_dataset

    from pipeline.text import _column, local_files

    docs = []
    for suffix, files in local_files(spec).items():
        builder = {".txt": "text", ".jsonl": "json"}[suffix]
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
        docs += list(_column(ds, "text" if builder == "text" else text_column, "reference"))
    return docs


VALID_TXT = {
    "lf.txt": b"two\nlines\n",
    "crlf.txt": b"windows\r\nline ends\r\n\r\nand a blank one\r\n",
    "cr.txt": b"old mac\rline ends\r",
    "bom.txt": b"\xef\xbb\xbfa BOM first\n",
    "empty.txt": b"",
    "newline_only.txt": b"\n",
    "unicode.txt": "naïve café 日本語 ✓ 🎉\n\ttabbed".encode(),
}
VALID_JSONL = {
    "a_lf.jsonl": b'{"text": "one", "n": 1}\n{"text": "two", "n": 2}\n',
    "b_crlf.jsonl": b'{"text": "crlf one", "n": 3}\r\n{"text": "crlf two", "n": 4}\r\n',
    "c_bom.jsonl": b'\xef\xbb\xbf{"text": "after a BOM", "n": 5}\n',
    "d_blank_lines.jsonl": b'\n{"text": "x", "n": 6}\n\n   \n{"text": "y", "n": 7}',   # no final newline
    "e_unicode.jsonl": '{"text": "日本語 \\u00e9 \\ud83c\\udf89 \\n escaped", "n": 8}\n'.encode(),
    "f_empty_and_null.jsonl": b'{"text": "", "n": 9}\n{"text": null, "n": 10}\n{"text": "kept", "n": 11}\n',
    "g_missing_on_some.jsonl": b'{"text": "has it", "n": 12}\n{"n": 13}\n{"text": "again", "n": 14}\n',
    "h_two_on_a_line.jsonl": b'{"text": "p", "n": 15} {"text": "q", "n": 16}\n{"text": "r", "n": 17}\r{"text": "s", "n": 18}\n',
}
EXTRA_COLUMNS = b'{"text": "with extras", "meta": {"a": [1, 2]}, "tags": ["x"], "score": 0.5}\n' \
                b'{"text": "more", "meta": {"a": []}, "tags": [], "score": 1.5}\n'


@pytest.fixture
def valid_files(tmp_path):
    root = tmp_path / "valid"
    root.mkdir()
    for name, data in {**VALID_TXT, **VALID_JSONL}.items():
        (root / name).write_bytes(data)
    (root / "extra" / "deeper").mkdir(parents=True)
    (root / "extra" / "deeper" / "nested.jsonl").write_bytes(b'{"n": 19, "text": "nested"}\n{"text": "last", "n": 20}')
    return root


def test_own_reader_gives_the_documents_datasets_gives(valid_files):
    files = sorted(valid_files.rglob("*.*"))
    for path in files:
        if path.stat().st_size:   # `datasets` cannot read an empty .jsonl; checked below
            assert list(iter_documents(str(path))) == datasets_documents(str(path)), path.name
    # `datasets` cannot read a folder whose files have different columns: these alone
    extras = valid_files.parent / "extras.jsonl"
    extras.write_bytes(EXTRA_COLUMNS)
    assert list(iter_documents(str(extras))) == datasets_documents(str(extras)) == ["with extras", "more"]
    folder = list(iter_documents(str(valid_files)))
    assert folder == datasets_documents(str(valid_files))
    assert "\ufeffa BOM first\n" in folder and "windows\nline ends\n\nand a blank one\n" in folder
    assert "old mac\nline ends\n" in folder and "after a BOM" in folder and None not in folder
    assert len(folder) == 6 + 2 + 2 + 1 + 2 + 1 + 1 + 2 + 4 + 2   # no empty document, none lost
    (valid_files / "zz_empty.jsonl").write_bytes(b"")
    assert list(iter_documents(str(valid_files / "zz_empty.jsonl"))) == []
    assert list(iter_documents(str(valid_files))) == folder


def test_non_text_fields_are_refused_like_datasets_does(tmp_path):
    for name, data in {"ints.jsonl": b'{"text": 5}\n{"text": 6}\n',
                       "mixed.jsonl": b'{"text": "a"}\n{"text": 5}\n',
                       "lists.jsonl": b'{"text": ["a"]}\n'}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(UserError):
            datasets_documents(str(path))
        with pytest.raises(UserError, match=rf"{name} line \d: field 'text' holds a (int|list), not text"):
            list(iter_documents(str(path)))
    extras = tmp_path / "extras.jsonl"
    extras.write_bytes(b'{"text": "ok", "n": 1}\n{"text": "fine", "n": "not a number"}\n')
    assert list(iter_documents(str(extras))) == ["ok", "fine"]   # other columns are not read


LATIN1 = "café crème, naïve\nsecond line é\n".encode("latin-1")


def _bad_folder(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a_good.txt").write_text("good text")
    (root / "b_latin1.txt").write_bytes(LATIN1)
    (root / "c_binary.txt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    (root / "d.jsonl").write_bytes(b'{"text": "j1"}\n{"text": "caf\xe9"}\n{"text": broken\n[1, 2]\n{"text": "j5"}\n')
    return root


def test_text_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    root = _bad_folder(tmp_path)
    for name, where in (("b_latin1.txt", "line 1"), ("c_binary.txt", "line ")):
        with pytest.raises(UserError, match="--text-errors") as err:
            list(iter_documents(str(root / name)))
        assert str(root / name) in str(err.value) and where in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"d.jsonl line 2 is not UTF-8") as err:
        prescan(str(root / "d.jsonl"))
    with pytest.raises(UserError, match=r"d.jsonl line 3 is not valid JSON.*--text-errors skip"):
        prescan(str(root / "d.jsonl"), text_errors="replace")
    (root / "d.jsonl").write_bytes(b'{"text": "j1"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl line 2 is valid JSON but not an object"):
        list(iter_documents(str(root / "d.jsonl")))
    with pytest.raises(UserError, match="b_latin1.txt"):
        prescan(str(root))   # the folder: the first bad file, in reading order
    with pytest.raises(UserError, match="unknown --text-errors 'ignore'"):
        prescan(str(root), text_errors="ignore")


def test_replace_and_skip_give_the_documents_they_should(tmp_path, capsys):
    root = _bad_folder(tmp_path)
    replaced = list(iter_documents(str(root / "b_latin1.txt"), text_errors="replace"))
    assert replaced == [LATIN1.decode("utf-8", errors="replace")] and "caf\ufffd cr\ufffdme" in replaced[0]
    assert list(iter_documents(str(root / "b_latin1.txt"), text_errors="skip")) == []
    assert list(iter_documents(str(root / "d.jsonl"), text_errors="skip")) == ["j1", "j5"]   # lines 2, 3 and 4 out
    docs = list(iter_documents(str(root), text_errors="skip"))
    assert docs == ["good text", "j1", "j5"]
    prescan(str(root), text_errors="skip")
    said = capsys.readouterr().out
    assert "left out 5 undecodable document(s)" in said and "b_latin1.txt" in said and "and 2 more" in said
    with pytest.raises(UserError, match="d.jsonl line 3 is not valid JSON"):   # replace cannot mend bad JSON
        list(iter_documents(str(root / "d.jsonl"), text_errors="replace"))
    (root / "d.jsonl").write_bytes(b'{"text": "j1"}\n{"text": "caf\xe9"}\n')
    assert list(iter_documents(str(root / "d.jsonl"), text_errors="replace")) == ["j1", "caf\ufffd"]
    info = describe_dataset(str(root), text_errors="replace")
    assert info["undecodable"] == 3 and info["text_errors"] == "replace"


def test_unreadable_and_vanished_files_are_one_line(tmp_path, monkeypatch):
    from pipeline import text

    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("first")
    (root / "b.jsonl").write_text('{"text": "second"}\n')
    (root / "empty.txt").write_text("")
    assert list(iter_documents(str(root))) == ["first", "second"]   # an empty file is no document and no error
    prescan(str(root))
    (root / "a.txt").unlink()   # gone between the scan (the listing) and the read
    listed = {".txt": [root / "a.txt"], ".jsonl": [root / "b.jsonl"]}
    monkeypatch.setattr(text, "local_files", lambda spec: listed)   # the listing made before a.txt went
    docs = iter_documents(str(root))
    with pytest.raises(UserError, match=r"a.txt is gone .*restore it"):
        list(docs)
    real_open = open

    def no_permission(path, *args, **kwargs):
        if str(path).endswith("b.jsonl"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.undo()
    (root / "a.txt").write_text("first")
    monkeypatch.setattr(text, "open", no_permission, raising=False)
    with pytest.raises(UserError, match=r"cannot read .*b.jsonl: Permission denied; fix its permissions"):
        prescan(str(root))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_that_cannot_be_listed_is_one_line(tmp_path):
    root = tmp_path / "c"
    (root / "locked").mkdir(parents=True)
    (root / "a.txt").write_text("first")
    (root / "locked").chmod(0)
    try:
        with pytest.raises(UserError, match="cannot list .*locked"):
            iter_documents(str(root))
    finally:
        (root / "locked").chmod(0o755)


# ---- the identity of a text source ----

def test_local_identity_names_what_changed(valid_files):
    before = describe_dataset(str(valid_files))
    assert len(before["contents"]) == len(before["files"]) and len(before["sha256"]) == 64
    assert source_change(before, describe_dataset(str(valid_files))) is None
    (valid_files / "lf.txt").write_bytes(b"two\nLINES\n")   # same size, other bytes, same list of files
    assert source_change(before, describe_dataset(str(valid_files))) == "1 file(s) changed (lf.txt)"
    (valid_files / "new.txt").write_text("added")
    (valid_files / "cr.txt").unlink()
    change = source_change(before, describe_dataset(str(valid_files)))
    assert "1 file(s) added (new.txt)" in change and "1 file(s) removed (cr.txt)" in change
    assert "1 file(s) changed (lf.txt)" in change
    legacy = {k: v for k, v in before.items() if k not in ("contents", "sha256")}   # a store from before
    assert source_change(legacy, describe_dataset(str(valid_files))) is None


def test_text_errors_is_part_of_the_identity_only_when_it_acted(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    assert source_change(describe_dataset(str(good), text_errors="skip"), describe_dataset(str(good))) is None
    bad = tmp_path / "bad.txt"
    bad.write_bytes(LATIN1)
    change = source_change(describe_dataset(str(bad), text_errors="skip"),
                           describe_dataset(str(bad), text_errors="replace"))
    assert "--text-errors was skip, now replace" in change


def test_python_docs_and_hub_identity(monkeypatch):
    now = describe_dataset("python-docs")
    assert len(now["sha256"]) == 64 and source_change(now, describe_dataset("python-docs")) is None
    other = {**now, "sha256": "0" * 64, "python": "3.10.0"}
    assert "made with Python 3.10.0" in source_change(other, now)
    assert source_change({k: v for k, v in now.items() if k != "sha256"}, now) is None
    hub = describe_dataset("someone/some-data")   # offline in the tests: the revision is not known
    assert hub["revision"] is None and source_change({**hub, "revision": "a" * 40}, hub) is None
    assert "revision aaaaaaaaaaaa to bbbbbbbbbbbb" in source_change({**hub, "revision": "a" * 40},
                                                                    {**hub, "revision": "b" * 40})


def test_a_scan_is_reused_only_while_the_files_are_unchanged(tmp_path):
    path = tmp_path / "old.txt"
    path.write_text("first version")
    os.utime(path, (1_000_000, 1_000_000))   # old enough to be remembered
    first = describe_dataset(str(path))
    assert describe_dataset(str(path)) == first
    path.write_text("other version")   # same size
    os.utime(path, (2_000_000, 2_000_000))
    assert source_change(first, describe_dataset(str(path))) == "1 file(s) changed (old.txt)"


def test_two_writes_with_one_mtime_are_told_apart(tmp_path):
    import time

    path = tmp_path / "young.txt"
    now = time.time_ns()
    path.write_text("first version")
    os.utime(path, ns=(now, now))
    first = describe_dataset(str(path))
    path.write_text("other version")   # same size, and the clock did not tick between the writes
    os.utime(path, ns=(now, now))
    assert source_change(first, describe_dataset(str(path))) == "1 file(s) changed (young.txt)"

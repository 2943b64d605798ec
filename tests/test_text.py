"""Text sources (python-docs, local files, the hub) and the packing of documents into sequences."""
from __future__ import annotations

import itertools

import json
import socket
import sys

import numpy as np
import pytest

from pipeline.models import load_tokenizer
from pipeline.text import (describe_dataset, encode_texts, extract_python_docs, iter_documents, pack_sequences,
                           python_docs_file)
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

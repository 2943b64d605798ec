"""Sample contexts: the text around an activating row, rebuilt from the store's token ids.

Shared by the training collector, the exact pass's readers, the JSON/HTML export and
`tc samples show`. Never needs the model or the tokenizer: the store holds the vocabulary.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import numpy as np

from pipeline.store import FLAG_BOS, Store

MARK_LEFT, MARK_RIGHT = "\u00ab", "\u00bb"   # « » around the activating token in plain text


def context_starts(rows: np.ndarray, flags: np.ndarray, seq_len: int, n_ctx: int) -> np.ndarray:
    """First row of each sample's context. The context of row r is rows [start, r]: at most n_ctx
    rows, never before the first row of r's sequence (r - r % seq_len), and never before the last
    BOS row at or before r (a BOS inside a sequence starts a new document; the BOS itself is kept
    so the reader sees where the document begins)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return rows.copy()
    back = np.arange(n_ctx - 1, -1, -1, dtype=np.int64)                  # (n_ctx,) oldest .. r itself
    win = rows[:, None] - back[None, :]                                    # (S, n_ctx)
    seq_start = rows - rows % seq_len
    inside = win >= seq_start[:, None]
    is_bos = inside & ((flags[np.maximum(win, 0)] & FLAG_BOS) != 0)
    last_bos = np.where(is_bos, win, -1).max(axis=1)
    return np.maximum.reduce([rows - n_ctx + 1, seq_start, last_bos])


def context_ends(rows: np.ndarray, flags: np.ndarray, seq_len: int, n_after: int) -> np.ndarray:
    """Last row of the text shown after each sample's activating row r: at most n_after rows past r,
    never past the last row of r's sequence (the next row of the store is unrelated text) nor into
    the next document (a BOS after r). Returns r itself when nothing follows."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0 or n_after <= 0:
        return rows.copy()
    ahead = np.arange(1, n_after + 1, dtype=np.int64)                      # (n_after,)
    win = rows[:, None] + ahead[None, :]                                   # (S, n_after)
    seq_end = np.minimum(rows - rows % seq_len + seq_len, len(flags)) - 1  # last row of r's sequence
    inside = win <= seq_end[:, None]
    is_bos = inside & ((flags[np.minimum(win, len(flags) - 1)] & FLAG_BOS) != 0)
    next_bos = np.where(is_bos, win, np.iinfo(np.int64).max).min(axis=1)
    return np.minimum.reduce([rows + n_after, seq_end, next_bos - 1])


def build_context(row: int, start: int, tokens: np.ndarray, vocab: list[str], end: int | None = None
                  ) -> dict[str, Any]:
    """One sample's context: token ids and texts of rows [start, row]; the activating token is last.
    With `end` (> row), also the ids and texts of rows (row, end]: the text after it."""
    ids = tokens[start:row + 1].astype(np.int64).tolist()
    toks = [token_text(vocab, i) for i in ids]
    rec = {"row": int(row), "context_start": int(start), "token_id": ids[-1], "token": toks[-1],
           "token_ids": ids, "tokens": toks, "text": "".join(toks),
           "marked": "".join(toks[:-1]) + MARK_LEFT + toks[-1] + MARK_RIGHT}
    if end is not None:
        after = tokens[row + 1:end + 1].astype(np.int64).tolist()
        rec.update(after_ids=after, after_tokens=[token_text(vocab, i) for i in after])
    return rec


def token_text(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) else f"<id {i}>"


def contexts_for(rows: Iterable[int], store: Store, n_ctx: int, vocab: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    rows = np.asarray(list(rows), dtype=np.int64)
    vocab = vocab if vocab is not None else store.vocab()
    starts = context_starts(rows, store.flags, store.seq_len, n_ctx)
    return [build_context(int(r), int(s), store.tokens, vocab) for r, s in zip(rows, starts)]


def top_tokens(token_ids: np.ndarray, vocab: list[str], k: int = 5) -> list[dict[str, Any]]:
    """The most common activating tokens: [{token_id, token, count}], most common first."""
    return [{"token_id": int(t), "token": token_text(vocab, int(t)), "count": c}
            for t, c in Counter(np.asarray(token_ids).tolist()).most_common(k)]

"""Tokenization: what identifies a tokenizer, and texts to unpadded input ids, once per split.

Texts are read from Arrow in slices (never ``list(dataset[column])``: ~10 us a row), tokenized a slice at a
time, and each slice's ids go straight into flat arrays (:class:`kdkit.store.tokens.TokenArrays`), so the Python
lists a tokenizer returns (~4.7 KB a row) never exist for more than :data:`ENCODE_SLICE_ROWS` rows at once. With
a :class:`~kdkit.store.tokens.TokenStore` a split is tokenized once and read back by every later stage and run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdkit.store.hashing import arrow_column, hash_json
from kdkit.store.logits import split_fingerprint
from kdkit.store.tokens import ATTENTION_MASK, TokenArrays, TokenStore, tokens_key

#: Rows tokenized per tokenizer call. A tokenizer returns Python lists (~4.7 KB a row for sentence pairs), so a
#: slice costs ~10 MB while it is converted; the calls' overhead is already small at this size.
ENCODE_SLICE_ROWS = 2048


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides how text becomes input ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation / padding in the backend's JSON change whenever the tokenizer is called with other
        # settings; they are call arguments, not part of the tokenizer
        parsed = json.loads(backend.to_str())
        parsed.pop("truncation", None)
        parsed.pop("padding", None)
        body = json.dumps(parsed, sort_keys=True)
    else:  # a slow tokenizer: its vocabulary and settings
        body = repr(sorted(tokenizer.get_vocab().items()))
    return hash_json(
        {
            "class": type(tokenizer).__name__,
            "body": body,
            "padding_side": getattr(tokenizer, "padding_side", None),
            "truncation_side": getattr(tokenizer, "truncation_side", None),
            "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        },
        length=32,
    )


def encode(tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int) -> TokenArrays:
    """Tokenize the text column(s) of ``dataset`` (one column, or two as a sentence pair), truncated to
    ``max_length`` tokens and not padded: padding happens per batch."""
    return encode_rows(tokenizer, dataset, text_columns, max_length, 0, len(dataset))


def input_names(tokenizer: Any, text_columns: Sequence[str]) -> list[str]:
    """The model inputs a split's tokens keep: those the tokenizer returns and its model takes, minus the
    attention mask (all ones on unpadded rows; padding makes it). The same on every process, whatever its rows."""
    probe = tokenizer(*[["a"] for _ in text_columns], truncation=True, max_length=8)
    return [n for n in tokenizer.model_input_names if n in probe and n != ATTENTION_MASK]


def encode_rows(
    tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int, start: int, stop: int
) -> TokenArrays:
    """Rows ``[start, stop)`` of ``dataset`` tokenized (see :func:`encode`), a slice of
    :data:`ENCODE_SLICE_ROWS` rows at a time, read through Arrow."""
    names = input_names(tokenizer, text_columns)
    columns = [arrow_column(dataset, c) for c in text_columns]
    parts = []
    for begin in range(start, stop, ENCODE_SLICE_ROWS):
        count = min(ENCODE_SLICE_ROWS, stop - begin)
        texts = [column.slice(begin, count).to_pylist() for column in columns]
        # without padding a tokenizer's attention mask is all ones: it is not kept (padding makes it again)
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, return_attention_mask=False)
        parts.append(TokenArrays.from_rows({name: encoded[name] for name in names}))
    return TokenArrays.concat(parts, consume=True) if parts else TokenArrays.empty(names)


def tokenized(
    tokenizer: Any,
    dataset: Any,
    text_columns: Sequence[str],
    max_length: int,
    store: TokenStore | None,
    *,
    label: str = "split",
    tokenizer_hash: str | None = None,
) -> TokenArrays:
    """``dataset`` tokenized: read from ``store`` when an earlier stage or run tokenized it with the same
    tokenizer, texts and ``max_length``, else tokenized (by every process of the run, a share each) and kept
    there. Without a store: tokenized here, by this process alone."""
    if store is None:
        return encode(tokenizer, dataset, text_columns, max_length)
    key = tokens_key(
        tokenizer_hash=tokenizer_hash or tokenizer_fingerprint(tokenizer),
        split_hash=split_fingerprint(dataset, text_columns),
        text_columns=text_columns,
        max_length=max_length,
        input_names=input_names(tokenizer, text_columns),
    )

    def build(start: int, stop: int) -> TokenArrays:
        return encode_rows(tokenizer, dataset, text_columns, max_length, start, stop)

    return store.load_or_build(key, len(dataset), build, label=label, info={"max_length": str(max_length)})


#: Share of a split's tokens that may be the unknown token before kdkit warns: a wrong tokenizer for the data
#: (a vocabulary of another language, a word-level vocabulary built from other text) shows up as most tokens
#: unknown, and training on it learns nothing.
UNKNOWN_WARNING_SHARE = 0.5


def unknown_share(tokenizer: Any, encoded: Mapping[str, Sequence[Sequence[int]]]) -> float:
    """The share of the (non-special) tokens of ``encoded`` that are the tokenizer's unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(encoded, TokenArrays):
        ids = encoded.columns["input_ids"].astype(np.int64) if "input_ids" in encoded.columns else np.zeros(0)
    else:
        rows = encoded.get("input_ids") or []
        ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0)
    if unk is None or not ids.size:
        return 0.0
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if i != unk]
    ids = ids[~np.isin(ids, special)] if special else ids
    return float((ids == unk).mean()) if ids.size else 0.0


def mostly_unknown(tokenizer: Any, encoded: Mapping[str, Sequence[Sequence[int]]], who: str, split: str) -> str | None:
    """A warning when most tokens of a split are unknown to ``tokenizer``, else None."""
    share = unknown_share(tokenizer, encoded)
    if share <= UNKNOWN_WARNING_SHARE:
        return None
    return (
        f"{who}: the tokenizer maps {100 * share:.0f}% of the {split} split's tokens to its unknown token "
        f"({tokenizer.unk_token!r}); is it the right tokenizer for this data?"
    )

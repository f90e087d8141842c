"""Data of causal-LM runs: documents, prompt / completion pairs or chat conversations, split the paper's way.

:func:`load_lm_splits` reads the ``[data]`` table of a ``task = "causal-lm"`` recipe (local files or a hub
dataset, as for classification) and returns the same :class:`~kdkit.data.splits.Splits` as
:func:`~kdkit.data.splits.load_splits`, so that the stages handle both alike:

* the text columns are the format's (``data.format``): ``["text"]`` (plain text: every token is a target),
  ``["prompt", "completion"]`` (any two names: the completion's tokens are targets, the prompt's are not) or
  ``["messages"]`` (chat: a list of ``{"role", "content"}``, kept as its JSON text; the assistant's tokens are
  targets);
* ``label`` is 0 on a row that keeps its targets and ``-100`` on an **unlabeled** row, whose completion (for plain
  text: everything after its first ``data.prompt_tokens`` tokens; for chat: the last assistant message) is dropped
  and written by the teachers instead (:mod:`kdkit.data.tokens` makes the prompts);
* ``label_names`` is empty.

The split is :func:`~kdkit.data.splits.load_splits`' own, with the same seeds: a ``labeled_fraction`` of the
training rows keeps its completions, a ``tune_fraction`` of those is held out, the eval split keeps everything.
The fingerprint covers the rows, the split and the settings that change how rows become token sequences
(``format``, ``prompt_tokens``, ``overflow``, ``max_length``).

Nothing is dropped silently: a missing column, an empty text, a conversation without an assistant message or a
message that is not ``{"role": str, "content": str}`` is a :class:`~kdkit.errors.DataError` naming the file or
split, the column and the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from kdkit.data.splits import (
    Splits,
    _check_fractions,
    _check_text,
    _fingerprint,
    _load_sources,
    _split_indices,
    _subsample,
    _SUBSAMPLE_EVAL,
)
from kdkit.errors import DataError, did_you_mean
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.recipe.schema import DataConfig
from kdkit.store.hashing import hash_json

__all__ = ["lm_format", "load_lm_splits", "messages_of"]

#: The roles a chat message may have.
ROLES = ("system", "user", "assistant", "tool")


def lm_format(cfg: DataConfig) -> str:
    """``data.format``, or the default for the number of text columns: ``text`` for one, ``prompt-completion``
    for two."""
    return cfg.format or ("text" if len(cfg.text) == 1 else "prompt-completion")


def messages_of(value: str) -> list[dict[str, str]]:
    """A chat row's messages from the JSON text the splits keep them as."""
    return json.loads(value)


def _check_messages(value: Any, where: str, row: int, column: str) -> str:
    """One conversation, checked, as canonical JSON text (keys sorted; only role and content kept)."""
    place = f"{where}, row {row}: column '{column}'"
    if not isinstance(value, list) or not value:
        raise DataError(f"{place} must be a non-empty list of messages {{\"role\": ..., \"content\": ...}}, got "
                        f"{type(value).__name__}")  # fmt: skip
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise DataError(f"{place}, message {i}: must hold a text 'role' and a text 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(
                f"{place}, message {i}: unknown role {message['role']!r}{did_you_mean(message['role'], ROLES)}; "
                f"use one of {', '.join(ROLES)}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{place}: the conversation has no assistant message, so nothing to learn or to generate")
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _lm_table(ds: datasets.Dataset, cfg: DataConfig, fmt: str, where: str) -> pa.Table:
    """The rows of one split as ``text columns + label (0) + row``, every value checked."""
    available = list(ds.column_names)
    for column in cfg.text:
        if column not in available:
            raise DataError(
                f"{where}: no column '{column}' (data.text){did_you_mean(column, available)}; "
                f"available columns: {', '.join(available)}"
            )
    if ds.num_rows == 0:
        raise DataError(f"{where}: the split is empty (0 rows)")
    columns: dict[str, Any] = {}
    if fmt == "chat":
        column = cfg.text[0]
        texts = [_check_messages(value, where, row, column) for row, value in enumerate(ds[column])]
        columns[column] = pa.array(texts, type=pa.string())
    else:
        arrow = ds.with_format("arrow")
        for column in cfg.text:
            _check_text(ds, column, where)
            columns[column] = arrow[column]
    columns["label"] = pa.array(np.zeros(ds.num_rows, dtype=np.int64))
    columns["row"] = pa.array(np.arange(ds.num_rows, dtype=np.int64))
    return pa.table(columns)


def load_lm_splits(cfg: DataConfig, need_unlabeled: bool = True, *, base_dir: str | Path | None = None) -> Splits:
    """Load, check and split the data of a causal-LM recipe (module docstring).

    :param need_unlabeled: the run distills on unlabeled rows (teacher-written continuations), so
        ``labeled_fraction`` must leave some.
    :raises DataError: naming the file or split, the column and the row of the first problem found.
    """
    _check_fractions(cfg, need_unlabeled)
    fmt = lm_format(cfg)
    if cfg.train_split == cfg.eval_split:
        raise DataError(f"data.train_split and data.eval_split are both '{cfg.train_split}': evaluate on other rows")
    sources = _load_sources(cfg, Path(base_dir) if base_dir is not None else None)
    tables = {split: _lm_table(ds, cfg, fmt, where) for split, (ds, where) in sources.items()}
    train_table, eval_table = tables[cfg.train_split], tables[cfg.eval_split]
    train_where = sources[cfg.train_split][1]
    labeled_idx, unlabeled_idx, tune_idx = _split_indices(train_table.num_rows, cfg, need_unlabeled, train_where)
    eval_idx = _subsample(eval_table.num_rows, cfg.max_eval_samples, cfg.split_seed, _SUBSAMPLE_EVAL)
    unlabeled = train_table.take(unlabeled_idx)
    hidden = pa.array(np.full(len(unlabeled_idx), IGNORE_INDEX, dtype=np.int64))
    unlabeled = unlabeled.set_column(unlabeled.schema.get_field_index("label"), "label", hidden)
    parts = {"labeled": labeled_idx, "unlabeled": unlabeled_idx, "tune": tune_idx, "eval": eval_idx}
    rows_hash = _fingerprint(cfg, [], train_table, eval_table, parts)
    settings = {"task": "causal-lm", "format": fmt, "prompt_tokens": cfg.prompt_tokens, "overflow": cfg.overflow}
    return Splits(
        labeled=datasets.Dataset(train_table.take(labeled_idx)),
        unlabeled=datasets.Dataset(unlabeled),
        tune=datasets.Dataset(train_table.take(tune_idx)) if tune_idx is not None else None,
        eval=datasets.Dataset(eval_table.take(eval_idx)),
        text_columns=list(cfg.text),
        label_names=[],
        fingerprint=hash_json({"rows": rows_hash, **settings}, length=64),
    )

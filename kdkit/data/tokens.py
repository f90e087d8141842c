"""Causal-LM rows to token sequences, each token marked as a target (its gold value is known), generated (a teacher
wrote it) or neither (a prompt, a chat template's markup).

One convention throughout (the top-k store's, :mod:`kdkit.store.topk`): a sequence of L tokens has L - 1
positions, and position t predicts token t + 1. Position t is **labeled** when token t + 1 is a target, and
**unlabeled** when token t + 1 was generated; every other position is ignored. :meth:`TokenSequences.labels`
turns the marks into the ``labels`` / ``generated`` rows that :class:`kdkit.TokenDistillationLoss` takes.

What is a target, by ``data.format``:

* ``text``: every token after the first; the tokenizer's end-of-sequence token is appended, so the model learns
  where a document ends. Longer than ``max_length`` tokens: cut (``overflow = "truncate"``) or split into windows
  of ``max_length`` tokens that overlap by one token (``"split"``), so every token after the first is predicted
  exactly once;
* ``prompt-completion``: the completion's tokens (tokenized on its own, the end-of-sequence token appended) after
  the prompt's (tokenized with the tokenizer's special tokens); cut at ``max_length``;
* ``chat``: the messages rendered with the tokenizer's chat template; the tokens of each assistant message (the
  template's text from after the generation prompt up to and including its end-of-turn markup) are targets.
  The template must render each conversation as an extension of its prefixes (checked row by row).

An **unlabeled** row becomes a prompt: its first ``data.prompt_tokens`` tokens (plain text; at most all but one),
its prompt (prompt-completion), or the conversation up to its last assistant message followed by the template's
generation prompt (chat). The teachers write the rest (:mod:`kdkit.modeling.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdkit.data.lm import messages_of
from kdkit.errors import DataError
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.store.topk import sequence_key


@dataclass
class TokenSequences:
    """Token sequences with per-token marks; ``rows[i]``: the split row sequence i came from."""

    ids: list[np.ndarray] = field(default_factory=list)  #: int32 tokens
    targets: list[np.ndarray] = field(default_factory=list)  #: bool per token: its gold value is a training target
    generated: list[np.ndarray] = field(default_factory=list)  #: bool per token: written by a teacher
    rows: list[int] = field(default_factory=list)
    _keys: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[int], targets: Sequence[bool], row: int, generated: Sequence[bool] | None = None) -> None:
        self.ids.append(np.asarray(ids, dtype=np.int32))
        self.targets.append(np.asarray(targets, dtype=bool))
        self.generated.append(np.zeros(len(ids), dtype=bool) if generated is None else np.asarray(generated, dtype=bool))
        self.rows.append(int(row))
        self._keys = None

    @property
    def keys(self) -> list[str]:
        """Each sequence's content key (:func:`kdkit.store.topk.sequence_key`)."""
        if self._keys is None:
            self._keys = [sequence_key(ids) for ids in self.ids]
        return self._keys

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels [L - 1] int64, generated [L - 1] bool)`` of sequence ``i``: position t's gold token (token
        t + 1) where it is a target, else -100; and whether token t + 1 was generated."""
        ids, targets, gen = self.ids[i], self.targets[i], self.generated[i]
        labels = np.where(targets[1:], ids[1:].astype(np.int64), IGNORE_INDEX)
        return labels, gen[1:].copy()

    def position_count(self) -> tuple[int, int]:
        """``(labeled, unlabeled)`` positions over all sequences."""
        labeled = sum(int(t[1:].sum()) for t in self.targets)
        unlabeled = sum(int(g[1:].sum()) for g in self.generated)
        return labeled, unlabeled

    @staticmethod
    def concat(parts: Sequence[TokenSequences]) -> TokenSequences:
        out = TokenSequences()
        for part in parts:
            out.ids += part.ids
            out.targets += part.targets
            out.generated += part.generated
            out.rows += part.rows
        return out


@dataclass(frozen=True)
class Encoding:
    """How rows become tokens: the format and the ``[data]`` settings that shape sequences."""

    format: str
    max_length: int
    overflow: str = "truncate"
    prompt_tokens: int = 32


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def _where(split: str, row: int) -> str:
    return f"split '{split}', row {row}"


def encode_split(
    tokenizer: Any, dataset: Any, text_columns: Sequence[str], encoding: Encoding, *, split: str, prompts: bool
) -> TokenSequences:
    """The token sequences of a split's rows (``prompts``: the prompts of unlabeled rows instead).

    :raises DataError: naming the split and row of a prompt that leaves no room for a continuation in
        ``max_length``, or of a conversation the chat template cannot render.
    """
    rows = [int(r) for r in dataset["row"]]
    columns = [list(dataset[c]) for c in text_columns]
    if encoding.format == "text":
        return _encode_text(tokenizer, columns[0], rows, encoding, split=split, prompts=prompts)
    if encoding.format == "prompt-completion":
        return _encode_pairs(tokenizer, columns[0], columns[1], rows, encoding, split=split, prompts=prompts)
    return _encode_chats(tokenizer, columns[0], rows, encoding, split=split, prompts=prompts)


def _encode_text(
    tokenizer: Any, texts: list[str], rows: list[int], encoding: Encoding, *, split: str, prompts: bool
) -> TokenSequences:
    out = TokenSequences()
    eos, length = _eos(tokenizer), encoding.max_length
    for ids, row in zip(tokenizer(texts)["input_ids"], rows, strict=True):
        ids = list(ids) + eos
        if prompts:
            cut = max(1, min(encoding.prompt_tokens, len(ids) - 1))
            out.add(ids[:cut], [False] * cut, row)
        elif encoding.overflow == "split":
            for start in range(0, max(len(ids) - 1, 1), length - 1):  # windows overlap by one token
                window = ids[start : start + length]
                if len(window) >= 2:
                    out.add(window, [False] + [True] * (len(window) - 1), row)
        else:
            window = ids[:length]
            out.add(window, [False] + [True] * (len(window) - 1), row)
    return out


def _encode_pairs(
    tokenizer: Any, prompts_: list[str], completions: list[str], rows: list[int], encoding: Encoding, *, split: str,
    prompts: bool,
) -> TokenSequences:
    out = TokenSequences()
    eos, length = _eos(tokenizer), encoding.max_length
    prompt_ids = tokenizer(prompts_)["input_ids"]
    completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    for p, c, row in zip(prompt_ids, completion_ids, rows, strict=True):
        p = list(p)
        if len(p) >= length:
            raise DataError(
                f"{_where(split, row)}: the prompt alone has {len(p)} tokens, no room for a completion in "
                f"data.max_length = {length}"
            )
        if prompts:
            out.add(p, [False] * len(p), row)
        else:
            c = list(c) + eos
            ids = (p + c)[:length]
            out.add(ids, ([False] * len(p) + [True] * len(c))[:length], row)
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], where: str, **kwargs: Any) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # jinja errors, a missing template (ValueError): the data or the tokenizer, not kdkit
        raise DataError(f"{where}: the tokenizer's chat template cannot render it ({type(exc).__name__}: {exc})") from None


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant messages (each from after the
    generation prompt to the end of its turn)."""
    full = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        after = _render(tokenizer, messages[: i + 1], where)
        if not (full.startswith(before) and full.startswith(after) and after.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render the conversation as an extension of its first {i + 1} "
                "message(s), so the assistant's tokens cannot be told apart"
            )
        spans.append((len(before), len(after)))
    return full, spans


def _encode_chats(
    tokenizer: Any, values: list[str], rows: list[int], encoding: Encoding, *, split: str, prompts: bool
) -> TokenSequences:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format = 'chat' needs a tokenizer with a chat template; this one has none")
    out = TokenSequences()
    length = encoding.max_length
    for value, row in zip(values, rows, strict=True):
        where = _where(split, row)
        messages = messages_of(value)
        if prompts:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            text = _render(tokenizer, messages[:last], where, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                raise DataError(f"{where}: the prompt alone has {len(ids)} tokens, no room for a reply in "
                                f"data.max_length = {length}")  # fmt: skip
            out.add(ids, [False] * len(ids), row)
            continue
        full, spans = _assistant_spans(tokenizer, messages, where)
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        targets = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
        if not any(targets[1:length]):
            first = targets.index(True) if any(targets) else len(targets)
            raise DataError(
                f"{where}: the first assistant token is token {first}, beyond data.max_length = {length}: "
                "nothing of the reply would be learnt"
            )
        ids = list(encoded["input_ids"])[:length]
        out.add(ids, targets[: len(ids)], row)
    return out

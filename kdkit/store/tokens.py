"""Tokenized splits on disk: every split is tokenized once per (tokenizer, data, ``max_length``) and shared by
teacher training, teacher outputs, student training and evaluation, by reruns, ablations and sweeps.

In memory a tokenized split is a :class:`TokenArrays`: for each model input (``input_ids``, ``token_type_ids``,
...) one flat array holding every row's values back to back, and one ``offsets`` array (``rows + 1``) saying
where each row starts; ``input_ids`` are int32, the 0/1 inputs uint8, and an ``attention_mask`` of ones (what an
unpadded row always has) is not kept: padding makes it again. About 150 bytes a row for 30-token sentence pairs,
where Python lists of ints cost ~4.7 KB a row (docs/PERFORMANCE.md).

On disk an entry is one safetensors file ``<cache_dir>/tokens/<key>.safetensors`` holding ``offsets`` and one
tensor per model input, with the SHA-256 of every tensor's bytes in its metadata; it is written atomically under a
lock, verified on every read, and rebuilt when damaged. Its key (:func:`tokens_key`) hashes the tokenizer's
fingerprint, the split's texts in row order (:func:`kdkit.store.logits.split_fingerprint`), the text columns,
``max_length`` and the model inputs: another tokenizer, other data or another ``max_length`` is another entry.

Several processes (torchrun) build an entry together (:meth:`TokenStore.load_or_build`): each tokenizes a
contiguous share of the rows, the shares are gathered in rank order, and the main process writes the file (the
same bytes one process writes alone); an entry already on disk is read by every process.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.runtime import all_gather_rows, broadcast_flags, is_main_process, rank, warn, world_size
from kdkit.store.files import CACHE_FORMAT, atomic_write_bytes, remove_stale_temporaries, safetensors_pieces
from kdkit.store.hashing import hash_json
from kdkit.store.locks import file_lock
from kdkit.store.logits import CacheWarning

#: Version of the token file layout (part of every key, beside :data:`kdkit.store.files.CACHE_FORMAT`).
TOKENS_FORMAT = 1
#: Model inputs whose values are 0 or 1 (stored as uint8); any other input is stored as int32.
BINARY_INPUTS = frozenset({"attention_mask", "token_type_ids", "special_tokens_mask"})
#: The input that unpadded rows hold as all ones, and that padding rebuilds: not stored when it is all ones.
ATTENTION_MASK = "attention_mask"


class TokenRows(Sequence[list[int]]):
    """One model input of a :class:`TokenArrays`, row by row: ``rows[i]`` is row ``i``'s values as a list."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.values[self.offsets[index] : self.offsets[index + 1]].tolist()


class TokenArrays(Mapping[str, TokenRows]):
    """A tokenized split, unpadded, in flat arrays (see the module's docstring). As a mapping it reads like the
    ``{input name: [row ids, ...]}`` a tokenizer returns: ``tokens["input_ids"][7]`` is row 7's ids."""

    def __init__(self, columns: Mapping[str, np.ndarray], offsets: np.ndarray) -> None:
        self.columns = dict(columns)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        for name, values in self.columns.items():
            if len(values) != self.offsets[-1]:
                raise ValueError(f"input {name} holds {len(values)} values, the offsets end at {self.offsets[-1]}")

    def __getitem__(self, name: str) -> TokenRows:
        return TokenRows(self.columns[name], self.offsets)

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + sum(v.nbytes for v in self.columns.values()))

    def lengths(self) -> np.ndarray:
        """Tokens per row (int64)."""
        return np.diff(self.offsets)

    def row(self, index: int) -> dict[str, list[int]]:
        """Row ``index`` as the tokenizer would give it (without an all-ones attention mask)."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        return {name: values[start:stop].tolist() for name, values in self.columns.items()}

    def batch(self, indices: Sequence[int], extra_ones: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Rows of one length as ``[len(indices), length]`` int64 tensors, with no padding; ``extra_ones`` names
        inputs to add as all ones (the attention mask a model expects)."""
        index = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[index]
        length = int(self.offsets[index[0] + 1] - starts[0])
        if not bool(np.all(self.offsets[index + 1] - starts == length)):
            raise ValueError("a batch without padding needs rows of one length")
        positions = starts[:, None] + np.arange(length)
        tensors = {name: torch.from_numpy(values[positions].astype(np.int64)) for name, values in self.columns.items()}
        for name in extra_ones:
            if name not in tensors:
                tensors[name] = torch.ones(len(index), length, dtype=torch.int64)
        return tensors

    @classmethod
    def from_rows(cls, encoded: Mapping[str, Sequence[Sequence[int]]]) -> TokenArrays:
        """From ``{input name: [row values, ...]}`` (a tokenizer's output); an all-ones attention mask is dropped."""
        names = list(encoded)
        first = encoded[names[0]] if names else []
        lengths = np.fromiter((len(r) for r in first), dtype=np.int64, count=len(first))
        offsets = np.zeros(len(first) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        columns = {}
        for name in names:
            rows = encoded[name]
            flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
            if name == ATTENTION_MASK and bool(np.all(flat == 1)):
                continue
            columns[name] = _narrow(name, flat)
        return cls(columns, offsets)

    @classmethod
    def empty(cls, names: Sequence[str]) -> TokenArrays:
        """No rows, with the inputs ``names`` (in the dtypes they would have)."""
        return cls({n: _narrow(n, np.zeros(0, np.int64)) for n in names}, np.zeros(1, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[TokenArrays], *, consume: bool = False) -> TokenArrays:
        """The rows of ``parts`` one after the other (an input missing from one part is dropped from all: that
        happens only to an all-ones attention mask). With ``consume`` (``parts`` a list), each part is dropped
        from the list once copied, so that the peak memory stays near one copy of the rows."""
        names = [n for n in parts[0].columns if all(n in p.columns for p in parts)] if parts else []
        lengths = np.concatenate([p.lengths() for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # np.empty commits no memory until written: the result grows as the parts are copied (and freed)
        columns = {n: np.empty(int(offsets[-1]), np.result_type(*(p.columns[n] for p in parts))) for n in names}
        queue = parts if consume else list(parts)
        queue.reverse()  # type: ignore[attr-defined]
        start = 0
        while queue:
            part = queue.pop()  # type: ignore[attr-defined]
            stop = start + int(part.offsets[-1])
            for name in names:
                columns[name][start:stop] = part.columns[name]
            start = stop
        return cls(columns, offsets)

    def gathered(self) -> TokenArrays:
        """Every process's rows, in rank order, on every process (each holds a contiguous share)."""
        if world_size() <= 1:
            return self
        lengths = torch.cat(all_gather_rows(torch.from_numpy(self.lengths())))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths.numpy(), out=offsets[1:])
        columns = {}
        for name in sorted(self.columns):  # one order on every process
            parts = all_gather_rows(torch.from_numpy(np.ascontiguousarray(self.columns[name])))
            columns[name] = torch.cat(parts).numpy()
        return TokenArrays({n: columns[n] for n in self.columns}, offsets)


def _narrow(name: str, values: np.ndarray) -> np.ndarray:
    """uint8 for the 0/1 inputs (when they hold nothing else), int32 for ids (vocabularies stay below 2^31)."""
    if name in BINARY_INPUTS and (values.size == 0 or (values.min() >= 0 and values.max() <= 255)):
        return values.astype(np.uint8)
    return values.astype(np.int32)


# --------------------------------------------------------------------------- keys and files
def tokens_key(
    *, tokenizer_hash: str, split_hash: str, text_columns: Sequence[str], max_length: int, input_names: Sequence[str]
) -> str:
    """The store key of a split tokenized with one tokenizer: every input that changes the token ids."""
    return hash_json(
        {
            "kind": "tokens",
            "format": CACHE_FORMAT,
            "tokens_format": TOKENS_FORMAT,
            "tokenizer": tokenizer_hash,
            "split": split_hash,
            "text_columns": list(text_columns),
            "max_length": max_length,
            "inputs": list(input_names),
        },
        length=32,
    )


def _checksum(arrays: TokenArrays) -> str:
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(arrays.offsets)).cast("B"))
    for name in sorted(arrays.columns):
        digest.update(memoryview(np.ascontiguousarray(arrays.columns[name])).cast("B"))
    return digest.hexdigest()


def write_tokens(path: Path, arrays: TokenArrays, info: Mapping[str, str]) -> None:
    """Store ``arrays`` atomically, with their checksum in the safetensors metadata."""
    tensors = {"offsets": np.ascontiguousarray(arrays.offsets)}
    tensors.update({f"input.{n}": np.ascontiguousarray(v) for n, v in arrays.columns.items()})
    metadata = {str(k): str(v) for k, v in info.items()}
    metadata.update(
        format=str(CACHE_FORMAT),
        tokens_format=str(TOKENS_FORMAT),
        rows=str(arrays.num_rows),
        inputs=json.dumps(sorted(arrays.columns)),
        sha256=_checksum(arrays),
    )
    atomic_write_bytes(path, safetensors_pieces(tensors, metadata))


def read_tokens(path: Path, rows: int | None = None) -> TokenArrays:
    """Read and verify a token file. :raises ValueError: saying what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = fh.metadata() or {}
            names = json.loads(metadata.get("inputs", "null"))
            offsets = fh.get_tensor("offsets")
            columns = {n: fh.get_tensor(f"input.{n}") for n in names}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if metadata.get("format") != str(CACHE_FORMAT) or metadata.get("tokens_format") != str(TOKENS_FORMAT):
        raise ValueError(f"format {metadata.get('format')!r}/{metadata.get('tokens_format')!r}, expected "
                         f"{CACHE_FORMAT}/{TOKENS_FORMAT}")
    try:
        arrays = TokenArrays(columns, offsets)
    except ValueError as exc:
        raise ValueError(f"inconsistent ({exc})") from None
    if _checksum(arrays) != metadata.get("sha256"):
        raise ValueError("checksum mismatch (the file is corrupt)")
    if rows is not None and arrays.num_rows != rows:
        raise ValueError(f"holds {arrays.num_rows} rows, the split has {rows}")
    return arrays


# --------------------------------------------------------------------------- the store
def share(rows: int, part: int, parts: int) -> tuple[int, int]:
    """The contiguous rows ``[start, stop)`` that process ``part`` of ``parts`` tokenizes (sizes differ by <= 1)."""
    return rows * part // parts, rows * (part + 1) // parts


class TokenStore:
    """Tokenized splits under ``<cache_dir>/tokens``; ``built`` and ``read`` count what this object did."""

    def __init__(self, cache_dir: str | Path, console: Any = None) -> None:
        self.directory = Path(cache_dir) / "tokens"
        self.console = console
        self.built = 0
        self.read = 0

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _try_read(self, path: Path, rows: int, label: str) -> TokenArrays | None:
        if not path.exists():
            return None
        try:
            return read_tokens(path, rows)
        except ValueError as exc:
            message = f"token cache {path.name} ({label}) is {exc}; rebuilding it"
            warnings.warn(message, CacheWarning, stacklevel=4)
            warn(self.console, message)
            path.unlink(missing_ok=True)
            return None

    def load_or_build(
        self, key: str, rows: int, build: Callable[[int, int], TokenArrays], *, label: str,
        info: Mapping[str, str] | None = None,
    ) -> TokenArrays:
        """The entry ``key`` (``rows`` rows), read, or built with ``build(start, stop)`` (rows ``[start, stop)``)
        and written. Every process of a run calls this together: the main process holds the entry's lock (other
        runs wait) and decides whether it is there; if not, each process builds its share."""
        path = self.path_for(key)
        main = is_main_process()
        with file_lock(self.directory / f"{key}.lock") if main else contextlib.nullcontext():
            found = self._try_read(path, rows, label) if main else None
            [missing] = broadcast_flags([found is None])
            if not missing:
                self.read += 1
                return found if found is not None else read_tokens(path, rows)
            if main:
                remove_stale_temporaries(self.directory, path.name)
            start, stop = share(rows, rank(), world_size())
            arrays = build(start, stop).gathered()
            if arrays.num_rows != rows:
                raise ValueError(f"built {arrays.num_rows} rows of tokens for {label}, expected {rows}")
            if main:
                write_tokens(path, arrays, {"label": label, **dict(info or {})})
            self.built += 1
            return arrays

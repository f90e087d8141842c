"""Stable hashes of values, files and columns: the building blocks of every cache key.

Columns are read through Arrow (:func:`arrow_column`), never row by row: ``list(dataset[column])`` costs about
10 us a row (6.4 s for 200,000 short strings on the 2-core machine of docs/PERFORMANCE.md), the Arrow column
0.05 s, and the hashes below consume its buffers as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Rows of a column turned into one byte string at a time by :func:`hash_arrow_columns` (bounds its memory).
_HASH_SLICE_ROWS = 1 << 18


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot hash a value of type {type(obj).__name__}")


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_json(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 of :func:`stable_json` of ``obj``, shortened to ``length`` characters."""
    return hashlib.sha256(stable_json(obj).encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_columns(columns: Iterable[Iterable[Any]], length: int = 16) -> str:
    """Hash of several equally long columns of str / int values, row by row (order matters).

    The byte stream is ``"\\x1ecol"`` before each column and ``"\\x1f" + str(value)`` (UTF-8) for each value;
    :func:`hash_arrow_columns` feeds the same stream from Arrow buffers, so both give the same hash.
    """
    digest = hashlib.sha256()
    for values in columns:
        digest.update(b"\x1ecol")
        _feed_python_values(digest, values)
    return digest.hexdigest()[:length]


def _feed_python_values(digest: Any, values: Iterable[Any]) -> None:
    for value in values:
        digest.update(b"\x1f")
        digest.update(str(value).encode("utf-8", "surrogatepass"))


def arrow_column(dataset: Any, column: str) -> pa.ChunkedArray:
    """A column of a ``datasets.Dataset`` (its selected rows, in order) as Arrow, without a Python object per row;
    anything else indexable by column name (a dict of lists) is converted once."""
    if hasattr(dataset, "with_format"):
        found = dataset.with_format("arrow")[column]
    else:
        found = dataset[column]
    if isinstance(found, pa.ChunkedArray):
        return found
    if isinstance(found, pa.Array):
        return pa.chunked_array([found])
    return pa.chunked_array([pa.array(list(found))])


def hash_arrow_columns(columns: Sequence[pa.ChunkedArray | Sequence[Any]], length: int = 16) -> str:
    """:func:`hash_columns` of Arrow columns (string or integer; a plain list is hashed as ``hash_columns`` does),
    computed from their buffers: the same hash, about 100 times faster than reading the values into Python."""
    digest = hashlib.sha256()
    for column in columns:
        digest.update(b"\x1ecol")
        if not isinstance(column, pa.ChunkedArray):
            _feed_python_values(digest, column)
            continue
        for chunk in column.chunks:
            for start in range(0, len(chunk), _HASH_SLICE_ROWS):
                _feed_arrow_values(digest, chunk.slice(start, _HASH_SLICE_ROWS))
    return digest.hexdigest()[:length]


def _feed_arrow_values(digest: Any, chunk: pa.Array) -> None:
    """``"\\x1f" + str(value)`` for each value of ``chunk``, built as one byte array with numpy."""
    if chunk.null_count or not (pa.types.is_integer(chunk.type) or _is_text(chunk.type)):
        _feed_python_values(digest, chunk.to_pylist())  # rare: nulls, floats, ... (str() decides their text)
        return
    text = pc.cast(chunk, pa.large_string())  # integers print as str(int) does: "-100"
    _, offsets_buffer, data_buffer = text.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype="<i8")[text.offset : text.offset + len(text) + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(data_buffer, dtype=np.uint8)[first:last] if data_buffer is not None else np.empty(0, np.uint8)
    stream = np.empty(len(text) + (last - first), dtype=np.uint8)
    separators = offsets[:-1] - first + np.arange(len(text))
    keep = np.ones(len(stream), dtype=bool)
    keep[separators] = False
    stream[separators] = 0x1F
    stream[keep] = data
    digest.update(stream)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def hash_arrow_column(digest: Any, column: pa.ChunkedArray) -> None:
    """Feed one column into ``digest`` in a layout that depends on its values only, not on its chunking
    (the data fingerprint's layout: all lengths first, then all bytes; integers as little-endian int64)."""
    if pa.types.is_integer(column.type):
        digest.update(column.to_numpy().astype("<i8").tobytes())
        return
    pieces = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        chunk = chunk.cast(pa.large_string())
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype="<i8")[chunk.offset : chunk.offset + len(chunk) + 1]
        pieces.append((ends, data))
    # all lengths first, then all bytes: the lengths keep ("ab", "c") apart from ("a", "bc")
    for ends, _ in pieces:
        digest.update(np.diff(ends).astype("<i8").tobytes())
    for ends, data in pieces:
        if data is not None:
            digest.update(memoryview(data)[ends[0] : ends[-1]])

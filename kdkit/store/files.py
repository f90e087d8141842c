"""Files that are never seen half-written: atomic writes, and directories whose completeness is checksummed.

A reader sees either the old file or the complete new one. A cached directory is written into a temporary
sibling, gets a ``.complete`` marker holding the SHA-256 of every file (written last), and is renamed into place;
:func:`verify_complete_marker` checks it before reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.store.hashing import sha256_file

#: Bumped whenever the layout or meaning of a cached artefact changes, so that old caches are not reused.
CACHE_FORMAT = 1

#: Name of the marker file that says a cached directory was written completely; it holds the files' checksums.
COMPLETE_MARKER = ".complete"


def _temp_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or pieces written one after the other, so that large arrays need no joined copy) to
    a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


#: safetensors' names of the dtypes kdkit stores.
_SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "uint8": "U8"}


def safetensors_pieces(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """A safetensors file (numpy arrays or CPU tensors) whose bytes depend on its content only, as the pieces to
    write one after the other (the arrays' own memory, not copies).

    The ``safetensors`` library writes its header from a hash map, in an order that changes from one process to
    the next: the same tensors saved twice give two different files. Here the metadata keys and the tensors are in
    sorted order, so the same content always gives the same bytes (a build by several processes is byte for byte
    the one-process build). The format is the library's: an 8-byte little-endian header length, the JSON header
    padded with spaces to a multiple of 8, then each tensor's bytes in header order.
    """
    header: dict[str, Any] = {"__metadata__": {str(k): str(metadata[k]) for k in sorted(metadata)}}
    blobs: list[bytes | memoryview] = []
    offset = 0
    for name in sorted(tensors):
        value = tensors[name]
        array = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else value)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        blobs.append(memoryview(array.reshape(-1)).cast("B"))
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *blobs]


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- checksummed directories
def directory_checksums(directory: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``directory`` except the marker."""
    directory = Path(directory)
    sums = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if rel != COMPLETE_MARKER:
            sums[rel] = sha256_file(file)
    return sums


def write_complete_marker(directory: str | Path, info: Mapping[str, Any] | None = None) -> None:
    """Record the checksum of every file in ``directory`` in its ``.complete`` marker (written last)."""
    directory = Path(directory)
    payload = {"format": CACHE_FORMAT, "files": directory_checksums(directory), **dict(info or {})}
    atomic_write_json(directory / COMPLETE_MARKER, payload)


def verify_complete_marker(directory: str | Path) -> str | None:
    """``None`` if ``directory`` is complete and every file matches its checksum, else what is wrong."""
    directory = Path(directory)
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return "no .complete marker (the write was interrupted)"
    try:
        payload = read_json(marker)
        expected: dict[str, str] = payload["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the .complete marker is unreadable"
    if payload.get("format") != CACHE_FORMAT:
        return f"written by cache format {payload.get('format')}, this kdkit uses {CACHE_FORMAT}"
    for rel, digest in expected.items():
        file = directory / rel
        if not file.is_file():
            return f"{rel} is missing"
        if sha256_file(file) != digest:
            return f"{rel} does not match its checksum"
    return None


def commit_directory(tmp: Path, final: Path) -> Path:
    """Move a fully written temporary directory to ``final`` (a rename, atomic on one file system).

    If ``final`` exists already (an older, invalid copy), it is moved aside first and then removed.
    """
    if final.exists():
        trash = _temp_sibling(final, ".old")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def staging_directory(final: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``final``; removed if the block fails, left for the caller otherwise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | Path, name: str) -> None:
    """Remove leftovers of interrupted writes of ``name`` in ``directory`` (call while holding its lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for stale in directory.glob(f".tmp-{name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

"""Teacher-logit files: one safetensors file per (teacher, split), keyed by everything that changes its content.

A file holds a float32 tensor ``logits [num_rows, num_classes]`` in the split's row order. Its key is a
fingerprint of the teacher's checkpoint key, the split's texts, the teacher's tokenizer, ``max_length`` and the
text columns, so any change to one of them gives a new file, and an unchanged recipe finds its logits again.
Files are written atomically (temporary file + rename), always with the same bytes for the same content, and
carry the SHA-256 of their tensor bytes in the safetensors metadata; :func:`read_logits` refuses a file that fails
to parse or to match its checksum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit.errors import KdkitWarning
from kdkit.store.files import CACHE_FORMAT, atomic_write_bytes, safetensors_pieces
from kdkit.store.hashing import arrow_column, hash_arrow_columns, hash_json, sha256_bytes


class CacheWarning(KdkitWarning):
    """A cache entry was unusable (corrupt, truncated, from another format) and is being rebuilt."""


def split_fingerprint(dataset: Any, text_columns: Sequence[str]) -> str:
    """Hash of a split's texts in row order (labels do not change what a teacher predicts), read through Arrow
    (the value :func:`kdkit.store.hashing.hash_columns` gives for the same texts, so older keys still match)."""
    return hash_arrow_columns([arrow_column(dataset, c) for c in text_columns] + [[len(dataset)]], length=32)


def logits_key(
    *, teacher_key: str, split_hash: str, tokenizer_hash: str, max_length: int, text_columns: Sequence[str]
) -> str:
    return hash_json(
        {
            "kind": "teacher-logits",
            "format": CACHE_FORMAT,
            "teacher": teacher_key,
            "split": split_hash,
            "tokenizer": tokenizer_hash,
            "max_length": max_length,
            "text_columns": list(text_columns),
        },
        length=32,
    )


def write_logits(path: Path, logits: torch.Tensor, info: Mapping[str, str]) -> None:
    """Store ``logits`` atomically with its checksum in the safetensors metadata."""
    tensor = logits.detach().to(torch.float32).contiguous().cpu()
    metadata = {str(k): str(v) for k, v in info.items()}
    metadata.update(
        format=str(CACHE_FORMAT),
        rows=str(tensor.shape[0]),
        classes=str(tensor.shape[1]),
        sha256=sha256_bytes(tensor.numpy().tobytes()),
    )
    atomic_write_bytes(path, safetensors_pieces({"logits": tensor}, metadata))


def read_logits(path: Path, rows: int | None = None, classes: int | None = None) -> torch.Tensor:
    """Read and verify a logits file. :raises ValueError: saying what is wrong with it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensor = fh.get_tensor("logits")
    except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if metadata.get("format") != str(CACHE_FORMAT):
        raise ValueError(f"cache format {metadata.get('format')!r}, expected {CACHE_FORMAT}")
    if tensor.dtype != torch.float32 or tensor.dim() != 2:
        raise ValueError(f"holds a {tensor.dtype} tensor of shape {tuple(tensor.shape)}")
    if sha256_bytes(tensor.contiguous().numpy().tobytes()) != metadata.get("sha256"):
        raise ValueError("checksum mismatch (the file is corrupt)")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"holds {tensor.shape[0]} rows, the split has {rows}")
    if classes is not None and tensor.shape[1] != classes:
        raise ValueError(f"holds {tensor.shape[1]} classes, expected {classes}")
    return tensor



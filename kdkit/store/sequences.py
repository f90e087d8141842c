"""Token sequences kept by content key: the continuations that teachers generated for unlabeled prompts.

One directory per entry, named by its key (the caller's: a hash of everything that decides the content)::

    <root>/<key>/
        sequences.safetensors   ids [total] int32 (the sequences one after the other), offsets [n + 1] int64,
                                keys [n, 16] uint8 (the content key of each sequence's *source*, e.g. its prompt)
        .complete               the SHA-256 of the file above (kdkit.store.files), written last
    <root>/<key>.lock           held while the entry is written

Written into a temporary sibling and renamed into place (:func:`kdkit.store.files.staging_directory`), so an
interrupted write leaves no entry; :func:`read_sequences` checks the checksum and the layout and returns ``None``
for an entry that is missing or damaged (the caller writes it again).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from kdkit.store.files import commit_directory, staging_directory, verify_complete_marker, write_complete_marker
from kdkit.store.topk import KEY_BYTES

FILE = "sequences.safetensors"


def write_sequences(directory: str | Path, sequences: Mapping[str, np.ndarray]) -> None:
    """Write ``{source key: int32 tokens}`` as the entry ``directory`` (replacing a damaged one). Call it holding
    the entry's lock."""
    directory = Path(directory)
    keys = sorted(sequences)
    counts = np.array([len(sequences[k]) for k in keys], dtype=np.int64)
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    ids = np.concatenate([np.asarray(sequences[k], dtype=np.int32) for k in keys]) if keys else np.zeros(0, np.int32)
    raw = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
    with staging_directory(directory) as tmp:
        save_file({"ids": ids, "offsets": offsets, "keys": raw.copy()}, str(tmp / FILE))
        write_complete_marker(tmp)
    commit_directory(tmp, directory)


def read_sequences(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The entry's ``{source key: int32 tokens}``, or ``None`` when it is missing or fails its checks."""
    directory = Path(directory)
    if not directory.is_dir() or verify_complete_marker(directory) is not None:
        return None
    try:
        tensors = load_file(str(directory / FILE))
        ids, offsets, keys = tensors["ids"], tensors["offsets"], tensors["keys"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    n = len(keys)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(ids) or (np.diff(offsets) < 0).any():
        return None
    hexes = keys.tobytes().hex()
    names = [hexes[i * 2 * KEY_BYTES : (i + 1) * 2 * KEY_BYTES] for i in range(n)]
    return {name: ids[offsets[i] : offsets[i + 1]].copy() for i, name in enumerate(names)}


__all__ = ["FILE", "read_sequences", "write_sequences"]

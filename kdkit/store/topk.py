"""Top-k teacher stores for causal LMs: for one teacher and one split, each position's top-k token ids, their
log-probabilities at the distillation temperature T, and the exact log-probability of the gold token at T = 1
(UniKD's teacher task loss, exact even when the gold token is outside the top-k; DESIGN.md section 4).

**Positions.** A sequence of L tokens has L - 1 positions: position t holds the teacher's prediction of token
t + 1 (its logits at token t), and the gold token of position t is token t + 1. The last token's logits are not
stored; a sequence of fewer than two tokens has no positions.

**Rows keyed by content.** A sequence's key is :func:`sequence_key`: the SHA-256 of its token ids as
little-endian int32 bytes, truncated to 128 bits (32 hex characters). Readers ask for sequences by key, and a key
that the store lacks is an error naming it. Nothing is keyed by step, row number or rank, so shuffling, sharding
or reordering the data can never pair a sample with another sample's teacher outputs (EasyDistill, issue 21).

**On disk**, one directory per store, named by :func:`store_key` (a hash of the :class:`TopKSpec` and of the set
of sequence keys, i.e. of everything that changes the content)::

    <root>/<store key>/
        manifest.json             TopKManifest: format, teacher and tokenizer fingerprints, k, temperature, dtype,
                                  max_length, vocab_size, sequences, positions, and the shards with their counts
        shard-00000.safetensors   ids [positions, k] int32 (best first), logprobs [positions, k] float16 | bfloat16,
        shard-00001.safetensors   gold [positions] float32, offsets [sequences + 1] int64 (sequence s of the
        ...                       shard owns rows offsets[s]:offsets[s+1]), keys [sequences, 16] uint8
        .complete                 the SHA-256 of every file above, written last (kdkit.store.files)
    <root>/<store key>.lock       held while the store is built or merged
    <root>/<store key>.parts/     part-00000-of-00002/, ...: one store-like directory per rank, until merged

Rows are ragged (no padding) and in the **canonical order**: most positions first, ties by key
(:func:`canonical_order`). That order depends on the set of sequences alone, neither on the data's order nor on
ranks, so a store merged from the parts that several processes built (:func:`merge_topk_parts`) has the bytes of
a store built by one process, and a reshuffled data set finds its store again. A shard is closed after the
sequence that brings it to ``shard_positions`` rows: a sequence never straddles two shards.

**Integrity.** A store is written into a temporary sibling directory and renamed into place once complete
(:func:`kdkit.store.files.staging_directory`): an interrupted build leaves a ``.tmp-`` directory that no reader
opens and the next build removes. :meth:`TopKStore.open` checks the ``.complete`` checksums once, then
memory-maps the shards and never checks again: a read costs a copy of the rows asked for. Why numpy memmaps of
the tensor bytes rather than safetensors' ``get_slice``: docs/PERFORMANCE.md, "Top-k teacher store".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save as safetensors_bytes

from kdkit.errors import KdkitError, did_you_mean
from kdkit.runtime import warn
from kdkit.store.files import (
    COMPLETE_MARKER,
    atomic_write_bytes,
    atomic_write_json,
    commit_directory,
    read_json,
    remove_stale_temporaries,
    staging_directory,
    verify_complete_marker,
    write_complete_marker,
)
from kdkit.store.hashing import hash_columns, hash_json
from kdkit.store.locks import file_lock
from kdkit.store.logits import CacheWarning

#: Bumped whenever the layout or the meaning of a top-k store changes (part of every store key).
TOPK_FORMAT = 1

#: Rows per shard file: about 200 MB at k = 64 (388 bytes a row). Shards bound the memory a writer buffers and
#: the size of one file; readers memory-map them, so their number does not change what a read costs.
SHARD_POSITIONS = 1 << 19

#: Bytes of a sequence key (128 bits of SHA-256: 32 hex characters).
KEY_BYTES = 16

MANIFEST = "manifest.json"

#: The log-probability dtypes a store may hold, by the name the manifest records.
LOGPROB_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}

#: safetensors dtype names -> the numpy dtype their bytes are read as (bfloat16 as its raw 16 bits).
_NUMPY_DTYPES = {"I32": "<i4", "I64": "<i8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1"}
_SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16"}


# --------------------------------------------------------------------------- errors
class TopKStoreError(KdkitError):
    """A top-k teacher store cannot be used as asked."""


class CorruptStoreError(TopKStoreError):
    """A store's files are incomplete, damaged or inconsistent. Builders report it and rebuild the store."""

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        super().__init__(f"top-k store {directory}: {reason}")


class StoreMismatchError(TopKStoreError):
    """A store's manifest does not hold what the reader expects (another k, temperature, tokenizer, ...)."""

    def __init__(self, directory: Path, field: str, expected: Any, stored: Any) -> None:
        self.directory, self.field, self.expected, self.stored = directory, field, expected, stored
        super().__init__(
            f"top-k store {directory}: manifest field {field!r} is {stored!r}, expected {expected!r} "
            "(the store was built with other settings)"
        )


class MissingSequenceError(TopKStoreError):
    """A sequence asked for is not in the store."""

    def __init__(self, directory: Path, key: str, item: int) -> None:
        self.directory, self.key, self.item = directory, key, item
        super().__init__(
            f"top-k store {directory}: no sequence with key {key} (item {item} of the batch); the store was built "
            "from other sequences (another split, tokenizer or max_length?)"
        )


# --------------------------------------------------------------------------- keys and order
def sequence_key(ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """The content key of a token id sequence: SHA-256 of its ids as little-endian int32, 32 hex characters.

    The same ids give the same key whether they come as a list, an int32 / int64 array or a tensor.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(f"a sequence is a 1-d list of integer token ids, not {array.dtype} of shape {array.shape}")
    data = array.astype("<i4", copy=False)
    return hashlib.sha256(data.tobytes()).hexdigest()[: 2 * KEY_BYTES]


def canonical_order(positions: Sequence[int], keys: Sequence[str]) -> list[int]:
    """Indices of sequences in a store's row order: most positions first, ties by key.

    ``positions`` may be any strictly increasing function of the positions (``max(tokens, 1)`` for one: a sequence
    of 0 or 1 tokens has no position).
    """
    return sorted(range(len(keys)), key=lambda i: (-positions[i], keys[i]))


def key_set_hash(keys: Sequence[str]) -> str:
    """Hash of the set of sequence keys (order and repeats do not matter)."""
    return hash_columns([sorted(set(keys))], length=32)


# --------------------------------------------------------------------------- spec and manifest
class TopKSpec(BaseModel):
    """Everything besides the sequences that decides a store's content: part of its key and of its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    teacher: str  #: the teacher's fingerprint (the cache key of its checkpoint)
    tokenizer: str  #: ``kdkit.modeling.tokenize.tokenizer_fingerprint`` of the teacher's tokenizer
    k: int = Field(ge=1)
    temperature: float = Field(gt=0, allow_inf_nan=False)  #: of the top-k log-probabilities (gold: always 1)
    dtype: Literal["float16", "bfloat16"] = "float16"  #: of the top-k log-probabilities
    max_length: int = Field(ge=1)  #: the longest sequence (in tokens) the store may hold
    vocab_size: int = Field(ge=1)  #: the last dimension of the teacher's logits

    @model_validator(mode="after")
    def _k_within_the_vocabulary(self) -> TopKSpec:
        if self.k > self.vocab_size:
            raise ValueError(f"k = {self.k} is larger than the vocabulary ({self.vocab_size} tokens)")
        return self


class ShardInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    sequences: int = Field(ge=0)
    positions: int = Field(ge=0)


class PartInfo(BaseModel):
    """Which share of a store a part holds: rank ``rank`` of ``world_size`` processes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _rank_within_the_world(self) -> PartInfo:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} ranks")
        return self


class TopKManifest(TopKSpec):
    """``manifest.json``: the spec, the counts and the shards of one store (or one part of one)."""

    format: int
    store: str  #: the store's key (for a part: the key of the store it is a part of)
    part: PartInfo | None = None
    sequences: int = Field(ge=0)
    positions: int = Field(ge=0)
    shards: list[ShardInfo]


#: The manifest fields a reader may expect values of (:meth:`TopKStore.open`).
EXPECTABLE_FIELDS = (*TopKSpec.model_fields, "format", "sequences", "positions")


def store_key(spec: TopKSpec, keys: Sequence[str]) -> str:
    """The directory name of the store of ``spec`` over the sequences with these keys (as a set)."""
    return hash_json(
        {"kind": "topk-teacher-outputs", "format": TOPK_FORMAT, "spec": spec, "sequences": key_set_hash(keys)},
        length=32,
    )


def lock_path(root: str | Path, key: str) -> Path:
    """The lock held while the store ``key`` under ``root`` is built or merged."""
    return Path(root) / f"{key}.lock"


def part_directory(root: str | Path, key: str, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part of the store ``key``."""
    return Path(root) / f"{key}.parts" / f"part-{rank:05d}-of-{world_size:05d}"


# --------------------------------------------------------------------------- writing
class TopKWriter:
    """Appends sequences to the shards of a store directory being staged; use :func:`write_store`.

    Sequences must come in canonical order, each once (checked): the bytes of a store must not depend on who
    wrote it or in which order its batches were computed.
    """

    def __init__(
        self, directory: Path, spec: TopKSpec, *, store: str, part: PartInfo | None, shard_positions: int
    ) -> None:
        self.directory = directory
        self.spec = spec
        self.store = store
        self.part = part
        self.shard_positions = max(1, shard_positions)
        self.sequences = 0
        self.positions = 0
        self._dtype = LOGPROB_DTYPES[spec.dtype]
        self._shards: list[ShardInfo] = []
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_positions = 0
        self._last: tuple[int, str] | None = None

    def add(self, key: str, ids: torch.Tensor, logprobs: torch.Tensor, gold: torch.Tensor) -> None:
        """Append one sequence: ``ids`` and ``logprobs`` ``[positions, k]`` (best first), ``gold`` ``[positions]``.

        Log-probabilities are stored in the spec's dtype; values below its smallest finite number (a probability
        of exactly 0 in that dtype) are clamped to it rather than becoming ``-inf``.
        """
        positions, k = int(gold.shape[0]), self.spec.k
        if gold.dim() != 1 or tuple(ids.shape) != (positions, k) or tuple(logprobs.shape) != (positions, k):
            raise ValueError(
                f"sequence {key}: ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)} and gold "
                f"{tuple(gold.shape)} do not describe {positions} positions of the top {k}"
            )
        if len(key) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"{key!r} is not a sequence key (32 lower-case hex characters)")
        rank = (-positions, key)
        if self._last is not None and rank <= self._last:
            raise ValueError(f"sequence {key} comes after {self._last[1]} twice or out of canonical order")
        self._last = rank
        if logprobs.dtype != self._dtype:
            logprobs = logprobs.float().clamp(min=torch.finfo(self._dtype).min).to(self._dtype)
        self._pending.append((key, ids.to(torch.int32), logprobs, gold.to(torch.float32)))
        self._pending_positions += positions
        self.sequences += 1
        self.positions += positions
        if self._pending_positions >= self.shard_positions:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        counts = torch.tensor([int(entry[3].shape[0]) for entry in self._pending], dtype=torch.int64)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        keys = b"".join(bytes.fromhex(entry[0]) for entry in self._pending)
        tensors = {
            "ids": torch.cat([entry[1] for entry in self._pending]),
            "logprobs": torch.cat([entry[2] for entry in self._pending]),
            "gold": torch.cat([entry[3] for entry in self._pending]),
            "offsets": offsets,
            "keys": torch.frombuffer(bytearray(keys), dtype=torch.uint8).view(-1, KEY_BYTES),
        }
        name = f"shard-{len(self._shards):05d}.safetensors"
        atomic_write_bytes(self.directory / name, safetensors_bytes(tensors, metadata={"format": str(TOPK_FORMAT)}))
        self._shards.append(ShardInfo(file=name, sequences=len(counts), positions=int(offsets[-1])))
        self._pending, self._pending_positions = [], 0

    def finish(self) -> TopKManifest:
        """Write the last shard, the manifest and the ``.complete`` marker (last)."""
        self._flush()
        manifest = TopKManifest(
            **self.spec.model_dump(),
            format=TOPK_FORMAT,
            store=self.store,
            part=self.part,
            sequences=self.sequences,
            positions=self.positions,
            shards=self._shards,
        )
        atomic_write_json(self.directory / MANIFEST, manifest.model_dump(mode="json"))
        write_complete_marker(self.directory)
        return manifest


@contextlib.contextmanager
def write_store(
    directory: str | Path,
    spec: TopKSpec,
    *,
    store: str,
    part: PartInfo | None = None,
    shard_positions: int = SHARD_POSITIONS,
) -> Iterator[TopKWriter]:
    """A :class:`TopKWriter` on a temporary sibling of ``directory``, renamed to ``directory`` when the block ends
    normally (replacing a damaged copy) and removed when it fails: ``directory`` is complete or absent.

    Call it holding :func:`lock_path`'s lock. ``store`` is the store's key (recorded in the manifest).
    """
    directory = Path(directory)
    with staging_directory(directory) as tmp:
        writer = TopKWriter(tmp, spec, store=store, part=part, shard_positions=shard_positions)
        yield writer
        writer.finish()
    commit_directory(tmp, directory)


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class PaddedTopK:
    """A batch's teacher outputs padded to ``[B, T]``; ``mask`` marks real positions (padding holds zeros)."""

    ids: torch.Tensor  #: [B, T, k] int64
    logprobs: torch.Tensor  #: [B, T, k] float32
    gold: torch.Tensor  #: [B, T] float32
    mask: torch.Tensor  #: [B, T] bool


@dataclass(frozen=True)
class TopKRows:
    """One store's teacher outputs for a batch of sequences, ragged: the positions of every sequence one after
    the other, in the order the keys were asked for. Stores of several teachers over the same sequences give
    equal ``offsets``, so their rows stack (``torch.stack``) into ``[N, P, k]``.
    """

    keys: tuple[str, ...]
    ids: torch.Tensor  #: [P, k] int64 token ids, best first (P = sum over the batch of length - 1)
    logprobs: torch.Tensor  #: [P, k] float32 log-probabilities at the store's temperature
    gold: torch.Tensor  #: [P] float32 log-probability of the next (gold) token at T = 1
    offsets: torch.Tensor  #: [B + 1] int64: sequence b owns rows offsets[b]:offsets[b + 1] (its positions 0, 1, ...)

    def padded(self, length: int | None = None) -> PaddedTopK:
        """The same rows as ``[B, T, k]`` with a mask (``T``: ``length``, or the longest sequence's positions)."""
        counts = self.offsets[1:] - self.offsets[:-1]
        batch, width = len(counts), int(counts.max()) if len(counts) else 0
        if length is not None:
            if length < width:
                raise ValueError(f"a sequence of the batch has {width} positions, more than length {length}")
            width = length
        sequence = torch.repeat_interleave(torch.arange(batch), counts)
        position = torch.arange(len(sequence)) - self.offsets[:-1][sequence]
        k = self.ids.shape[1]
        out = PaddedTopK(
            ids=torch.zeros(batch, width, k, dtype=self.ids.dtype),
            logprobs=torch.zeros(batch, width, k, dtype=self.logprobs.dtype),
            gold=torch.zeros(batch, width, dtype=self.gold.dtype),
            mask=torch.zeros(batch, width, dtype=torch.bool),
        )
        out.ids[sequence, position] = self.ids
        out.logprobs[sequence, position] = self.logprobs
        out.gold[sequence, position] = self.gold
        out.mask[sequence, position] = True
        return out


@dataclass
class _Shard:
    path: Path
    ids: np.ndarray  #: [positions, k] int32, memory-mapped
    logprobs: np.ndarray  #: [positions, k] float16, or bfloat16 as uint16 bits, memory-mapped
    gold: np.ndarray  #: [positions] float32, memory-mapped


def _tensor_layout(manifest: TopKManifest, shard: ShardInfo) -> dict[str, tuple[str, list[int]]]:
    rows, k = shard.positions, manifest.k
    return {
        "ids": ("I32", [rows, k]),
        "logprobs": (_SAFETENSORS_DTYPES[manifest.dtype], [rows, k]),
        "gold": ("F32", [rows]),
        "offsets": ("I64", [shard.sequences + 1]),
        "keys": ("U8", [shard.sequences, KEY_BYTES]),
    }


def _read_header(path: Path) -> tuple[int, dict[str, Any], int]:
    """(header size, header, file size) of a safetensors file; ``ValueError`` if it cannot be one."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise ValueError("its header is cut short")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return length, header, size


def _map_tensors(directory: Path, name: str, layout: Mapping[str, tuple[str, list[int]]]) -> dict[str, np.ndarray]:
    """Memory-map the tensors of one safetensors file after checking its header against ``layout``
    (tensor -> safetensors dtype and shape) and its size against the header: a truncated file fails here even
    when the checksums are not verified."""
    path = directory / name
    try:
        length, header, size = _read_header(path)
        data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, the file never changes
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(directory, f"{name} is unreadable ({exc})") from None
    arrays, end_of_data = {}, 0
    for tensor, (dtype, shape) in layout.items():
        entry = header.get(tensor)
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            found = f"{entry.get('dtype')} {entry.get('shape')}" if isinstance(entry, dict) else "missing"
            raise CorruptStoreError(directory, f"{name}: tensor {tensor!r} is {found}, expected {dtype} {shape}")
        itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(v, int) for v in offsets)):
            raise CorruptStoreError(directory, f"{name}: tensor {tensor!r} has no valid data offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * itemsize or begin < 0 or 8 + length + end > size:
            raise CorruptStoreError(directory, f"{name}: tensor {tensor!r} runs past the end of the file (truncated)")
        start = 8 + length + begin
        arrays[tensor] = data[start : start + end - begin].view(_NUMPY_DTYPES[dtype]).reshape(shape)
        end_of_data = max(end_of_data, end)
    if 8 + length + end_of_data != size:
        raise CorruptStoreError(directory, f"{name} is {size} bytes, its header describes {8 + length + end_of_data}")
    return arrays


def _read_manifest(directory: Path) -> TopKManifest:
    try:
        raw = read_json(directory / MANIFEST)
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(directory, f"{MANIFEST} is unreadable ({exc})") from None
    stored = raw.get("format") if isinstance(raw, dict) else None
    if stored != TOPK_FORMAT:
        raise StoreMismatchError(directory, "format", TOPK_FORMAT, stored)
    try:
        return TopKManifest.model_validate(raw)
    except ValidationError as exc:
        raise CorruptStoreError(directory, f"{MANIFEST} is invalid ({exc.errors()[0]['msg']})") from None


def _check_expectations(directory: Path, manifest: TopKManifest, expect: TopKSpec | Mapping[str, Any]) -> None:
    wanted = expect.model_dump() if isinstance(expect, TopKSpec) else dict(expect)
    for field, expected in wanted.items():
        if field not in EXPECTABLE_FIELDS:
            hint = did_you_mean(field, EXPECTABLE_FIELDS)
            raise TopKStoreError(
                f"top-k store {directory}: no manifest field {field!r} to expect{hint}; "
                f"the fields are {', '.join(EXPECTABLE_FIELDS)}"
            )
        stored = getattr(manifest, field)
        if stored != expected:
            raise StoreMismatchError(directory, field, expected, stored)


class TopKStore:
    """A complete top-k store, memory-mapped, read by sequence key. Open it with :meth:`open`.

    >>> store = TopKStore.open(path, expect={"k": 64, "temperature": 2.0, "tokenizer": fingerprint})
    >>> rows = store.read(batch_keys)   # TopKRows: ids / logprobs [P, k], gold [P], offsets [B + 1]
    """

    def __init__(
        self,
        directory: Path,
        manifest: TopKManifest,
        shards: list[_Shard],
        keys: list[str],
        where: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """Use :meth:`open`. ``where``: each sequence's shard number, first row and end row, in ``keys``' order."""
        self.directory = directory
        self.manifest = manifest
        self._shards = shards
        self._keys = keys
        self._index = {key: i for i, key in enumerate(keys)}
        if len(self._index) != len(keys):
            raise CorruptStoreError(directory, "a sequence key appears twice")
        # plain lists: indexing them with Python ints is several times faster than numpy scalars in read()
        self._shard_of, self._start, self._stop = (array.tolist() for array in where)
        self._bfloat16 = manifest.dtype == "bfloat16"

    @classmethod
    def open(
        cls, directory: str | Path, expect: TopKSpec | Mapping[str, Any] | None = None, *, verify: bool = True
    ) -> TopKStore:
        """Open the store at ``directory``.

        :param expect: manifest values the caller relies on (a :class:`TopKSpec`, or a mapping of any of
            :data:`EXPECTABLE_FIELDS`), e.g. the k, temperature and tokenizer the student is trained with.
        :param verify: check every file against the ``.complete`` checksums first (once per open; reads are
            never checked again). Without it, only a missing marker and a shard whose size or header does not
            add up are caught.
        :raises CorruptStoreError: naming the file and what is wrong with it.
        :raises StoreMismatchError: naming the field, the expected and the stored value.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise TopKStoreError(f"no top-k store at {directory}")
        problem = verify_complete_marker(directory) if verify else None
        if not verify and not (directory / COMPLETE_MARKER).is_file():
            problem = "no .complete marker (the write was interrupted)"
        if problem is not None:
            raise CorruptStoreError(directory, problem)
        manifest = _read_manifest(directory)
        _check_expectations(directory, manifest, expect or {})
        shards, keys, shard_of, starts, stops = [], [], [], [], []
        for number, info in enumerate(manifest.shards):
            arrays = _map_tensors(directory, info.file, _tensor_layout(manifest, info))
            offsets = np.array(arrays["offsets"])
            if offsets[0] != 0 or offsets[-1] != info.positions or bool((np.diff(offsets) < 0).any()):
                raise CorruptStoreError(directory, f"{info.file}: its offsets do not cover its rows in order")
            hexes = arrays["keys"].tobytes().hex()
            keys += [hexes[i : i + 2 * KEY_BYTES] for i in range(0, len(hexes), 2 * KEY_BYTES)]
            shard_of.append(np.full(info.sequences, number))
            starts.append(offsets[:-1])
            stops.append(offsets[1:])
            shards.append(_Shard(directory / info.file, arrays["ids"], arrays["logprobs"], arrays["gold"]))
        if len(keys) != manifest.sequences or sum(s.positions for s in manifest.shards) != manifest.positions:
            raise CorruptStoreError(directory, f"{MANIFEST}: its counts do not match its shards")
        empty = [np.zeros(0, dtype=np.int64)]
        where = tuple(np.concatenate(parts + empty) for parts in (shard_of, starts, stops))
        return cls(directory, manifest, shards, keys, where)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------- lookups
    @property
    def k(self) -> int:
        return self.manifest.k

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        """The keys of the stored sequences, in row (canonical) order."""
        return list(self._keys)

    def positions_of(self, key: str) -> int:
        """How many positions (tokens - 1) the sequence ``key`` has."""
        row = self._row(key)
        return self._stop[row] - self._start[row]

    def location(self, key: str) -> tuple[Path, int, int]:
        """The shard file of sequence ``key`` and its rows there (start, stop)."""
        row = self._row(key)
        return self._shards[self._shard_of[row]].path, self._start[row], self._stop[row]

    def _row(self, key: str, item: int = 0) -> int:
        row = self._index.get(key)
        if row is None:
            raise MissingSequenceError(self.directory, key, item)
        return row

    # ----------------------------------------------------------------------- reads
    def stored_rows(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence's rows as stored (ids int32, log-probs in the store's dtype, gold float32); copies."""
        row = self._row(key)
        shard, a, b = self._shards[self._shard_of[row]], self._start[row], self._stop[row]
        logprobs = torch.from_numpy(np.array(shard.logprobs[a:b]))
        if self._bfloat16:
            logprobs = logprobs.view(torch.bfloat16)
        return torch.from_numpy(np.array(shard.ids[a:b])), logprobs, torch.from_numpy(np.array(shard.gold[a:b]))

    def read(self, keys: Sequence[str]) -> TopKRows:
        """The rows of the sequences ``keys`` (a training batch), ragged, in this order (repeats allowed).

        :raises MissingSequenceError: naming the first key that the store lacks.
        """
        rows = [self._row(key, item) for item, key in enumerate(keys)]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([self._stop[r] - self._start[r] for r in rows], out=offsets[1:])
        total, k = int(offsets[-1]), self.manifest.k
        ids = np.empty((total, k), dtype=np.int32)
        logprobs = np.empty((total, k), dtype=np.uint16 if self._bfloat16 else np.float16)
        gold = np.empty(total, dtype=np.float32)
        at = 0
        for row in rows:  # one slice copy per sequence and tensor: the rows of a sequence are contiguous
            shard, a, b = self._shards[self._shard_of[row]], self._start[row], self._stop[row]
            ids[at : at + b - a] = shard.ids[a:b]
            logprobs[at : at + b - a] = shard.logprobs[a:b]
            gold[at : at + b - a] = shard.gold[a:b]
            at += b - a
        lp = torch.from_numpy(logprobs)
        return TopKRows(
            keys=tuple(keys),
            ids=torch.from_numpy(ids).long(),
            logprobs=(lp.view(torch.bfloat16) if self._bfloat16 else lp).float(),
            gold=torch.from_numpy(gold),
            offsets=torch.from_numpy(offsets),
        )


# --------------------------------------------------------------------------- reuse and merging
def reuse_store(
    directory: str | Path, spec: TopKSpec, *, what: str, console: Any = None, verify: bool = True
) -> TopKStore | None:
    """The complete store at ``directory`` if it is intact and holds ``spec``; ``None`` if there is none, or if it
    is damaged or holds something else, which is reported (a :class:`CacheWarning` naming ``what``) so that the
    caller rebuilds it. Call it holding the store's lock."""
    directory = Path(directory)
    if not directory.exists():
        return None
    try:
        return TopKStore.open(directory, expect=spec, verify=verify)
    except TopKStoreError as exc:
        reason = exc.reason if isinstance(exc, CorruptStoreError) else str(exc)
        message = f"top-k store {directory.name} ({what}) is unusable ({reason}); rebuilding it"
        warnings.warn(message, CacheWarning, stacklevel=2)
        warn(console, message)
        return None


def _open_parts(root: Path, spec: TopKSpec, key: str, world_size: int) -> list[TopKStore]:
    parts = []
    for rank in range(world_size):
        directory = part_directory(root, key, rank, world_size)
        if not directory.is_dir():
            raise TopKStoreError(
                f"top-k store {key}: part {rank} of {world_size} is missing at {directory} (did rank {rank} build it?)"
            )
        part = TopKStore.open(directory, expect=spec)
        if part.manifest.store != key or part.manifest.part != PartInfo(rank=rank, world_size=world_size):
            raise CorruptStoreError(directory, f"it is not part {rank} of {world_size} of store {key}")
        parts.append(part)
    return parts


def merge_topk_parts(
    root: str | Path,
    spec: TopKSpec,
    keys: Sequence[str],
    world_size: int,
    *,
    console: Any = None,
    shard_positions: int = SHARD_POSITIONS,
    keep_parts: bool = False,
) -> TopKStore:
    """Merge the parts that ``world_size`` processes built of the store of ``spec`` over ``keys`` into one store
    (then remove the parts unless ``keep_parts``); an existing complete store is returned as it is.

    Rows are rewritten in canonical order, so the result has the bytes of a one-process build of the same
    sequences with the same values. Run it in one process after every rank has built its part.

    :raises TopKStoreError: naming a missing part, or a key that no part or two parts hold.
    """
    root = Path(root)
    key = store_key(spec, keys)
    directory = root / key
    with file_lock(lock_path(root, key)):
        store = reuse_store(directory, spec, what="merged parts", console=console)
        if store is not None:
            return store
        parts = _open_parts(root, spec, key, world_size)
        holder = {name: part for part in parts for name in part.keys()}
        if len(holder) != sum(len(part) for part in parts) or set(holder) != set(keys):
            odd = sorted(set(keys) ^ set(holder)) or ["(one held by two parts)"]
            raise TopKStoreError(f"top-k store {key}: its parts do not hold its sequences exactly once: {odd[0]}")
        remove_stale_temporaries(root, key)
        order = sorted(holder, key=lambda name: (-holder[name].positions_of(name), name))
        with write_store(directory, spec, store=key, shard_positions=shard_positions) as writer:
            for name in order:
                writer.add(name, *holder[name].stored_rows(name))
        if not keep_parts:
            shutil.rmtree(root / f"{key}.parts", ignore_errors=True)
    return TopKStore.open(directory, verify=False)

"""Teacher-logit cache: every teacher predicts every split once; the student stage only reads the result.

One file per (teacher, split): ``<cache_dir>/logits/<key>.safetensors`` holding a float32 tensor
``logits [num_rows, num_classes]`` in the split's row order. The key is a fingerprint of the teacher's
checkpoint key, the split's texts, the teacher's tokenizer, ``max_length`` and the text columns, so any
change to one of them gives a new file, and an unchanged recipe finds its logits again. Files are written
atomically (temporary file + rename) and carry the SHA-256 of their tensor bytes in the safetensors
metadata; a file that fails to parse or to match its checksum is reported and rebuilt.

Predictions use length bucketing: samples are sorted by token count and batched by equal length, so no
batch is padded and the attention needs no mask; a batch holds at most ``batch_size`` rows and, on a CPU, at
most :data:`CPU_MAX_TOKENS` tokens (small batches stay in the CPU caches); the logits are put back in the
original order. Teachers whose tokenizers are the same (same fingerprint) share one tokenization of each
split. On a GPU the forward pass runs under bf16 autocast (fp32 logits are stored). Why each of these, with
measurements: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.errors import KdkitError
from kdkit.models import encode, load_classifier, load_tokenizer, tokenizer_fingerprint
from kdkit.utils import (
    CACHE_FORMAT,
    atomic_write_bytes,
    file_lock,
    hash_columns,
    hash_json,
    remove_stale_temporaries,
    sha256_bytes,
    warn,
)

#: The splits a teacher predicts, in this order.
SPLITS = ("labeled", "unlabeled", "tune", "eval")


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, truncated, from another format) and is being rebuilt."""


class NonFiniteLogitsError(KdkitError):
    """A model produced NaN or infinite logits."""


# --------------------------------------------------------------------------- prediction
def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


#: Token budget of a teacher batch on a CPU (rows x padded length). Measured on one core (docs/PERFORMANCE.md):
#: a MiniLM-L6 teacher runs ~1.35x faster in batches of about 4,096 tokens than in batches of 256 sentences of
#: ~27 tokens (~7,000), whose activations no longer stay in the CPU caches; 1,024-8,192 are all within 3%.
CPU_MAX_TOKENS = 4096


def length_buckets(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, *, same_length: bool = False
) -> list[list[int]]:
    """Indices sorted by decreasing length (ties keep their order), cut into batches.

    A batch holds at most ``batch_size`` rows and, if ``max_tokens`` is given, at most ``max_tokens`` tokens once
    padded to its longest (first) row; a row longer than ``max_tokens`` gets a batch of its own. With
    ``same_length`` a batch holds rows of one length only: no padding at all. The longest batch comes first, so
    running out of memory happens at once rather than at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (
            len(current) >= batch_size
            or (max_tokens is not None and (len(current) + 1) * lengths[current[0]] > max_tokens)
            or (same_length and lengths[i] != lengths[current[0]])
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def default_max_tokens(device: torch.device) -> int | None:
    """The token budget of a prediction batch when none is given: :data:`CPU_MAX_TOKENS` on a CPU, none on an
    accelerator (there the larger the batch, the better, up to ``batch_size``)."""
    return CPU_MAX_TOKENS if device.type == "cpu" else None


def predict_logits(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    text_columns: Sequence[str],
    max_length: int,
    batch_size: int,
    *,
    device: torch.device | None = None,
    who: str = "model",
    split: str = "",
    on_batch: Callable[[int], None] | None = None,
    max_tokens: int | None = None,
    encoded: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> torch.Tensor:
    """``[len(dataset), num_classes]`` float32 logits of ``model`` in the dataset's row order.

    :param max_tokens: also cap each batch at this many tokens (:func:`length_buckets`); ``None``:
        :func:`default_max_tokens` for the device. Rows are batched by equal length, so nothing is padded and
        the attention runs without a mask; the logits equal a padded forward's up to float rounding.
    :param encoded: the split already tokenized by ``kdkit.models.encode`` with this tokenizer and
        ``max_length`` (teachers sharing a tokenizer share it); tokenized here if not given.
    :param on_batch: called with the number of samples after each batch (progress bars).
    :raises NonFiniteLogitsError: naming ``who``, the split and the sample.
    """
    device = device or next(model.parameters()).device
    if encoded is None:
        encoded = encode(tokenizer, dataset, text_columns, max_length)
    names = list(encoded)
    size = len(dataset)
    num_classes = model.config.num_labels
    out = torch.empty(size, num_classes, dtype=torch.float32)
    if size == 0:
        return out
    lengths = [len(ids) for ids in encoded["input_ids"]]
    budget = default_max_tokens(device) if max_tokens is None else max_tokens
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device):
            for index in length_buckets(lengths, batch_size, budget, same_length=True):
                features = [{name: encoded[name][i] for name in names} for i in index]
                batch = tokenizer.pad(features, padding=True, return_tensors="pt")
                batch = {name: tensor.to(device) for name, tensor in batch.items()}
                logits = model(**batch).logits.float().cpu()
                finite = torch.isfinite(logits).all(dim=-1)
                if not bool(finite.all()):
                    bad = index[int((~finite).nonzero()[0, 0])]
                    row = dataset[bad]["row"] if "row" in dataset.column_names else bad
                    where = f" of the {split} split" if split else ""
                    raise NonFiniteLogitsError(
                        f"{who}: non-finite logits for sample {row}{where} (position {bad}); "
                        "the model diverged or its weights are corrupt"
                    )
                out[torch.as_tensor(index)] = logits
                if on_batch is not None:
                    on_batch(len(index))
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- keys and files
def split_fingerprint(dataset: Any, text_columns: Sequence[str]) -> str:
    """Hash of a split's texts in row order (labels do not change what a teacher predicts)."""
    return hash_columns([list(dataset[c]) for c in text_columns] + [[len(dataset)]], length=32)


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
    from safetensors.torch import save

    tensor = logits.detach().to(torch.float32).contiguous().cpu()
    metadata = {str(k): str(v) for k, v in info.items()}
    metadata.update(
        format=str(CACHE_FORMAT),
        rows=str(tensor.shape[0]),
        classes=str(tensor.shape[1]),
        sha256=sha256_bytes(tensor.numpy().tobytes()),
    )
    atomic_write_bytes(path, save({"logits": tensor}, metadata=metadata))


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


# --------------------------------------------------------------------------- the cache
@dataclass
class TeacherRef:
    """What the cache needs to know of a teacher (see :class:`kdkit.teachers.Teacher`)."""

    name: str
    key: str
    path: str
    trust_remote_code: bool = False


@dataclass
class CacheEntry:
    teacher: str
    split: str
    path: Path
    built: bool  #: computed in this call (False: read from the cache)


class LogitCache:
    """Teacher logits on disk under ``<cache_dir>/logits``.

    ``batch_size`` caps the rows of a prediction batch, ``max_tokens`` its tokens (``None``: the device's
    default, :func:`default_max_tokens`).

    >>> cache = LogitCache(cache_dir, batch_size=128)
    >>> logits = cache.teacher_logits(teachers, {"labeled": ds_l, "eval": ds_e}, ["sentence"], label_names,
    ...                               max_length=64)    # {"labeled": [rows, N, C], "eval": [...]}
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        batch_size: int = 64,
        max_tokens: int | None = None,
        device: torch.device | None = None,
        console: Any = None,
    ) -> None:
        self.directory = Path(cache_dir) / "logits"
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.device = device
        self.console = console
        self.entries: list[CacheEntry] = []  #: what the last call read or built

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _warn(self, message: str) -> None:
        warnings.warn(message, CacheWarning, stacklevel=3)
        warn(self.console, message)

    def _try_read(self, path: Path, rows: int, classes: int, label: str) -> torch.Tensor | None:
        if not path.exists():
            return None
        try:
            return read_logits(path, rows, classes)
        except ValueError as exc:
            self._warn(f"logit cache {path.name} ({label}) is {exc}; rebuilding it")
            path.unlink(missing_ok=True)
            return None

    def teacher_logits(
        self,
        teachers: Sequence[TeacherRef],
        splits: Mapping[str, Any],
        text_columns: Sequence[str],
        label_names: Sequence[str],
        *,
        max_length: int,
    ) -> dict[str, torch.Tensor]:
        """``{split: [rows, N, C]}`` for every teacher; each missing (teacher, split) is predicted once."""
        self.entries = []
        classes = len(label_names)
        split_hashes = {name: split_fingerprint(ds, text_columns) for name, ds in splits.items()}
        # tokenized splits, shared by the teachers whose tokenizers are the same (same fingerprint)
        encodings: dict[tuple[Any, ...], Mapping[str, Sequence[Sequence[int]]]] = {}
        per_teacher: list[dict[str, torch.Tensor]] = []
        for teacher in teachers:
            tokenizer = load_tokenizer(teacher.path, who=teacher.name, trust_remote_code=teacher.trust_remote_code)
            tok_hash = tokenizer_fingerprint(tokenizer)
            keys = {
                name: logits_key(
                    teacher_key=teacher.key,
                    split_hash=split_hashes[name],
                    tokenizer_hash=tok_hash,
                    max_length=max_length,
                    text_columns=text_columns,
                )
                for name in splits
            }
            found: dict[str, torch.Tensor] = {}
            for name, ds in splits.items():
                tensor = self._try_read(self.path_for(keys[name]), len(ds), classes, f"{teacher.name}, {name}")
                if tensor is not None:
                    found[name] = tensor
                    self.entries.append(CacheEntry(teacher.name, name, self.path_for(keys[name]), built=False))
            missing = [name for name in splits if name not in found]
            if missing:
                encoded = {}
                for name in missing:
                    shared = (tok_hash, tuple(tokenizer.model_input_names), name)
                    if shared not in encodings:
                        encodings[shared] = encode(tokenizer, splits[name], text_columns, max_length)
                    encoded[name] = encodings[shared]
                found.update(
                    self._build(teacher, tokenizer, splits, missing, keys, text_columns, label_names, max_length, encoded)
                )
            per_teacher.append(found)
        return {name: torch.stack([found[name] for found in per_teacher], dim=1) for name in splits}

    def _build(
        self,
        teacher: TeacherRef,
        tokenizer: Any,
        splits: Mapping[str, Any],
        missing: Sequence[str],
        keys: Mapping[str, str],
        text_columns: Sequence[str],
        label_names: Sequence[str],
        max_length: int,
        encoded: Mapping[str, Mapping[str, Sequence[Sequence[int]]]],
    ) -> dict[str, torch.Tensor]:
        self.directory.mkdir(parents=True, exist_ok=True)
        classes = len(label_names)
        result: dict[str, torch.Tensor] = {}
        with file_lock(self.directory / f"{teacher.key}.lock"):
            # another run may have built some of them while we waited for the lock
            todo = []
            for name in missing:
                path = self.path_for(keys[name])
                tensor = self._try_read(path, len(splits[name]), classes, f"{teacher.name}, {name}")
                if tensor is None:
                    remove_stale_temporaries(self.directory, path.name)
                    todo.append(name)
                else:
                    result[name] = tensor
                    self.entries.append(CacheEntry(teacher.name, name, path, built=False))
            if not todo:
                return result
            model = load_model_for_prediction(teacher, label_names)
            device = self.device or _default_device()
            model.to(device)
            try:
                with _progress(self.console) as progress:
                    for name in todo:
                        ds = splits[name]
                        task = progress.add_task(f"{teacher.name}: {name}", total=len(ds)) if progress else None

                        def advance(n: int, task: Any = task) -> None:
                            if progress is not None:
                                progress.advance(task, n)

                        tensor = predict_logits(
                            model,
                            tokenizer,
                            ds,
                            text_columns,
                            max_length,
                            self.batch_size,
                            device=device,
                            who=teacher.name,
                            split=name,
                            on_batch=advance,
                            max_tokens=self.max_tokens,
                            encoded=encoded[name],
                        )
                        path = self.path_for(keys[name])
                        write_logits(path, tensor, {"teacher": teacher.name, "teacher_key": teacher.key, "split": name})
                        result[name] = tensor
                        self.entries.append(CacheEntry(teacher.name, name, path, built=True))
            finally:
                # A model is normally freed by reference counting right here; a full gc.collect() costs ~0.3 s
                # per teacher on a busy interpreter (docs/PERFORMANCE.md), so collect only if it survived.
                survivor = weakref.ref(model)
                del model
                if survivor() is not None:
                    gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return result


def load_model_for_prediction(teacher: TeacherRef, label_names: Sequence[str]) -> Any:
    """The fine-tuned teacher model (its labels checked against the data). Only the cache build calls this."""
    return load_classifier(
        teacher.path,
        label_names=label_names,
        who=teacher.name,
        trust_remote_code=teacher.trust_remote_code,
        fine_tuned=True,
    )


def _default_device() -> torch.device:
    from kdkit.utils import default_device

    return default_device()


@contextlib.contextmanager
def _progress(console: Any) -> Any:
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield progress

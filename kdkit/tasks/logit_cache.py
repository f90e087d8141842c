"""The teacher-logit cache of sequence classification: every teacher predicts every split once; the student
stage only reads the result.

One file per (teacher, split): ``<cache_dir>/logits/<key>.safetensors`` (see :mod:`kdkit.store.logits` for the
key and the file format). A file that fails to parse or to match its checksum is reported and rebuilt.
Predictions use length bucketing without padding (:mod:`kdkit.modeling.predict`); each split is tokenized once per
tokenizer and kept in the token store (:mod:`kdkit.store.tokens`), so teachers sharing a tokenizer, the student
stage and later runs read it back. Why each of these, with measurements: docs/PERFORMANCE.md.

Several processes (torchrun) build each file together: the main process holds the teacher's lock (other runs
wait) and decides which files are missing; every process predicts its share of the missing splits' batches, the
shares are gathered, and the main process writes the file, byte for byte the one a single process writes.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.modeling.loading import load_classifier, load_tokenizer
from kdkit.modeling.predict import predict_logits
from kdkit.modeling.tokenize import tokenized, tokenizer_fingerprint
from kdkit.runtime import broadcast_flags, default_device, is_main_process, warn, world_size
from kdkit.store.files import remove_stale_temporaries
from kdkit.store.locks import file_lock
from kdkit.store.logits import CacheWarning, logits_key, read_logits, split_fingerprint, write_logits
from kdkit.store.tokens import TokenArrays, TokenStore
from kdkit.tasks.base import TeacherRef

#: The splits a teacher predicts, in this order.
SPLITS = ("labeled", "unlabeled", "tune", "eval")


# --------------------------------------------------------------------------- the cache
@dataclass
class CacheEntry:
    teacher: str
    split: str
    path: Path
    built: bool  #: computed in this call (False: read from the cache)
    predicted: int = 0  #: rows of it this process predicted (its share, when several processes built it)


@dataclass
class _Teacher:
    """One teacher during a call: its reference, tokenizer and the key of each split's file."""

    ref: TeacherRef
    tokenizer: Any
    tokenizer_hash: str
    keys: dict[str, str]


class LogitCache:
    """Teacher logits on disk under ``<cache_dir>/logits``.

    ``batch_size`` caps the rows of a prediction batch, ``max_tokens`` its tokens (``None``: the device's
    default, :func:`default_max_tokens`); ``tokens`` is where tokenized splits are kept (default: the token store
    of the same ``cache_dir``).

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
        tokens: TokenStore | None = None,
    ) -> None:
        self.directory = Path(cache_dir) / "logits"
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.device = device
        self.console = console
        self.tokens = tokens if tokens is not None else TokenStore(cache_dir, console)
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
        """``{split: [rows, N, C]}`` for every teacher; each missing (teacher, split) is predicted once. Every
        process of a run calls this together."""
        self.entries = []
        classes = len(label_names)
        split_hashes = {name: split_fingerprint(ds, text_columns) for name, ds in splits.items()}
        encodings: dict[tuple[str, str], TokenArrays] = {}  # (tokenizer, split) -> tokens, for this call
        per_teacher: list[dict[str, torch.Tensor]] = []
        for ref in teachers:
            teacher = self._teacher(ref, split_hashes, text_columns, max_length)
            found = self._read_present(teacher, splits, classes)
            missing = [name for name in splits if name not in found]
            if missing:
                tokens = {}
                for name in missing:
                    shared = (teacher.tokenizer_hash, split_hashes[name])
                    if shared not in encodings:
                        encodings[shared] = tokenized(
                            teacher.tokenizer, splits[name], text_columns, max_length, self.tokens,
                            label=f"{name} split", tokenizer_hash=teacher.tokenizer_hash,
                        )
                    tokens[name] = encodings[shared]
                found.update(self._build(teacher, splits, missing, label_names, max_length, tokens))
            per_teacher.append(found)
        return {name: torch.stack([found[name] for found in per_teacher], dim=1) for name in splits}

    def _teacher(
        self, ref: TeacherRef, split_hashes: Mapping[str, str], text_columns: Sequence[str], max_length: int
    ) -> _Teacher:
        tokenizer = load_tokenizer(ref.path, who=ref.name, trust_remote_code=ref.trust_remote_code)
        tok_hash = tokenizer_fingerprint(tokenizer)
        keys = {
            name: logits_key(
                teacher_key=ref.key, split_hash=split_hash, tokenizer_hash=tok_hash, max_length=max_length,
                text_columns=text_columns,
            )
            for name, split_hash in split_hashes.items()
        }
        return _Teacher(ref, tokenizer, tok_hash, keys)

    def _read_present(self, teacher: _Teacher, splits: Mapping[str, Any], classes: int) -> dict[str, torch.Tensor]:
        """The files of ``splits`` that are in the cache, read. The main process checks them (and removes a
        damaged one); every process then reads the ones it found, so all agree on what is missing."""
        main = is_main_process()
        found: dict[str, torch.Tensor] = {}
        if main:
            for name, ds in splits.items():
                tensor = self._try_read(self.path_for(teacher.keys[name]), len(ds), classes, f"{teacher.ref.name}, {name}")
                if tensor is not None:
                    found[name] = tensor
        present = broadcast_flags([name in found for name in splits])
        for (name, ds), there in zip(splits.items(), present, strict=True):
            if there:
                path = self.path_for(teacher.keys[name])
                if not main:  # the main process verified it a moment ago; files are replaced atomically
                    found[name] = read_logits(path, len(ds), classes)
                self.entries.append(CacheEntry(teacher.ref.name, name, path, built=False))
        return found

    def _build(
        self,
        teacher: _Teacher,
        splits: Mapping[str, Any],
        missing: Sequence[str],
        label_names: Sequence[str],
        max_length: int,
        tokens: Mapping[str, TokenArrays],
    ) -> dict[str, torch.Tensor]:
        self.directory.mkdir(parents=True, exist_ok=True)
        classes = len(label_names)
        main = is_main_process()
        with file_lock(self.directory / f"{teacher.ref.key}.lock") if main else contextlib.nullcontext():
            # another run may have built some of them while we waited for the lock
            result = self._read_present(teacher, {name: splits[name] for name in missing}, classes)
            todo = [name for name in missing if name not in result]
            if not todo:
                return result
            if main:
                for name in todo:
                    remove_stale_temporaries(self.directory, self.path_for(teacher.keys[name]).name)
            model = load_model_for_prediction(teacher.ref, label_names)
            device = self.device or default_device()
            model.to(device)
            try:
                for name in todo:
                    result[name] = self._predict(model, teacher, name, splits[name], tokens[name], device, max_length)
            finally:
                survivor = weakref.ref(model)
                del model
                _collect_if_alive(survivor)
        return result

    def _predict(
        self, model: Any, teacher: _Teacher, name: str, ds: Any, tokens: TokenArrays, device: torch.device,
        max_length: int,
    ) -> torch.Tensor:
        """One (teacher, split) file: this process's share predicted, the shares gathered, the file written."""
        predicted = 0
        with _progress(self.console) as progress:
            shared = f" (a share: {world_size()} processes)" if world_size() > 1 else ""
            total = len(ds) if world_size() == 1 else None
            task = progress.add_task(f"{teacher.ref.name}: {name}{shared}", total=total) if progress else None

            def advance(n: int) -> None:
                nonlocal predicted
                predicted += n
                if progress is not None:
                    progress.advance(task, n)

            # no text columns: the tokens are given
            tensor = predict_logits(
                model, teacher.tokenizer, ds, [], max_length, self.batch_size, device=device, who=teacher.ref.name,
                split=name, on_batch=advance, max_tokens=self.max_tokens, encoded=tokens, sharded=True,
            )
        path = self.path_for(teacher.keys[name])
        if is_main_process():
            write_logits(path, tensor, {"teacher": teacher.ref.name, "teacher_key": teacher.ref.key, "split": name})
        self.entries.append(CacheEntry(teacher.ref.name, name, path, built=True, predicted=predicted))
        return tensor


def _collect_if_alive(survivor: weakref.ref[Any]) -> None:
    """Free a teacher after its pass. A model is normally freed by reference counting when its last name is
    deleted; a full gc.collect() costs ~0.3 s per teacher on a busy interpreter (docs/PERFORMANCE.md), so collect
    only if it survived."""
    if survivor() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model_for_prediction(teacher: TeacherRef, label_names: Sequence[str]) -> Any:
    """The fine-tuned teacher model (its labels checked against the data). Only the cache build calls this."""
    return load_classifier(
        teacher.path,
        label_names=label_names,
        who=teacher.name,
        trust_remote_code=teacher.trust_remote_code,
        fine_tuned=True,
    )


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


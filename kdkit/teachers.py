"""The teacher ensemble: fine-tuned here (one per seed) or loaded from given checkpoints.

Fine-tuned teachers live in a content-addressed cache, ``<cache_dir>/teachers/<key>/``, where the key hashes
the base model (its files' content for a local directory, its id for a hub model, plus ``num_layers``), the
labeled training data (texts and labels in order), the label names, ``max_length``, every training setting that
changes the weights, and the seed. A recipe that asks for the same teacher again finds it and does not train.

Each entry is written into a temporary directory beside its final place and renamed when complete; its
``.complete`` marker records the SHA-256 of every file, checked before reuse. An entry that fails the check
is reported and trained again. A lock file per key keeps two runs sharing the cache from training the same
teacher twice at once.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdkit.cache import CacheWarning, TeacherRef
from kdkit.models import (
    check_labels,
    check_weights,
    describe,
    encode,
    load_classifier,
    load_config,
    load_tokenizer,
    model_identity,
    resolve_model_ref,
)
from kdkit.recipe import TeachersConfig
from kdkit.utils import (
    CACHE_FORMAT,
    atomic_write_json,
    barrier,
    commit_directory,
    file_lock,
    hash_columns,
    hash_json,
    is_main_process,
    read_json,
    remove_stale_temporaries,
    resolve_precision,
    staging_directory,
    verify_complete_marker,
    say,
    warn,
    write_complete_marker,
)

METADATA_FILE = "kdkit-teacher.json"


@dataclass
class Teacher(TeacherRef):
    """One member of the ensemble, ready to be loaded from ``path``."""

    index: int = 0
    seed: int | None = None
    source: Literal["trained", "checkpoint"] = "trained"
    trained_now: bool = False  #: trained by this call (False: found in the cache, or a given checkpoint)
    info: dict[str, Any] = field(default_factory=dict)


def labeled_fingerprint(dataset: Any, text_columns: Sequence[str], label_column: str = "label") -> str:
    """Hash of the teacher training data: texts and labels, in row order."""
    return hash_columns([list(dataset[c]) for c in text_columns] + [list(dataset[label_column])], length=32)


def teacher_key(
    cfg: TeachersConfig,
    *,
    seed: int,
    data_hash: str,
    label_names: Sequence[str],
    max_length: int,
    world_size: int = 1,
) -> tuple[str, dict[str, Any]]:
    """The cache key of the teacher trained with ``seed``, and the inputs it hashes."""
    from kdkit.student import NON_RESULT_FIELDS

    assert cfg.model is not None
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}
    inputs = {
        "kind": "teacher",
        "format": CACHE_FORMAT,
        "model": describe(cfg.model),
        "model_identity": model_identity(resolve_model_ref(cfg.model)),
        "num_layers": cfg.num_layers,
        "data": data_hash,
        "label_names": list(label_names),
        "max_length": max_length,
        "train": settings,
        "precision": resolve_precision(cfg.precision),
        "world_size": world_size,
        "seed": seed,
    }
    # the model's description is informative only; its identity decides
    return hash_json({k: v for k, v in inputs.items() if k != "model"}, length=24), inputs


def train_teacher(
    cfg: TeachersConfig,
    *,
    seed: int,
    labeled: Any,
    text_columns: Sequence[str],
    label_names: Sequence[str],
    max_length: int,
    out_dir: Path,
    who: str,
) -> dict[str, Any]:
    """Fine-tune one teacher on ``labeled`` and save it (safetensors + tokenizer) into ``out_dir``."""
    from transformers import set_seed

    from kdkit.student import EncodedDataset, make_trainer, training_arguments

    resolved = resolve_model_ref(cfg.model)  # type: ignore[arg-type]
    set_seed(seed)
    tokenizer = load_tokenizer(resolved, who=who, trust_remote_code=cfg.trust_remote_code)
    model = load_classifier(
        resolved,
        label_names=label_names,
        who=who,
        num_layers=cfg.num_layers,
        trust_remote_code=cfg.trust_remote_code,
        pooling=cfg.pooling,
    )
    dataset = EncodedDataset(encode(tokenizer, labeled, text_columns, max_length), list(labeled["label"]))
    work = out_dir / ".trainer"
    args = training_arguments(cfg, output_dir=work, seed=seed, where="teachers")
    trainer = make_trainer(model, tokenizer, dataset, args)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {
        "steps": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "seconds": round(seconds, 3),
        "train_samples": len(dataset),
    }


def prepare_teachers(
    cfg: TeachersConfig,
    *,
    cache_dir: str | Path,
    labeled: Any,
    text_columns: Sequence[str],
    label_names: Sequence[str],
    max_length: int,
    console: Any = None,
    world_size: int = 1,
) -> list[Teacher]:
    """The ensemble, each teacher ready to load: given checkpoints are checked, missing teachers trained."""
    if cfg.trust_remote_code:
        warn(console, "teachers.trust_remote_code is on: model code will run")
    if cfg.checkpoints is not None:
        return [
            _given_teacher(ref, i, label_names, cfg.trust_remote_code, console) for i, ref in enumerate(cfg.checkpoints)
        ]

    root = Path(cache_dir) / "teachers"
    root.mkdir(parents=True, exist_ok=True)
    data_hash = labeled_fingerprint(labeled, text_columns)
    teachers = []
    for i, seed in enumerate(cfg.seeds):
        who = f"teacher {i + 1} (seed {seed})"
        key, inputs = teacher_key(
            cfg, seed=seed, data_hash=data_hash, label_names=label_names, max_length=max_length, world_size=world_size
        )
        final = root / key
        trained_now = False
        main = is_main_process()
        # Several processes (torchrun) train each teacher together; the main one alone takes the cache lock (so
        # other runs wait) and writes the entry, and the others look at the cache only once it holds the lock.
        with file_lock(root / f"{key}.lock") if main else contextlib.nullcontext():
            barrier()
            problem = verify_complete_marker(final) if final.exists() else "absent"
            if problem is not None:
                if final.exists() and main:
                    message = f"{who}: cached checkpoint {final} is unusable ({problem}); training it again"
                    warnings.warn(message, CacheWarning, stacklevel=2)
                    warn(console, message)
                if main:
                    remove_stale_temporaries(root, key)
                say(console, f"  training {who} on {len(labeled)} labeled samples")
                with _staging(final, main) as tmp:
                    info = train_teacher(
                        cfg,
                        seed=seed,
                        labeled=labeled,
                        text_columns=text_columns,
                        label_names=label_names,
                        max_length=max_length,
                        out_dir=tmp,
                        who=who,
                    )
                    if main:
                        atomic_write_json(tmp / METADATA_FILE, {"key": key, "inputs": inputs, "training": info})
                        write_complete_marker(tmp, {"key": key})
                        commit_directory(tmp, final)
                trained_now = True
            else:
                say(console, f"  {who}: reusing {final}")
            barrier()  # the entry is in place before any process reads it
        metadata = read_json(final / METADATA_FILE)
        teachers.append(
            Teacher(
                name=who,
                key=key,
                path=str(final),
                trust_remote_code=cfg.trust_remote_code,
                index=i,
                seed=seed,
                source="trained",
                trained_now=trained_now,
                info=dict(metadata.get("training", {})),
            )
        )
    return teachers


@contextlib.contextmanager
def _staging(final: Path, main: bool) -> Iterator[Path]:
    """Where a teacher is saved while training: beside its cache entry for the main process; a throwaway
    folder for the other processes of a torchrun run (they train alongside it and keep nothing)."""
    if main:
        with staging_directory(final) as tmp:
            yield tmp
    else:
        with tempfile.TemporaryDirectory(prefix="kdkit-teacher-") as tmp:
            yield Path(tmp)


def _given_teacher(ref: Any, index: int, label_names: Sequence[str], trust_remote_code: bool, console: Any) -> Teacher:
    who = f"teacher {index + 1} ({describe(ref)})"
    resolved = resolve_model_ref(ref)
    check_weights(resolved, who)
    check_labels(load_config(resolved, who=who, trust_remote_code=trust_remote_code), label_names, who)
    key = hash_json({"kind": "checkpoint", "format": CACHE_FORMAT, "model": model_identity(resolved)}, length=24)
    say(console, f"  {who}: given checkpoint {resolved}")
    return Teacher(
        name=who, key=key, path=resolved, trust_remote_code=trust_remote_code, index=index, seed=None,
        source="checkpoint",
    )


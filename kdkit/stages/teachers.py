"""Stage 2, teachers: the ensemble, fine-tuned here (one per seed) or loaded from given checkpoints.

Fine-tuned teachers live in a content-addressed cache, ``<cache_dir>/teachers/<key>/``, where the key hashes
the base model (its files' content for a local directory, its id for a hub model, plus ``num_layers``), the
labeled training data (texts and labels in order), the label names, ``max_length``, every training setting that
changes the weights (the batch as the effective batch, not the number of processes), and the seed. A recipe that
asks for the same teacher again finds it and does not train.

Each entry is written into a temporary directory beside its final place and renamed when complete; its
``.complete`` marker records the SHA-256 of every file, checked before reuse. An entry that fails the check
is reported and trained again. A lock file per key keeps two runs sharing the cache from training the same
teacher twice at once.

Under torchrun with K processes and a global batch, the missing teachers are dealt whole, one per process at a
time: each process trains its own with a plain single-process Trainer (no gradient all-reduce), and the
``missing % K`` left over train with DDP over all processes (:func:`schedule_teachers`). A teacher trained alone
in a process is byte for byte the teacher one process would train. Teachers whose weights the Trainer shards
(``[teachers.trainer] fsdp`` or ``deepspeed``) all train over every process, and are saved through the Trainer by
every process (it gathers the full weights; the main one writes them).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdkit.modeling.loading import check_positions, load_tokenizer, written_by_this_process
from kdkit.modeling.refs import describe, model_identity, resolve_model_ref
from kdkit.modeling.tokenize import mostly_unknown
from kdkit.recipe.schema import TeachersConfig
from kdkit.runtime import (
    all_gather_rows,
    barrier,
    broadcast_flags,
    is_main_process,
    rank,
    resolve_precision,
    say,
    wait_for_all,
    warn,
)
from kdkit.store.files import (
    CACHE_FORMAT,
    atomic_write_json,
    commit_directory,
    read_json,
    remove_stale_temporaries,
    staging_directory,
    verify_complete_marker,
    write_complete_marker,
)
from kdkit.store.hashing import arrow_column, hash_arrow_columns, hash_json
from kdkit.store.locks import file_lock
from kdkit.store.logits import CacheWarning
from kdkit.store.tokens import TokenArrays, TokenStore
from kdkit.tasks.base import Task, TeacherRef
from kdkit.tasks.classification import SequenceClassification
from kdkit.training.arguments import asks_for_sharding, batch_settings, per_device_batch, training_arguments
from kdkit.training.loop import fit

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
    """Hash of the teacher training data: texts and labels, in row order (read through Arrow; the value
    :func:`kdkit.store.hashing.hash_columns` gives for the same rows, so cached teachers keep their keys)."""
    columns = [*text_columns, label_column]
    return hash_arrow_columns([arrow_column(dataset, c) for c in columns], length=32)


def teacher_key(
    cfg: TeachersConfig,
    *,
    seed: int,
    data_hash: str,
    label_names: Sequence[str],
    max_length: int,
    world_size: int = 1,
    task_settings: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key of the teacher trained with ``seed``, and the inputs it hashes.

    The batch enters as the effective batch (:func:`~kdkit.training.arguments.batch_settings`), never as the
    number of processes: a teacher trained on one GPU is reused on eight when the effective batch is the same.
    ``world_size`` matters only for ``batch_scope = "per-device"``, where the effective batch grows with it.

    :param task_settings: the task's :meth:`~kdkit.tasks.base.Task.data_settings` (how rows become samples);
        keyed only when not empty, so that classification keys stay as they were.
    """
    assert cfg.model is not None
    inputs = {
        "kind": "teacher",
        "format": CACHE_FORMAT,
        "model": describe(cfg.model),
        "model_identity": model_identity(resolve_model_ref(cfg.model)),
        "num_layers": cfg.num_layers,
        "data": data_hash,
        "label_names": list(label_names),
        "max_length": max_length,
        "train": batch_settings(cfg, world_size, "teachers"),
        "precision": resolve_precision(cfg.precision),
        # Keys once held the number of processes here; the batch above now says all that mattered of it. The
        # field stays, always 1, so that teachers trained by one process before keep their keys.
        "world_size": 1,
        "seed": seed,
        **({"task": task_settings} if task_settings else {}),
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
    task: Task | None = None,
    console: Any = None,
    tokens: TokenArrays | None = None,
    processes: int | None = None,
    tune: Any = None,
    tune_tokens: TokenArrays | None = None,
) -> dict[str, Any]:
    """Fine-tune one teacher on ``labeled`` and save it (safetensors + tokenizer) into ``out_dir``; with
    ``teachers.early_stopping``, evaluated on ``tune`` and ended with its best checkpoint.

    :param tokens: ``labeled`` tokenized already (with this teacher's tokenizer and ``max_length``); ``tune_tokens``
        the same for ``tune``.
    :param processes: how many processes train it together (default: all of the run's; 1 in a torchrun run:
        this process alone, while the others train other teachers).
    """
    from transformers import set_seed

    task = task or SequenceClassification()
    resolved = resolve_model_ref(cfg.model)  # type: ignore[arg-type]
    set_seed(seed)
    tokenizer = load_tokenizer(resolved, who=who, trust_remote_code=cfg.trust_remote_code)
    model = task.load_model(
        resolved,
        label_names=label_names,
        who=who,
        num_layers=cfg.num_layers,
        trust_remote_code=cfg.trust_remote_code,
        pooling=cfg.pooling,
        keep_layers=cfg.keep_layers,
        config=cfg.config,
    )
    check_positions(model.config, max_length, who)
    dataset = task.train_dataset(tokenizer, labeled, text_columns, max_length, name="labeled", tokens=tokens)
    unknown = mostly_unknown(tokenizer, dataset.encoded, who, "labeled")
    if unknown:
        warn(console, unknown)
    tune_dataset = None
    if cfg.early_stopping is not None and tune is not None:
        tune_dataset = task.train_dataset(tokenizer, tune, text_columns, max_length, name="tune", tokens=tune_tokens)
    work = out_dir / ".trainer"
    args = training_arguments(cfg, output_dir=work, seed=seed, where="teachers", processes=processes)
    # trained alone (teachers dealt one per process), this process writes its checkpoints and model whatever its
    # rank; trained with DDP, FSDP or DeepSpeed, the main process does
    with written_by_this_process(model) if args.world_size == 1 else contextlib.nullcontext():
        trainer, done = fit(
            model, tokenizer, dataset, args, objective=task.objective(), label=who, console=console,
            eval_dataset=tune_dataset, compute_metrics=task.tune_metrics, early_stopping=cfg.early_stopping,
            collator=task.collator(tokenizer),
        )
        shutil.rmtree(work, ignore_errors=True)
        # every process: under FSDP / DeepSpeed the Trainer gathers the weights from all of them
        trainer.save_final_model(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return {
        "steps": done.steps,
        "train_loss": done.train_loss,
        "seconds": round(done.seconds, 3),
        "train_samples": len(dataset),
        "best_step": done.best_step,
        "processes": args.world_size,
        "per_device_batch": args.per_device_train_batch_size,
    }


@dataclass
class _Plan:
    """One teacher to prepare: where it stands in the recipe, its seed, name and cache key."""

    index: int
    seed: int
    who: str
    key: str
    inputs: dict[str, Any]


def schedule_teachers(
    missing: Sequence[int], processes: int, batch_scope: str, sharded: bool = False
) -> tuple[list[list[int]], list[int]]:
    """Who trains which missing teacher: ``(alone, shared)``, where ``alone[r]`` lists the teachers process ``r``
    trains by itself (no gradient all-reduce) and ``shared`` those all processes train together (DDP).

    With at least as many missing teachers as processes, they are dealt round-robin, whole, one per process at a
    time; the ``len(missing) % processes`` left over train with DDP. A global batch makes both the same teacher
    (same effective batch); with ``batch_scope = "per-device"`` the effective batch depends on how many processes
    train, so every teacher trains with DDP over all of them, as the recipe's batch means. So does every teacher
    whose weights the Trainer shards over the processes (``sharded``: FSDP, DeepSpeed), which one process alone
    cannot train.
    """
    if processes <= 1 or batch_scope == "per-device" or sharded:
        return [[] for _ in range(max(processes, 1))], list(missing)
    dealt = len(missing) - len(missing) % processes
    alone = [list(missing[r:dealt:processes]) for r in range(processes)]
    return alone, list(missing[dealt:])


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
    tune: Any = None,
    task: Task | None = None,
) -> list[Teacher]:
    """The ensemble, each teacher ready to load: given checkpoints are checked, missing teachers trained (under
    torchrun, whole teachers one per process where there are enough, see :func:`schedule_teachers`).

    :param tune: the tune split, which ``teachers.early_stopping`` evaluates on (then part of each teacher's key).
    :param task: the run's task (sequence classification by default).
    """
    task = task or SequenceClassification()
    if cfg.trust_remote_code:
        warn(console, "teachers.trust_remote_code is on: model code will run")
    if cfg.checkpoints is not None:
        return [
            _given_teacher(ref, i, label_names, cfg.trust_remote_code, console, task)
            for i, ref in enumerate(cfg.checkpoints)
        ]
    root = Path(cache_dir) / "teachers"
    root.mkdir(parents=True, exist_ok=True)
    data_hash = labeled_fingerprint(labeled, text_columns)
    early = cfg.early_stopping is not None and tune is not None
    if early:
        data_hash = hash_json({"labeled": data_hash, "tune": labeled_fingerprint(tune, text_columns)}, length=32)
    plans = []
    for i, seed in enumerate(cfg.seeds):
        key, inputs = teacher_key(
            cfg, seed=seed, data_hash=data_hash, label_names=label_names, max_length=max_length, world_size=world_size,
            task_settings=task.data_settings(),
        )
        plans.append(_Plan(i, seed, f"teacher {i + 1} (seed {seed})", key, inputs))
    # the main process looks (checksums every file); every process acts on its answer
    main = is_main_process()
    absent = broadcast_flags([main and verify_complete_marker(root / p.key) is not None for p in plans])
    missing = [p.index for p, gone in zip(plans, absent, strict=True) if gone]
    alone, shared = schedule_teachers(missing, world_size, cfg.batch_scope, asks_for_sharding(cfg))
    if shared and world_size > 1:
        per_device_batch(cfg, world_size, "teachers")  # an uneven global batch fails before any teacher trains
    splits = {"tokens": labeled, **({"tune_tokens": tune} if early else {})}  # named as train_teacher takes them
    tokens = _tokens(cfg, splits, text_columns, max_length, cache_dir, console, task) if missing else {}
    train = {
        p.index: functools.partial(
            train_teacher, cfg, seed=p.seed, labeled=labeled, text_columns=text_columns, label_names=label_names,
            max_length=max_length, who=p.who, console=console, task=task, tune=tune, **tokens,
        )
        for p in plans
    }
    trained = [False] * len(plans)
    for i in alone[rank()] if world_size > 1 else []:
        trained[i] = _cached_teacher_alone(root, plans[i], train[i], len(labeled), console)
    if any(alone):
        wait_for_all()  # the others' teachers are in the cache before anyone goes on
    for i in shared:
        trained[i] = _cached_teacher(root, plans[i].key, plans[i].inputs, train[i], plans[i].who, len(labeled), console)
    return [_teacher(cfg, root, plan, trained_now, console) for plan, trained_now in zip(plans, _any(trained), strict=True)]


def _tokens(
    cfg: TeachersConfig, splits: Mapping[str, Any], text_columns: Sequence[str], max_length: int,
    cache_dir: str | Path, console: Any, task: Task | None,
) -> dict[str, TokenArrays]:
    """The teachers' training splits (labeled, and tune for early stopping) tokenized with their tokenizer, once
    for all of them and kept for later stages, by every process together: before the teachers are dealt, since
    the token store is built collectively."""
    tokenizer = load_tokenizer(
        resolve_model_ref(cfg.model), who="teachers.model", trust_remote_code=cfg.trust_remote_code  # type: ignore[arg-type]
    )
    store = TokenStore(cache_dir, console)
    encode = (task or SequenceClassification()).encode
    return {name: encode(tokenizer, ds, text_columns, max_length, store=store) for name, ds in splits.items()}


def _any(flags: Sequence[bool]) -> list[bool]:
    """For each teacher, whether any process trained it now."""
    gathered = all_gather_rows(torch.tensor([[int(f) for f in flags]], dtype=torch.int64))
    return [bool(v) for v in torch.cat(gathered).amax(dim=0).tolist()] if flags else []


def _teacher(cfg: TeachersConfig, root: Path, plan: _Plan, trained_now: bool, console: Any) -> Teacher:
    """A prepared teacher, as the later stages see it."""
    final = root / plan.key
    if not trained_now:
        say(console, f"  {plan.who}: reusing {final}")
    metadata = read_json(final / METADATA_FILE)
    return Teacher(
        name=plan.who, key=plan.key, path=str(final), trust_remote_code=cfg.trust_remote_code, index=plan.index,
        seed=plan.seed, source="trained", trained_now=trained_now, info=dict(metadata.get("training", {})),
    )


def _cached_teacher(
    root: Path, key: str, inputs: dict[str, Any], train: Callable[..., dict[str, Any]], who: str, rows: int,
    console: Any,
) -> bool:
    """Make sure ``root/key`` holds a complete teacher, training it with ``train(out_dir=...)`` if it does not;
    returns whether it was trained now.

    Several processes (torchrun) train the teacher together (DDP); the main one alone takes the cache lock (so
    other runs wait) and writes the entry, and the others look at the cache only once it holds the lock.
    """
    main = is_main_process()
    with file_lock(root / f"{key}.lock") if main else contextlib.nullcontext():
        barrier()
        trained_now = _ensure_entry(root, key, inputs, train, who, rows, console, main=main)
        barrier()  # the entry is in place before any process reads it
    return trained_now


def _cached_teacher_alone(
    root: Path, plan: _Plan, train: Callable[..., dict[str, Any]], rows: int, console: Any
) -> bool:
    """:func:`_cached_teacher` for a teacher this process trains by itself while the others train others: its
    own lock, no barrier, a plain single-process Trainer (``processes=1``)."""
    alone = functools.partial(train, processes=1)
    with file_lock(root / f"{plan.key}.lock"):
        return _ensure_entry(root, plan.key, plan.inputs, alone, plan.who, rows, console, main=True)


def _ensure_entry(
    root: Path, key: str, inputs: dict[str, Any], train: Callable[..., dict[str, Any]], who: str, rows: int,
    console: Any, *, main: bool,
) -> bool:
    """Under the entry's lock: train and commit the teacher unless a complete entry is there; ``main`` writes."""
    final = root / key
    problem = verify_complete_marker(final) if final.exists() else "absent"
    if problem is None:
        return False
    if final.exists() and main:
        message = f"{who}: cached checkpoint {final} is unusable ({problem}); training it again"
        warnings.warn(message, CacheWarning, stacklevel=4)
        warn(console, message)
    if main:
        remove_stale_temporaries(root, key)
    say(console, f"  training {who} on {rows} labeled samples")
    with _staging(final, main) as tmp:
        info = train(out_dir=tmp)
        if main:
            atomic_write_json(tmp / METADATA_FILE, {"key": key, "inputs": inputs, "training": info})
            write_complete_marker(tmp, {"key": key})
            commit_directory(tmp, final)
    return True


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


def _given_teacher(
    ref: Any, index: int, label_names: Sequence[str], trust_remote_code: bool, console: Any, task: Task
) -> Teacher:
    who = f"teacher {index + 1} ({describe(ref)})"
    resolved = resolve_model_ref(ref)
    task.check_checkpoint(resolved, who=who, label_names=label_names, trust_remote_code=trust_remote_code)
    key = hash_json({"kind": "checkpoint", "format": CACHE_FORMAT, "model": model_identity(resolved)}, length=24)
    say(console, f"  {who}: given checkpoint {resolved}")
    return Teacher(
        name=who, key=key, path=resolved, trust_remote_code=trust_remote_code, index=index, seed=None,
        source="checkpoint",
    )

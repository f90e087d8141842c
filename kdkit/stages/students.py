"""Stage 4, students: the distilled student (one run per seed) and, if asked, the labels-only student trained for
as many optimizer steps, each over the cached teacher outputs.

Each run lives in ``<run_dir>/students/<kind>-seed<seed>-<hash>/``, where the hash covers every setting that
changes the result: a changed recipe starts a fresh run, and the same recipe resumes its last checkpoint or reuses
the finished run (``done.json`` + ``eval_logits.safetensors``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from kdkit._version import __version__
from kdkit.errors import KdkitError
from kdkit.modeling.loading import check_positions, load_tokenizer
from kdkit.modeling.refs import model_identity, resolve_model_ref
from kdkit.modeling.tokenize import mostly_unknown
from kdkit.recipe.schema import Recipe
from kdkit.runtime import barrier, is_main_process, resolve_precision, say, warn, world_size
from kdkit.stages.data import RunData
from kdkit.stages.results import PartialResults, StudentFigures, StudentKind
from kdkit.stages.teacher_outputs import TeacherOutputs
from kdkit.stages.teachers import Teacher
from kdkit.store.files import atomic_write_json
from kdkit.store.hashing import hash_json
from kdkit.store.locks import file_lock
from kdkit.store.logits import read_logits, write_logits
from kdkit.store.tokens import TokenArrays, TokenStore
from kdkit.tasks.base import StudentSets, Task
from kdkit.tasks.classification import SequenceClassification
from kdkit.training.arguments import batch_settings, training_arguments
from kdkit.training.checkpoints import remove_all_checkpoints
from kdkit.training.loop import fit

DONE_FILE = "done.json"
MODEL_DIR = "model"
EVAL_LOGITS_FILE = "eval_logits.safetensors"


@dataclass
class StudentRun:
    """One trained student (one seed, distilled or labels-only)."""

    seed: int
    kind: StudentKind
    directory: Path
    steps: int  #: optimizer steps taken
    train_samples: int
    eval_logits: torch.Tensor  #: the task's eval scores: ``[eval rows, C]`` logits; ``[positions, 2]`` for LMs
    seconds: float
    reused: bool = False  #: finished by an earlier run of the same recipe
    resumed_from: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None  #: early stopping: the step of the checkpoint kept
    samples: list[dict[str, str]] = field(default_factory=list)  #: seeded generations (causal LMs)

    def figures(self, metrics: Mapping[str, float]) -> StudentFigures:
        return StudentFigures(
            seed=self.seed,
            steps=self.steps,
            train_samples=self.train_samples,
            seconds=round(self.seconds, 3),
            reused=self.reused,
            directory=str(self.directory),
            metrics=dict(metrics),
            best_step=self.best_step,
        )


class DoneRecord(BaseModel):
    """``done.json``: a student run finished (its eval predictions are in ``eval_logits.safetensors``)."""

    seed: int
    kind: StudentKind
    steps: int
    train_samples: int
    seconds: float
    log: list[dict[str, Any]] = Field(default_factory=list)
    best_step: int | None = None  #: early stopping: the step of the checkpoint kept
    evaluations: list[dict[str, Any]] = Field(default_factory=list)  #: early stopping: the tune-split figures
    samples: list[dict[str, str]] = Field(default_factory=list)  #: seeded generations (causal LMs)


@dataclass
class StudentRuns:
    """What stage 4 hands to the evaluation: every student run, by kind, in seed order."""

    distilled: list[StudentRun]
    labels_only: list[StudentRun]


def student_config_hash(recipe: Recipe, extra: Mapping[str, Any]) -> str:
    """The hash in a student run's folder name. The batch enters as the effective batch
    (:func:`~kdkit.training.arguments.batch_settings`), not as the number of processes: runs on 1 and on K
    processes with the same effective batch are one run."""
    cfg = recipe.student
    settings = batch_settings(cfg, world_size(), "student")
    return hash_json(
        {
            "model": model_identity(resolve_model_ref(cfg.model)),
            "num_layers": cfg.num_layers,
            "precision": resolve_precision(cfg.precision),
            "train": settings,
            "max_length": recipe.data.max_length,
            **extra,
        },
        length=10,
    )


def _finished_run(directory: Path, seed: int, kind: StudentKind, rows: int, classes: int, console: Any) -> StudentRun | None:
    """The run finished earlier in ``directory``, or None (an unreadable one is reported and forgotten)."""
    done_file, logits_file = directory / DONE_FILE, directory / EVAL_LOGITS_FILE
    if not (done_file.is_file() and logits_file.is_file()):
        return None
    try:
        done = DoneRecord.model_validate_json(done_file.read_bytes())
        return StudentRun(
            seed=seed,
            kind=kind,
            directory=directory,
            steps=done.steps,
            train_samples=done.train_samples,
            eval_logits=read_logits(logits_file, rows=rows, classes=classes),
            seconds=done.seconds,
            reused=True,
            log=done.log,
            best_step=done.best_step,
            samples=done.samples,
        )
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        warn(console, f"finished run in {directory} is unreadable ({exc}); training it again")
        done_file.unlink(missing_ok=True)
        return None


def train_student(
    recipe: Recipe,
    *,
    tokenizer: Any,
    dataset: torch.utils.data.Dataset,
    eval_split: Any,
    text_columns: Sequence[str],
    label_names: Sequence[str],
    seed: int,
    kind: StudentKind,
    directory: Path,
    teacher_logits: Any = None,
    loss_fn: Any = None,
    max_steps: int | None = None,
    console: Any = None,
    task: Task | None = None,
    fresh: bool = False,
    tune_dataset: torch.utils.data.Dataset | None = None,
    eval_tokens: TokenArrays | None = None,
) -> StudentRun:
    """Train (or resume, or reuse) one student in ``directory`` and predict the eval split.

    ``directory`` must be specific to the run's settings (the pipeline puts a config hash in its name): a
    ``checkpoint-<step>`` found there is resumed, and a finished run (``done.json`` + ``eval_logits.safetensors``) is
    reused as it is. ``fresh`` forgets both first: the student is trained from the start. With
    ``student.early_stopping``, ``tune_dataset`` is evaluated as it says and the best checkpoint is kept. The eval
    split (``eval_tokens`` when tokenized already) is predicted by every process of the run, a share each.
    """
    # two runs sharing a cache may need the same labels-only student at once: the second waits, then reuses it
    with _run_lock(directory):
        if fresh:
            _forget_run(directory)
        task = task or SequenceClassification()
        finished = _finished_run(directory, seed, kind, *task.prediction_shape(eval_split, label_names), console)
        if finished is not None:
            return finished
        return _train_student(
            recipe, tokenizer=tokenizer, dataset=dataset, eval_split=eval_split, text_columns=text_columns,
            label_names=label_names, seed=seed, kind=kind, directory=directory, teacher_logits=teacher_logits,
            loss_fn=loss_fn, max_steps=max_steps, console=console, task=task, tune_dataset=tune_dataset,
            eval_tokens=eval_tokens,
        )


@contextlib.contextmanager
def _run_lock(directory: Path) -> Iterator[None]:
    """A lock on one student run folder. Several processes of one torchrun run train it together: the main one
    alone takes the lock (so that other runs wait), the others wait for it at a barrier."""
    main = is_main_process()
    directory.mkdir(parents=True, exist_ok=True)
    # inside the run's own folder: the students/ folder holds run folders only
    with file_lock(directory / ".lock") if main else contextlib.nullcontext():
        barrier()
        yield


def _train_student(
    recipe: Recipe,
    *,
    tokenizer: Any,
    dataset: torch.utils.data.Dataset,
    eval_split: Any,
    text_columns: Sequence[str],
    label_names: Sequence[str],
    seed: int,
    kind: StudentKind,
    directory: Path,
    teacher_logits: Any,
    loss_fn: Any,
    max_steps: int | None,
    console: Any,
    task: Task,
    tune_dataset: torch.utils.data.Dataset | None,
    eval_tokens: TokenArrays | None,
) -> StudentRun:
    from transformers import set_seed

    cfg = recipe.student
    who = "student" if kind == "distilled" else "labels-only student"
    set_seed(seed)
    model = task.load_model(
        resolve_model_ref(cfg.model), label_names=label_names, who=who, num_layers=cfg.num_layers,
        trust_remote_code=cfg.trust_remote_code, pooling=cfg.pooling, keep_layers=cfg.keep_layers, config=cfg.config,
    )
    check_positions(model.config, recipe.data.max_length, who)
    # checkpoint-<step>/ folders and the report_to logs (runs/ for TensorBoard) live in the run's directory
    args = training_arguments(cfg, output_dir=directory, seed=seed, save_steps=cfg.save_steps, max_steps=max_steps)
    if (teacher_logits is None) != (loss_fn is None):
        raise ValueError("give both teacher_logits and loss_fn, or neither")
    trainer, done = fit(
        model, tokenizer, dataset, args, objective=task.objective(teacher_logits, loss_fn), resume=True,
        label=f"{who} (seed {seed})", console=console, eval_dataset=tune_dataset,
        compute_metrics=task.tune_metrics, early_stopping=cfg.early_stopping, collator=task.collator(tokenizer),
    )
    # every process: under FSDP / DeepSpeed the Trainer gathers the weights from all of them to save the model
    trainer.save_final_model(directory / MODEL_DIR)
    if trainer.weights_sharded:
        model = _saved_model(task, directory, label_names, who, cfg.trust_remote_code, trainer.args.device)
    eval_logits = task.predict(
        model, tokenizer, eval_split, text_columns, recipe.data.max_length, cfg.eval_batch_size,
        device=next(model.parameters()).device, who=who, split="eval", encoded=eval_tokens, sharded=True,
    )
    record = DoneRecord(
        seed=seed, kind=kind, steps=done.steps, train_samples=len(dataset), seconds=done.seconds, log=done.log,
        best_step=done.best_step, evaluations=done.evaluations, samples=task.samples(model, tokenizer, eval_split),
    )
    if trainer.is_world_process_zero():
        _save_finished(directory, eval_logits, record)
    return StudentRun(
        seed=seed, kind=kind, directory=directory, steps=done.steps, train_samples=len(dataset),
        eval_logits=eval_logits, seconds=done.seconds, resumed_from=done.resumed_from, log=done.log,
        best_step=done.best_step, samples=record.samples,
    )


def _saved_model(
    task: Task, directory: Path, label_names: Sequence[str], who: str, trust_remote_code: bool, device: torch.device
) -> Any:
    """The student as saved in ``directory``, whole, on ``device`` in every process: the model to predict with
    when the Trainer sharded the weights (FSDP, DeepSpeed). The trained model object then holds a share of them on
    each process, and a forward pass through it is a collective that every process must run as often as the others,
    while each predicts its own share of the batches."""
    barrier()  # the main process has written the gathered weights
    model = task.load_model(
        str(directory / MODEL_DIR), label_names=label_names, who=who, trust_remote_code=trust_remote_code,
        fine_tuned=True,
    )
    return model.to(device)


def _save_finished(directory: Path, eval_logits: torch.Tensor, record: DoneRecord) -> None:
    """The finished run, beside its saved model: eval predictions and ``done.json`` (written last); checkpoints
    removed."""
    write_logits(directory / EVAL_LOGITS_FILE, eval_logits, {"kind": record.kind, "seed": str(record.seed)})
    atomic_write_json(directory / DONE_FILE, record.model_dump(mode="json"))
    remove_all_checkpoints(directory)


def _forget_run(directory: Path) -> None:
    """Remove what lets a run be reused or resumed (``done.json``, its eval predictions, checkpoints)."""
    (directory / DONE_FILE).unlink(missing_ok=True)
    (directory / EVAL_LOGITS_FILE).unlink(missing_ok=True)
    remove_all_checkpoints(directory)


def _student_data(
    task: Task, tokenizer: Any, data: RunData, outputs: TeacherOutputs, max_length: int, early_stopping: bool,
    store: TokenStore,
) -> StudentSets:
    """Every split the students need, as the task builds them (tokenized once: read from the token store when an
    earlier stage or run tokenized it with this tokenizer)."""
    return task.student_sets(
        tokenizer, data.splits, outputs.by_split, max_length=max_length, need_unlabeled=data.need_unlabeled,
        early_stopping=early_stopping, store=store,
    )


def _run_keys(
    recipe: Recipe, task: Task, data: RunData, teachers: Sequence[Teacher]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the folder hash of a labels-only run and of a distilled run covers besides the student settings (and
    the task's own distillation settings: empty for classification, whose keys stay as they were)."""
    # kdkit's own code changes what a student learns too: a kdkit upgrade trains the students again (teachers
    # and teacher outputs are keyed by their cache format instead; docs/RELIABILITY.md says why)
    common = {"data": data.splits.fingerprint, "kdkit": __version__}
    distill_extra = {
        **common,
        "kind": "distilled",
        "teachers": [t.key for t in teachers],
        "distill": recipe.distill.model_dump(mode="json"),
        "plugins": recipe.enabled_plugins(),
        "plugin_code": {name: identity.model_dump() for name, identity in data.plugins.items()},
        **task.distill_settings(),
    }
    return common, distill_extra


def _distilled_dir(recipe: Recipe, run_dir: Path, distill_extra: Mapping[str, Any], seed: int) -> Path:
    tag = student_config_hash(recipe, {**distill_extra, "seed": seed})
    return run_dir / "students" / f"distilled-seed{seed}-{tag}"


def _labels_only_dir(recipe: Recipe, cache_dir: Path, common: Mapping[str, Any], run: StudentRun) -> Path:
    """Where the labels-only student beside ``run`` lives: keyed by ``run``'s steps (equal-steps protocol), or
    not (early stopping: it stops by the same rule, wherever that is)."""
    early = recipe.student.early_stopping is not None
    tag = student_config_hash(
        recipe, {**common, "kind": "labels-only", "seed": run.seed, **({} if early else {"max_steps": run.steps})}
    )
    return cache_dir / "students" / f"labels-only-seed{run.seed}-{tag}"


def _all_finished(
    recipe: Recipe, task: Task, data: RunData, teachers: Sequence[Teacher], outputs: TeacherOutputs, run_dir: Path,
    cache_dir: Path, console: Any,
) -> StudentRuns | None:
    """Every student run the recipe asks for, when each finished earlier (its ``done.json``); else None. Checked
    before anything is tokenized: a finished recipe reruns in seconds."""
    common, distill_extra = _run_keys(recipe, task, data, teachers)
    rows, classes = task.prediction_shape(task.eval_inputs(data.splits, outputs.by_split), data.label_names)
    runs = StudentRuns(distilled=[], labels_only=[])
    for seed in recipe.seeds:
        run = _finished_run(_distilled_dir(recipe, run_dir, distill_extra, seed), seed, "distilled", rows, classes, console)
        if run is None:
            return None
        runs.distilled.append(run)
        if recipe.student.label_only_baseline:
            base = _finished_run(_labels_only_dir(recipe, cache_dir, common, run), seed, "labels-only", rows, classes, console)
            if base is None:
                return None
            runs.labels_only.append(base)
    return runs


def run_students(
    recipe: Recipe,
    *,
    task: Task,
    data: RunData,
    teachers: Sequence[Teacher],
    outputs: TeacherOutputs,
    run_dir: Path,
    cache_dir: Path,
    console: Any,
    fresh: bool = False,
) -> StudentRuns:
    """Train every student the recipe asks for; after each seed, the figures so far go to
    ``results.partial.json``.

    Distilled students live in the run's folder. The labels-only student depends on no teacher and no plugin, so
    it lives in the cache (``<cache_dir>/students/``), keyed like any student: every recipe, ablation variant and
    sweep point with the same data, student settings, seed and steps shares one run of it.
    """
    cfg = recipe.student
    finished = None if fresh else _all_finished(recipe, task, data, teachers, outputs, run_dir, cache_dir, console)
    if finished is not None:
        for run, base in itertools.zip_longest(finished.distilled, finished.labels_only):
            _report_run(console, "student", run, task.metrics(run.eval_logits, data.eval_labels))
            if base is not None:
                _report_run(console, "labels-only student", base, task.metrics(base.eval_logits, data.eval_labels))
        _write_partial(task, data, finished, run_dir)
        return finished
    tokenizer = load_tokenizer(resolve_model_ref(cfg.model), who="student", trust_remote_code=cfg.trust_remote_code)
    if cfg.trust_remote_code:
        warn(console, "student.trust_remote_code is on: model code will run")
    sets = _student_data(
        task, tokenizer, data, outputs, recipe.data.max_length, cfg.early_stopping is not None,
        TokenStore(cache_dir, console),
    )
    unknown = mostly_unknown(tokenizer, sets.baseline.encoded, "student", "labeled")
    if unknown:
        warn(console, unknown)
    common, distill_extra = _run_keys(recipe, task, data, teachers)
    shared = dict(
        tokenizer=tokenizer, eval_split=task.eval_inputs(data.splits, outputs.by_split), text_columns=data.text_columns,
        label_names=data.label_names, console=console, task=task, fresh=fresh, tune_dataset=sets.tune,
        eval_tokens=sets.eval_tokens,
    )
    runs = StudentRuns(distilled=[], labels_only=[])
    for seed in recipe.seeds:
        run = train_student(
            recipe, dataset=sets.distill, seed=seed, kind="distilled",
            directory=_distilled_dir(recipe, run_dir, distill_extra, seed),
            teacher_logits=sets.distill_outputs, loss_fn=data.loss_fn, **shared,
        )
        runs.distilled.append(run)
        _report_run(console, "student", run, task.metrics(run.eval_logits, data.eval_labels))
        if cfg.label_only_baseline:
            base = _labels_only(recipe, sets, run, common, cache_dir, shared)
            runs.labels_only.append(base)
            _report_run(console, "labels-only student", base, task.metrics(base.eval_logits, data.eval_labels))
        _write_partial(task, data, runs, run_dir)
    return runs


def _write_partial(task: Task, data: RunData, runs: StudentRuns, run_dir: Path) -> None:
    """``results.partial.json``: the figures of the runs finished so far (the main process writes it)."""
    if is_main_process():
        PartialResults(
            student=[r.figures(task.metrics(r.eval_logits, data.eval_labels)) for r in runs.distilled],
            labels_only=[r.figures(task.metrics(r.eval_logits, data.eval_labels)) for r in runs.labels_only],
        ).write(run_dir / "results.partial.json")


def _labels_only(
    recipe: Recipe, sets: StudentSets, run: StudentRun, common: Mapping[str, Any], cache_dir: Path,
    shared: Mapping[str, Any],
) -> StudentRun:
    """The labels-only student beside the distilled ``run``: as many optimizer steps (equal-steps protocol), or
    early-stopped on the tune split by the same rule (early-stopping protocol)."""
    early = recipe.student.early_stopping is not None
    base = train_student(
        recipe, dataset=sets.baseline, seed=run.seed, kind="labels-only",
        directory=_labels_only_dir(recipe, cache_dir, common, run), max_steps=None if early else run.steps, **shared,
    )
    if not early and base.steps != run.steps:
        raise KdkitError(
            f"the labels-only student ran {base.steps} optimizer steps, the distilled one {run.steps} "
            f"(seed {run.seed}); the comparison needs equal steps"
        )
    return base


def _report_run(console: Any, label: str, run: StudentRun, metrics: Mapping[str, float]) -> None:
    state = "reused" if run.reused else f"{run.seconds:.0f} s"
    best = f", best checkpoint at step {run.best_step}" if run.best_step is not None else ""
    ppl = f", perplexity {metrics['perplexity']:.2f}" if "perplexity" in metrics else ""
    say(
        console,
        f"  {label} seed {run.seed}: {run.steps} steps{best} ({state}), eval accuracy {100 * metrics['accuracy']:.2f}"
        f"{ppl}",
    )

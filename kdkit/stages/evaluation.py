"""Stage 5, evaluation: each teacher, the ensemble and every student on the eval split, as :class:`Results`.

Over several student seeds the mean and the sample standard deviation (``ddof = 1``; 0 for one seed) are
reported; the teacher row of a report is the mean over teachers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdkit._version import __version__
from kdkit.recipe.schema import Recipe
from kdkit.runtime import warn
from kdkit.stages.data import RunData
from kdkit.stages.results import (
    CacheSummary,
    DataSummary,
    DistillSummary,
    EvalSummary,
    Results,
    StudentBlock,
    TeacherFigures,
    metric_mean_std,
)
from kdkit.stages.students import StudentRun, StudentRuns
from kdkit.stages.teacher_outputs import TeacherOutputs
from kdkit.stages.teachers import Teacher
from kdkit.tasks.base import Task


def evaluate(
    recipe: Recipe,
    *,
    task: Task,
    data: RunData,
    teachers: list[Teacher],
    outputs: TeacherOutputs,
    students: StudentRuns,
    recipe_path: Path | str | None,
    run_dir: Path,
    seconds: Mapping[str, float],
    console: Any = None,
) -> Results:
    """Every figure of the run: the teachers' and the ensemble's metrics from their cached eval outputs, the
    students' from their eval predictions."""
    eval_labels = data.eval_labels
    eval_outputs = outputs.by_split["eval"]
    _warn_degenerate(task, data, teachers, eval_outputs, students, console)
    teacher_rows = [
        TeacherFigures(
            name=t.name, seed=t.seed, source=t.source, key=t.key, path=t.path, steps=t.info.get("steps"),
            trained_now=t.trained_now, metrics=task.metrics(task.teacher_scores(eval_outputs, t.index), eval_labels),
        )
        for t in teachers
    ]
    teacher_mean, teacher_std = metric_mean_std([t.metrics for t in teacher_rows])

    return Results(
        name=recipe.name,
        kdkit_version=__version__,
        recipe_file=str(recipe_path) if recipe_path is not None else None,
        run_dir=str(run_dir),
        labels=data.label_names,
        metrics=task.metric_names(len(data.label_names)),
        data=DataSummary(fingerprint=data.splits.fingerprint, **data.sizes),
        eval=EvalSummary(split=recipe.data.eval_split, rows=len(data.splits.eval)),
        distill=DistillSummary(
            on=list(recipe.distill.on), temperature=recipe.distill.temperature, plugins=recipe.enabled_plugins()
        ),
        plugins=data.plugins,
        teachers=teacher_rows,
        teacher_mean=teacher_mean,
        teacher_std=teacher_std,
        ensemble=task.metrics(task.ensemble(eval_outputs), eval_labels),
        student=_block(task, students.distilled, eval_labels),
        labels_only=_block(task, students.labels_only, eval_labels),
        cache=CacheSummary(
            teachers_trained=sum(t.trained_now for t in teachers), logits_built=outputs.built, logits_read=outputs.read
        ),
        seconds={k: round(v, 2) for k, v in seconds.items()},
        early_stopping={
            name: (None if cfg.early_stopping is None else cfg.early_stopping.model_dump(mode="json"))
            for name, cfg in (("student", recipe.student), ("teachers", recipe.teachers))
        },
        task=task.name,
        samples=_samples(outputs, students),
    )


def _samples(outputs: TeacherOutputs, students: StudentRuns) -> dict[str, list[dict[str, str]]]:
    """Each model's seeded generations (causal LMs), by the name its row has in the results table."""
    found = dict(outputs.samples)
    for label, runs in (("student", students.distilled), ("labels-only student", students.labels_only)):
        for run in runs:
            if run.samples:
                found[f"{label} seed {run.seed}"] = run.samples
    return found


def _block(task: Task, runs: Sequence[StudentRun], eval_labels: torch.Tensor) -> StudentBlock | None:
    return StudentBlock.of([r.figures(task.metrics(r.eval_logits, eval_labels)) for r in runs])


def _warn_degenerate(
    task: Task, data: RunData, teachers: list[Teacher], eval_outputs: Any, students: StudentRuns, console: Any
) -> None:
    """A model whose eval predictions are degenerate (one class for every row) makes every comparison with it
    meaningless: say so next to the figures."""
    models = [(t.name, task.teacher_scores(eval_outputs, t.index)) for t in teachers]
    models += [(f"student seed {r.seed}", r.eval_logits) for r in students.distilled]
    models += [(f"labels-only student seed {r.seed}", r.eval_logits) for r in students.labels_only]
    for name, scores in models:
        problem = task.degenerate(scores, data.label_names)
        if problem:
            warn(console, f"{name} {problem}")

"""What a run produces, as one typed model: ``results.json`` is written from :class:`Results` and read back
through it (by ``kdkit report``, ``kdkit ablate`` and ``kdkit sweep``); nothing reads it by string keys.

Reading is lenient about what older or hand-written files leave out (every field but the figures a report
needs has a default) and ignores keys it does not know, so a results file from an older kdkit still reads.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdkit.errors import KdkitError
from kdkit.plugin.identity import PluginIdentity
from kdkit.store.files import atomic_write_json

RESULTS_FILE = "results.json"
PARTIAL_FILE = "results.partial.json"
RESOLVED_RECIPE_FILE = "recipe.resolved.json"

#: The two kinds of student run: distilled from the teachers, or trained on the labels alone.
StudentKind = Literal["distilled", "labels-only"]

#: Metrics for which lower is better; every other metric is a share (shown in percent), higher is better.
LOWER_IS_BETTER = frozenset({"perplexity", "loss"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def metric_scale(metric: str) -> float:
    """How a metric is shown: shares in percent (x 100), perplexity as it is."""
    return 1.0 if metric in LOWER_IS_BETTER else 100.0


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric_mean_std(figures: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric :func:`mean_std` over runs (every run holds the same metrics)."""
    pairs = {key: mean_std([f[key] for f in figures]) for key in figures[0]}
    return {k: m for k, (m, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}


class StudentFigures(_Part):
    """One student run (one seed)."""

    seed: int
    steps: int | None = None  #: optimizer steps taken
    train_samples: int | None = None
    seconds: float | None = None
    reused: bool = False  #: finished by an earlier run and reused
    directory: str | None = None
    metrics: dict[str, float]
    best_step: int | None = None  #: early stopping: the step whose checkpoint was kept (``steps``: where it stopped)


class StudentBlock(_Part):
    """Every seed of one kind of student, with the per-metric mean and standard deviation over seeds."""

    runs: list[StudentFigures]
    mean: dict[str, float] = Field(default_factory=dict)
    std: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, runs: Sequence[StudentFigures]) -> StudentBlock | None:
        if not runs:
            return None
        mean, std = metric_mean_std([r.metrics for r in runs])
        return cls(runs=list(runs), mean=mean, std=std)


class TeacherFigures(_Part):
    """One member of the ensemble."""

    name: str = ""
    seed: int | None = None
    source: str = "trained"  #: "trained" (fine-tuned here) or "checkpoint" (given)
    key: str
    path: str = ""
    steps: int | None = None
    trained_now: bool = False
    metrics: dict[str, float]


class DataSummary(_Part):
    fingerprint: str
    labeled: int = 0
    unlabeled: int = 0
    tune: int = 0
    eval: int = 0


class EvalSummary(_Part):
    split: str = ""
    rows: int = 0


class DistillSummary(_Part):
    on: list[str] = Field(default_factory=list)
    temperature: float = 1.0
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)


class CacheSummary(_Part):
    teachers_trained: int = 0
    logits_built: list[str] = Field(default_factory=list)
    logits_read: int = 0


def protocol_of(early_stopping: Mapping[str, Any] | None) -> str:
    """How a student (or teacher) was trained, in words: equal optimizer steps, or early stopping and its rule."""
    if not early_stopping:
        return "equal steps"
    return (
        f"early stopping on the tune split ({early_stopping['metric']}, every {early_stopping['eval_steps']} "
        f"steps, patience {early_stopping['patience']})"
    )


class Results(_Part):
    """Every figure of one run (``<output_dir>/<name>/results.json``)."""

    name: str
    kdkit_version: str = ""
    recipe_file: str | None = None
    resolved_recipe: str = RESOLVED_RECIPE_FILE
    run_dir: str = ""
    labels: list[str] = Field(default_factory=list)
    metrics: list[str] = Field(default_factory=list)  #: metric names, in table order
    data: DataSummary
    eval: EvalSummary = Field(default_factory=EvalSummary)
    distill: DistillSummary = Field(default_factory=DistillSummary)
    plugins: dict[str, PluginIdentity] = Field(default_factory=dict)  #: distribution, version, code of each
    teachers: list[TeacherFigures]
    teacher_mean: dict[str, float]
    teacher_std: dict[str, float] = Field(default_factory=dict)
    ensemble: dict[str, float]
    student: StudentBlock | None
    labels_only: StudentBlock | None = None
    cache: CacheSummary = Field(default_factory=CacheSummary)
    seconds: dict[str, float] = Field(default_factory=dict)
    #: student.early_stopping and teachers.early_stopping as the run used them (None: equal steps)
    early_stopping: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    task: str = "sequence-classification"  #: the recipe's task
    #: causal LMs: each model's seeded generations (``prompt``, ``continuation``), by its name in the table
    samples: dict[str, list[dict[str, str]]] = Field(default_factory=dict)

    @property
    def protocol(self) -> str:
        """How the students were trained: ``equal steps`` or early stopping with its rule."""
        return protocol_of(self.early_stopping.get("student"))

    def block(self, kind: StudentKind) -> StudentBlock | None:
        return self.student if kind == "distilled" else self.labels_only

    def student_values(self, metric: str, kind: StudentKind = "distilled") -> list[float]:
        """The per-seed figures of ``metric`` of one kind of student (empty when the run trained none)."""
        block = self.block(kind)
        return [float(r.metrics[metric]) for r in block.runs] if block else []

    def student_steps(self, kind: StudentKind = "distilled") -> list[int | None]:
        block = self.block(kind)
        return [r.steps for r in block.runs] if block else []

    def metric_names(self) -> list[str]:
        return self.metrics or list(self.teacher_mean)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: str | Path) -> Results:
        """Read a results file. :raises KdkitError: naming the file when it is not JSON or not a kdkit results
        file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise KdkitError(f"{path}: cannot be read as JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise KdkitError(f"{path}: not a kdkit results file (not a JSON object)")
        for key in ("name", "data", "teachers", "teacher_mean", "ensemble", "student"):
            if key not in raw:
                raise KdkitError(f"{path}: not a kdkit results file (no '{key}')")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise KdkitError(f"{path}: not a kdkit results file ({where}: {first['msg']})") from None


class PartialResults(_Part):
    """The student runs finished so far (``results.partial.json``, removed once ``results.json`` is written)."""

    complete: bool = False
    student: list[StudentFigures] = Field(default_factory=list)
    labels_only: list[StudentFigures] = Field(default_factory=list)

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json"))


def results_table(results: Results) -> Any:
    """A rich table of one run's figures: each teacher, the ensemble, each student seed and the mean ± std."""
    from rich.table import Table

    metrics = results.metrics
    table = Table(title=f"{results.name}: {results.eval.split} ({results.eval.rows} rows)")
    table.add_column("model")
    table.add_column("steps", justify="right")
    for name in metrics:
        positive = f" ({results.labels[1]})" if name == "f1" and len(results.labels) == 2 else ""
        table.add_column(name.replace("_", " ") + positive, justify="right")

    def cells(figures: Mapping[str, float], std: Mapping[str, float] | None = None) -> list[str]:
        scale = {m: metric_scale(m) for m in metrics}
        return [
            f"{scale[m] * figures[m]:.2f}" + (f" ± {scale[m] * std[m]:.2f}" if std is not None else "") for m in metrics
        ]

    for teacher in results.teachers:
        table.add_row(teacher.name, str(teacher.steps or ""), *cells(teacher.metrics))
    if len(results.teachers) > 1:
        table.add_row("teachers (mean)", "", *cells(results.teacher_mean))
        table.add_row("ensemble (mean of probabilities)", "", *cells(results.ensemble))
    table.add_section()
    for block, label in ((results.student, "student (distilled)"), (results.labels_only, "student (labels only)")):
        if not block:
            continue
        for run in block.runs:
            table.add_row(f"{label}, seed {run.seed}", str(run.steps), *cells(run.metrics))
        if len(block.runs) > 1:
            table.add_row(f"{label}, mean ± std", "", *cells(block.mean, block.std))
    return table

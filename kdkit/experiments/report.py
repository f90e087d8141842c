"""``kdkit report``: finished runs -> the paper's Table 2 layout, with a significance test between methods.

Rows: the single teacher (mean and std over the teachers), the ensemble (mean of the teachers' probabilities), the
labels-only student where a run trained one (``student.label_only_baseline``: same optimizer steps as the distilled
student), then one row per method (run name). Columns: one per data set, a data set being the data fingerprint and
the teachers' cache keys of a run (runs that share both share their teacher and ensemble rows). Every cell is the
mean ± sample standard deviation (ddof 1) over the student seeds, in percent (perplexity as it is), and the table
states each row's optimizer steps.

Significance: for every pair of student rows in a column, Student's two-sample t-test with pooled variance
(``scipy.stats.ttest_ind(a, b, equal_var=True)``; the paper says "t-test"), two-sided, over the per-seed figures.
A method is starred (``*``) in a column where it beats every other student row there at ``p < alpha``: by a
higher mean, or a lower one for a metric where lower is better (perplexity,
:data:`kdkit.stages.results.LOWER_IS_BETTER`). The default metric is accuracy; perplexity where every run is a
causal-LM run.
Each column also states the standard error of a cell and the smallest difference that would reach
``p < alpha`` with the observed pooled spread (``t_crit * s_pooled * sqrt(2 / n)``).

scipy is imported only when a test is computed (``pip install 'kdkit[report]'``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kdkit.errors import KdkitError
from kdkit.experiments.stats import smallest_detectable, t_test
from kdkit.experiments.tables import cell, csv_text, markdown_table, p_text, pct, steps_text
from kdkit.stages.results import (
    PARTIAL_FILE,
    RESOLVED_RECIPE_FILE,
    RESULTS_FILE,
    Results,
    StudentKind,
    higher_is_better,
    mean_std,
    metric_scale,
)

# --------------------------------------------------------------------------- runs
class _RecipeView(BaseModel):
    """The few keys of a run's ``recipe.resolved.json`` that label its column (older runs may lack any)."""

    model_config = ConfigDict(extra="ignore")

    class Data(BaseModel):
        model_config = ConfigDict(extra="ignore")
        dataset: str | None = None
        config: str | None = None
        files: dict[str, str] | None = None
        train_split: str = "train"

    class Teachers(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | dict[str, Any] | None = None
        num_layers: int | None = None

    data: Data = Field(default_factory=Data)
    teachers: Teachers = Field(default_factory=Teachers)


@dataclass
class Run:
    """One finished run directory: its :class:`Results` and the labels of its column."""

    directory: Path
    results: Results
    recipe: _RecipeView

    @property
    def name(self) -> str:
        return self.results.name

    @property
    def group_key(self) -> tuple[str, tuple[str, ...]]:
        return (self.results.data.fingerprint, tuple(t.key for t in self.results.teachers))

    @property
    def data_label(self) -> str:
        data = self.recipe.data
        if data.dataset:
            return data.dataset.split("/")[-1] + (f"/{data.config}" if data.config else "")
        files = data.files or {}
        train = files.get(data.train_split) or next(iter(files.values()), None)
        if not train:
            return "data"
        # the folder says more than the file (".data/polarity/train.jsonl" -> "polarity"); a file in the working
        # directory itself has no folder name: then its name without the suffix
        return Path(train).parent.name or Path(train).stem or "data"

    @property
    def teacher_label(self) -> str:
        teachers = self.recipe.teachers
        model = teachers.model
        if isinstance(model, Mapping):
            model = model.get("package", "model")
        model = str(model or "checkpoints").rstrip("/").split("/")[-1]
        layers = teachers.num_layers
        return f"{len(self.results.teachers)} x {model}" + (
            f" ({layers} layer{'' if layers == 1 else 's'})" if layers else ""
        )


def load_run(directory: str | Path) -> Run:
    """Read a finished run directory (``results.json`` and ``recipe.resolved.json``).

    :raises KdkitError: no such directory, a run that has not finished (only ``results.partial.json``), or a
        directory that is not a run.
    """
    path = Path(directory)
    if path.is_file() and path.name == RESULTS_FILE:
        path = path.parent
    if not path.is_dir():
        raise KdkitError(f"{path}: no such run directory")
    results_file = path / RESULTS_FILE
    if not results_file.is_file():
        if (path / PARTIAL_FILE).is_file():
            raise KdkitError(f"{path}: this run has not finished (only {PARTIAL_FILE}); run it to the end first")
        raise KdkitError(f"{path}: not a run directory (no {RESULTS_FILE})")
    results = Results.read(results_file)
    recipe_file = path / RESOLVED_RECIPE_FILE
    recipe = _RecipeView.model_validate_json(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else _RecipeView()
    return Run(path, results, recipe)


# --------------------------------------------------------------------------- Table 2
@dataclass
class Column:
    label: str
    runs: list[Run]
    teacher_values: list[float] = field(default_factory=list)
    teacher_steps: list[Any] = field(default_factory=list)
    ensemble: float | None = None
    positive: str | None = None  #: the class whose F1 ``f1`` is (label id 1), when the runs name their labels


@dataclass
class Row:
    label: str
    kind: str  # "teacher", "ensemble", "labels-only", "method"
    values: dict[int, list[float]] = field(default_factory=dict)  # column index -> per-seed values
    steps: dict[int, list[Any]] = field(default_factory=dict)
    protocols: dict[int, str] = field(default_factory=dict)  # column index -> how the students were trained


@dataclass
class Report:
    metric: str
    alpha: float
    columns: list[Column]
    rows: list[Row]
    tests: list[dict[str, Any]]  # one per (column, pair of student rows)
    best: dict[int, str]  # column index -> label of the row significantly better than all others
    noise: list[dict[str, Any]]  # per column: n, pooled std, standard error, smallest detectable difference

    @property
    def scale(self) -> float:
        """How the metric is shown: 100 for a share (percent), 1 for perplexity."""
        return metric_scale(self.metric)

    @property
    def unit(self) -> str:
        """What a difference of the metric is counted in."""
        return "points" if self.scale == 100 else self.metric

    def caption(self) -> str:
        """What a cell holds, and which way is better."""
        shown = f"{self.metric} in percent" if self.scale == 100 else self.metric
        better = "higher" if higher_is_better(self.metric) else "lower"
        return f"{shown} ({better} is better), mean ± std over student seeds"

    # ------------------------------------------------------------------ rendering
    def header(self) -> list[str]:
        out = ["model"]
        for col in self.columns:
            metric = f"{self.metric} ({col.positive})" if self.metric == "f1" and col.positive else self.metric
            out += [f"{col.label} {metric}", f"{col.label} steps"]
        return out

    def body(self) -> list[list[str]]:
        lines = []
        for row in self.rows:
            line = [row.label]
            for i, _ in enumerate(self.columns):
                values = row.values.get(i)
                text = cell(values, self.scale) if values else "-"
                if values and self.best.get(i) == row.label:
                    text += " *"
                line += [text, steps_text(row.steps.get(i, [])) if values else ""]
            lines.append(line)
        return lines

    def test_header(self) -> list[str]:
        return ["data", "A", "B", "mean A - B", "t", "df", "p", f"p < {self.alpha}"]

    def test_body(self) -> list[list[str]]:
        return [
            [
                t["column"],
                t["a"],
                t["b"],
                f"{self.scale * t['diff']:+.2f}",
                "n/a" if t["t"] is None else f"{t['t']:.3f}",
                str(t["df"]),
                p_text(t["p"]),
                "yes" if t["significant"] else "no",
            ]
            for t in self.tests
        ]

    def protocol_lines(self) -> list[str]:
        """How each column's student rows were trained; a column that mixes protocols says so."""
        lines = []
        for i, col in enumerate(self.columns):
            used = {r.protocols[i] for r in self.rows if i in r.protocols}
            if len(used) == 1:
                lines.append(f"{col.label}: every student row trained with {used.pop()}")
            elif used:
                each = "; ".join(f"{r.label}: {r.protocols[i]}" for r in self.rows if i in r.protocols)
                lines.append(
                    f"{col.label}: MIXED PROTOCOLS, rows are not trained alike ({each}); a difference between them "
                    "is not a difference between methods alone"
                )
        return lines

    def noise_lines(self) -> list[str]:
        lines = []
        for item in self.noise:
            if item["n"] is None:
                lines.append(f"{item['column']}: fewer than two seeds per row, no test possible")
                continue
            pooled, se, detectable = (pct(item[k], scale=self.scale) for k in ("pooled_std", "se", "detectable"))
            lines.append(
                f"{item['column']}: {item['n']} student seeds per row; pooled std {pooled} {self.unit}, "
                f"standard error of a row's mean {se}; the smallest difference between two rows that "
                f"reaches p < {self.alpha} is {detectable} {self.unit}"
            )
        return lines

    def markdown(self) -> str:
        text = markdown_table(self.header(), self.body())
        text += (
            f"\n{self.caption()} (teacher row: over teachers); `*`: better than every other student row of the "
            f"column, Student's t-test p < {self.alpha}.\n"
        )
        noise = self.protocol_lines() + self.noise_lines()
        if self.metric == "f1":
            positives = {c.positive for c in self.columns} - {None}
            named = f" ('{positives.pop()}')" if len(positives) == 1 else ""
            text += f"\nf1 is the F1 of the positive class{named}, label id 1 (two classes only).\n"
        if noise:
            text += "\n" + "\n".join(f"- {line}" for line in noise) + "\n"
        if self.tests:
            text += "\n" + markdown_table(self.test_header(), self.test_body())
        return text

    def csv(self) -> str:
        header = ["model", "kind", "data", "metric", "n", "mean", "std", "steps", "values", "best"]
        lines = []
        for row in self.rows:
            for i, col in enumerate(self.columns):
                values = row.values.get(i)
                if not values:
                    continue
                mean, std = mean_std(values)
                lines.append(
                    [
                        row.label,
                        row.kind,
                        col.label,
                        self.metric,
                        len(values),
                        f"{mean:.6f}",
                        f"{std:.6f}",
                        steps_text(row.steps.get(i, [])),
                        " ".join(f"{v:.6f}" for v in values),
                        "yes" if self.best.get(i) == row.label else "",
                    ]
                )
        return csv_text(header, lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "lower_is_better": not higher_is_better(self.metric),
            "alpha": self.alpha,
            "test": "Student's two-sample t-test, pooled variance, two-sided (scipy.stats.ttest_ind equal_var=True)",
            "columns": [{"label": c.label, "runs": [str(r.directory) for r in c.runs]} for c in self.columns],
            "rows": [
                {
                    "label": r.label,
                    "kind": r.kind,
                    "cells": {
                        self.columns[i].label: {
                            "values": v, "steps": r.steps.get(i, []), "protocol": r.protocols.get(i)
                        }
                        for i, v in r.values.items()
                    },
                }
                for r in self.rows
            ],
            "tests": self.tests,
            "best": {self.columns[i].label: label for i, label in self.best.items()},
            "noise": self.noise,
        }


def default_metric(results: Sequence[Results]) -> str:
    """The metric a report shows unless told: perplexity where every run is a causal-LM run, else accuracy."""
    return "perplexity" if results and all(r.task == "causal-lm" for r in results) else "accuracy"


def build_report(runs: Sequence[Run], *, metric: str | None = None, alpha: float = 0.05) -> Report:
    """Group ``runs`` into columns (same data and teachers) and rows (teacher, ensemble, labels only, methods);
    ``metric``: :func:`default_metric` of the runs unless given."""
    if not runs:
        raise KdkitError("no run to report")
    metric = metric or default_metric([r.results for r in runs])
    for run in runs:
        known = run.results.metric_names()
        if metric not in known:
            raise KdkitError(f"{run.directory}: no metric '{metric}' in its results; it has {', '.join(known)}")
    columns = _columns(runs, metric)
    teacher_count = {len(c.teacher_values) for c in columns}
    teacher_label = "single teacher" + (f" (mean of {teacher_count.pop()})" if len(teacher_count) == 1 else " (mean)")
    rows = [Row(teacher_label, "teacher"), Row("ensemble", "ensemble")]
    for i, col in enumerate(columns):
        rows[0].values[i], rows[0].steps[i] = col.teacher_values, col.teacher_steps
        rows[1].values[i], rows[1].steps[i] = [col.ensemble], []
    ordered = _student_rows(columns, metric)
    rows += ordered
    tests: list[dict[str, Any]] = []
    best: dict[int, str] = {}
    noise: list[dict[str, Any]] = []
    for i, col in enumerate(columns):
        present = [r for r in ordered if r.values.get(i)]
        winner = _pairwise_tests(col.label, i, present, alpha, tests, higher=higher_is_better(metric))
        if winner is not None:
            best[i] = winner
        noise.append(_noise(col.label, i, present, alpha))
    return Report(metric, alpha, columns, rows, tests, best, noise)


def _columns(runs: Sequence[Run], metric: str) -> list[Column]:
    """One column per data set (same data fingerprint and teachers), labelled by the data, and by the teachers
    where two columns share the data."""
    groups: dict[tuple[str, tuple[str, ...]], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group_key, []).append(run)
    columns: list[Column] = []
    labels = [g[0].data_label for g in groups.values()]
    for runs_in, data_label in zip(groups.values(), labels, strict=True):
        label = data_label
        if labels.count(data_label) > 1:
            label = f"{data_label}, teachers {runs_in[0].teacher_label}"
        if [c.label for c in columns].count(label):
            label = f"{label} #{len(columns) + 1}"
        first = runs_in[0].results
        columns.append(
            Column(
                label=label,
                runs=runs_in,
                teacher_values=[float(t.metrics[metric]) for t in first.teachers],
                teacher_steps=[t.steps for t in first.teachers],
                ensemble=float(first.ensemble[metric]),
                positive=first.labels[1] if len(first.labels) == 2 else None,
            )
        )
    return columns


def _add_row(
    rows: dict[str, Row], label: str, kind: str, column: int, run: Run, student: StudentKind, metric: str
) -> None:
    """Put ``run``'s students of kind ``student`` into row ``label`` (the same name twice in one column: keep
    both, told apart by folder)."""
    row = rows.get(label)
    if row is None:
        row = rows[label] = Row(label, kind)
    elif column in row.values:
        _add_row(rows, f"{label} ({run.directory.name})", kind, column, run, student, metric)
        return
    row.values[column] = run.results.student_values(metric, student)
    row.steps[column] = run.results.student_steps(student)
    row.protocols[column] = run.results.protocol


def _student_rows(columns: Sequence[Column], metric: str) -> list[Row]:
    """The labels-only rows (one per distinct baseline), then one row per method (run name)."""
    rows: dict[str, Row] = {}
    for i, col in enumerate(columns):
        baselines = [r for r in col.runs if r.results.labels_only]
        for run in baselines:
            steps = steps_text(run.results.student_steps("labels-only"))
            same = "same steps" if run.results.protocol == "equal steps" else "early stopping"
            label = f"labels only ({same})" if len(baselines) == 1 else f"labels only ({steps} steps)"
            if len(baselines) > 1 and label in rows and i in rows[label].values:
                continue  # two runs trained the same baseline (same steps): report it once
            _add_row(rows, label, "labels-only", i, run, "labels-only", metric)
    for i, col in enumerate(columns):
        for run in col.runs:
            _add_row(rows, run.name, "method", i, run, "distilled", metric)
    return sorted(rows.values(), key=lambda r: 0 if r.kind == "labels-only" else 1)


def _pairwise_tests(
    column: str, i: int, present: Sequence[Row], alpha: float, tests: list[dict[str, Any]], *, higher: bool = True
) -> str | None:
    """Append a t-test for every pair of rows of column ``i`` to ``tests``; return the row that beats every
    other one at ``p < alpha`` (by a higher mean, or with ``higher`` False a lower one), if any."""
    wins: dict[str, int] = {r.label: 0 for r in present}
    for a_index, a in enumerate(present):
        for b in present[a_index + 1 :]:
            result = t_test(a.values[i], b.values[i])
            significant = result.p is not None and result.p < alpha
            tests.append(
                {
                    "column": column,
                    "a": a.label,
                    "b": b.label,
                    "diff": result.diff,
                    "t": result.t,
                    "df": result.df,
                    "p": result.p,
                    "significant": significant,
                }
            )
            if significant:
                wins[a.label if (result.diff > 0) == higher else b.label] += 1
    winner = None
    for label, count in wins.items():
        if len(present) > 1 and count == len(present) - 1:
            winner = label
    return winner


def _noise(column: str, i: int, present: Sequence[Row], alpha: float) -> dict[str, Any]:
    """The pooled spread of column ``i``'s rows and the smallest difference it lets a t-test detect."""
    sizes = [len(r.values[i]) for r in present]
    if not present or min(sizes) < 2:
        return {"column": column, "n": None, "pooled_std": None, "se": None, "detectable": None}
    dof = sum(n - 1 for n in sizes)
    pooled = math.sqrt(sum((n - 1) * statistics.variance(r.values[i]) for r, n in zip(present, sizes)) / dof)
    n = min(sizes)
    return {
        "column": column,
        "n": n,
        "pooled_std": pooled,
        "se": pooled / math.sqrt(n),
        "detectable": smallest_detectable(pooled, n, alpha),
    }


def report_runs(directories: Sequence[str | Path], *, metric: str | None = None, alpha: float = 0.05) -> Report:
    """:raises KdkitError: a run given twice (it would be compared with itself), or any :func:`load_run` error."""
    runs = [load_run(d) for d in directories]
    seen: dict[Path, str | Path] = {}
    for given, run in zip(directories, runs, strict=True):
        where = run.directory.resolve()
        if where in seen:
            raise KdkitError(
                f"{given}: the run {where} is given twice (also as {seen[where]}); a run compared with itself "
                "proves nothing"
            )
        seen[where] = given
    return build_report(runs, metric=metric, alpha=alpha)

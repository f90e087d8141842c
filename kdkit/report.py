"""``kdkit report``: finished runs -> the paper's Table 2 layout, with a significance test between methods.

Rows: the single teacher (mean and std over the teachers), the ensemble (mean of the teachers' probabilities), the
labels-only student where a run trained one (``student.label_only_baseline``: same optimizer steps as the distilled
student), then one row per method (run name). Columns: one per data set, a data set being the data fingerprint and
the teachers' cache keys of a run (runs that share both share their teacher and ensemble rows). Every cell is the
mean ± sample standard deviation (ddof 1) over the student seeds, in percent, and the table states each row's
optimizer steps.

Significance: for every pair of student rows in a column, Student's two-sample t-test with pooled variance
(``scipy.stats.ttest_ind(a, b, equal_var=True)``; the paper says "t-test"), two-sided, over the per-seed figures.
A method is starred (``*``) in a column where it beats every other student row there at ``p < alpha``.
Each column also states the standard error of a cell and the smallest difference that would reach
``p < alpha`` with the observed pooled spread (``t_crit * s_pooled * sqrt(2 / n)``).

scipy is imported only when a test is computed (``pip install 'kdkit[report]'``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError

REPORT_EXTRA = "pip install 'kdkit[report]'"


# --------------------------------------------------------------------------- optional dependencies
def require_scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError:
        raise KdkitError(f"this command computes t-tests with scipy, which is not installed: {REPORT_EXTRA}") from None
    return stats


def require_pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise KdkitError(f"this command draws plots with matplotlib, which is not installed: {REPORT_EXTRA}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class TTest:
    """Result of a two-sided two-sample t-test of ``a`` against ``b``."""

    diff: float  # mean(a) - mean(b)
    t: float | None
    df: int
    p: float | None  # None when a side has fewer than two values


def t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Student's two-sample t-test with pooled variance (``scipy.stats.ttest_ind(equal_var=True)``), two-sided.

    With fewer than two values on a side there is no variance to pool: ``t`` and ``p`` are None. When both
    sides have no spread at all, ``p`` is 1 for equal means and 0 otherwise (scipy returns NaN there).
    """
    diff = statistics.fmean(a) - statistics.fmean(b)
    df = len(a) + len(b) - 2
    if len(a) < 2 or len(b) < 2:
        return TTest(diff, None, df, None)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return TTest(diff, math.copysign(math.inf, diff) if diff else 0.0, df, 0.0 if diff else 1.0)
    stats = require_scipy_stats()
    res = stats.ttest_ind(list(a), list(b), equal_var=True)
    return TTest(diff, float(res.statistic), df, float(res.pvalue))


def smallest_detectable(pooled_std: float, n: int, alpha: float = 0.05) -> float | None:
    """The difference of two means of ``n`` values each that reaches ``p < alpha`` (two-sided Student t) when both
    have standard deviation ``pooled_std``: ``t_{1-alpha/2, 2n-2} * s * sqrt(2 / n)``."""
    if n < 2:
        return None
    stats = require_scipy_stats()
    return float(stats.t.ppf(1 - alpha / 2, 2 * n - 2)) * pooled_std * math.sqrt(2 / n)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# --------------------------------------------------------------------------- formatting
def pct(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}"


def cell(values: Sequence[float]) -> str:
    """``mean ± std`` in percent (one value: the value alone)."""
    if not values:
        return ""
    mean, std = mean_std(values)
    return pct(mean) if len(values) == 1 else f"{pct(mean)} ± {pct(std)}"


def steps_text(steps: Iterable[Any]) -> str:
    unique = list(dict.fromkeys(s for s in steps if s is not None))
    return "/".join(str(s) for s in unique)


def p_text(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def esc(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def rich_table(header: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    return table


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One finished run directory (``results.json``) reduced to what a report needs."""

    directory: Path
    results: dict[str, Any]
    recipe: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.results["name"])

    def student_values(self, metric: str, block: str = "student") -> list[float]:
        data = self.results.get(block) or {}
        return [float(r["metrics"][metric]) for r in data.get("runs", [])]

    def student_steps(self, block: str = "student") -> list[Any]:
        data = self.results.get(block) or {}
        return [r.get("steps") for r in data.get("runs", [])]

    @property
    def group_key(self) -> tuple[str, tuple[str, ...]]:
        return (str(self.results["data"]["fingerprint"]), tuple(str(t["key"]) for t in self.results["teachers"]))

    @property
    def data_label(self) -> str:
        data = self.recipe.get("data") or {}
        if data.get("dataset"):
            return str(data["dataset"]).split("/")[-1] + (f"/{data['config']}" if data.get("config") else "")
        files = data.get("files") or {}
        train = files.get(data.get("train_split", "train")) or next(iter(files.values()), None)
        return Path(train).parent.name if train else "data"

    @property
    def teacher_label(self) -> str:
        teachers = self.recipe.get("teachers") or {}
        model = teachers.get("model")
        if isinstance(model, Mapping):
            model = model.get("package", "model")
        model = str(model or "checkpoints").rstrip("/").split("/")[-1]
        layers = teachers.get("num_layers")
        return f"{len(self.results['teachers'])} x {model}" + (
            f" ({layers} layer{'' if layers == 1 else 's'})" if layers else ""
        )


def load_run(directory: str | Path) -> Run:
    """Read a finished run directory (``results.json`` and ``recipe.resolved.json``).

    :raises KdkitError: no such directory, a run that has not finished (only ``results.partial.json``), or a
        directory that is not a run.
    """
    path = Path(directory)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if not path.is_dir():
        raise KdkitError(f"{path}: no such run directory")
    results_file = path / "results.json"
    if not results_file.is_file():
        if (path / "results.partial.json").is_file():
            raise KdkitError(f"{path}: this run has not finished (only results.partial.json); run it to the end first")
        raise KdkitError(f"{path}: not a run directory (no results.json)")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KdkitError(f"{results_file}: cannot be read as JSON: {exc}") from None
    for key in ("name", "data", "teachers", "teacher_mean", "ensemble", "student"):
        if key not in results:
            raise KdkitError(f"{results_file}: not a kdkit results file (no '{key}')")
    recipe_file = path / "recipe.resolved.json"
    recipe = json.loads(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    return Run(path, results, recipe)


# --------------------------------------------------------------------------- Table 2
@dataclass
class Column:
    label: str
    runs: list[Run]
    teacher_values: list[float] = field(default_factory=list)
    teacher_steps: list[Any] = field(default_factory=list)
    ensemble: float | None = None


@dataclass
class Row:
    label: str
    kind: str  # "teacher", "ensemble", "labels-only", "method"
    values: dict[int, list[float]] = field(default_factory=dict)  # column index -> per-seed values
    steps: dict[int, list[Any]] = field(default_factory=dict)


@dataclass
class Report:
    metric: str
    alpha: float
    columns: list[Column]
    rows: list[Row]
    tests: list[dict[str, Any]]  # one per (column, pair of student rows)
    best: dict[int, str]  # column index -> label of the row significantly better than all others
    noise: list[dict[str, Any]]  # per column: n, pooled std, standard error, smallest detectable difference

    # ------------------------------------------------------------------ rendering
    def header(self) -> list[str]:
        out = ["model"]
        for col in self.columns:
            out += [f"{col.label} {self.metric}", f"{col.label} steps"]
        return out

    def body(self) -> list[list[str]]:
        lines = []
        for row in self.rows:
            line = [row.label]
            for i, _ in enumerate(self.columns):
                values = row.values.get(i)
                text = cell(values) if values else "-"
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
                f"{100 * t['diff']:+.2f}",
                "n/a" if t["t"] is None else f"{t['t']:.3f}",
                str(t["df"]),
                p_text(t["p"]),
                "yes" if t["significant"] else "no",
            ]
            for t in self.tests
        ]

    def noise_lines(self) -> list[str]:
        lines = []
        for item in self.noise:
            if item["n"] is None:
                lines.append(f"{item['column']}: fewer than two seeds per row, no test possible")
                continue
            lines.append(
                f"{item['column']}: {item['n']} student seeds per row; pooled std {pct(item['pooled_std'])} points, "
                f"standard error of a row's mean {pct(item['se'])}; the smallest difference between two rows that "
                f"reaches p < {self.alpha} is {pct(item['detectable'])} points"
            )
        return lines

    def markdown(self) -> str:
        text = markdown_table(self.header(), self.body())
        text += (
            f"\n{self.metric} in percent, mean ± std over student seeds (teacher row: over teachers); `*`: better than "
            f"every other student row of the column, Student's t-test p < {self.alpha}.\n"
        )
        noise = self.noise_lines()
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
            "alpha": self.alpha,
            "test": "Student's two-sample t-test, pooled variance, two-sided (scipy.stats.ttest_ind equal_var=True)",
            "columns": [{"label": c.label, "runs": [str(r.directory) for r in c.runs]} for c in self.columns],
            "rows": [
                {
                    "label": r.label,
                    "kind": r.kind,
                    "cells": {
                        self.columns[i].label: {"values": v, "steps": r.steps.get(i, [])} for i, v in r.values.items()
                    },
                }
                for r in self.rows
            ],
            "tests": self.tests,
            "best": {self.columns[i].label: label for i, label in self.best.items()},
            "noise": self.noise,
        }


def build_report(runs: Sequence[Run], *, metric: str = "accuracy", alpha: float = 0.05) -> Report:
    """Group ``runs`` into columns (same data and teachers) and rows (teacher, ensemble, labels only, methods)."""
    if not runs:
        raise KdkitError("no run to report")
    for run in runs:
        known = run.results.get("metrics") or list(run.results["teacher_mean"])
        if metric not in known:
            raise KdkitError(f"{run.directory}: no metric '{metric}' in its results; it has {', '.join(known)}")

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
                teacher_values=[float(t["metrics"][metric]) for t in first["teachers"]],
                teacher_steps=[t.get("steps") for t in first["teachers"]],
                ensemble=float(first["ensemble"][metric]),
            )
        )

    teacher_count = {len(c.teacher_values) for c in columns}
    teacher_label = "single teacher" + (f" (mean of {teacher_count.pop()})" if len(teacher_count) == 1 else " (mean)")
    rows = [Row(teacher_label, "teacher"), Row("ensemble", "ensemble")]
    for i, col in enumerate(columns):
        rows[0].values[i], rows[0].steps[i] = col.teacher_values, col.teacher_steps
        rows[1].values[i], rows[1].steps[i] = [col.ensemble], []

    method_rows: dict[str, Row] = {}

    def add(label: str, kind: str, column: int, run: Run, block: str) -> None:
        row = method_rows.get(label)
        if row is None:
            row = method_rows[label] = Row(label, kind)
        elif column in row.values:  # the same name twice in one column: keep both, tell them apart by folder
            add(f"{label} ({run.directory.name})", kind, column, run, block)
            return
        row.values[column] = run.student_values(metric, block)
        row.steps[column] = run.student_steps(block)

    for i, col in enumerate(columns):
        baselines = [r for r in col.runs if r.results.get("labels_only")]
        for run in baselines:
            steps = steps_text(run.student_steps("labels_only"))
            label = "labels only (same steps)" if len(baselines) == 1 else f"labels only ({steps} steps)"
            if len(baselines) > 1 and label in method_rows and i in method_rows[label].values:
                continue  # two runs trained the same baseline (same steps): report it once
            add(label, "labels-only", i, run, "labels_only")
    for i, col in enumerate(columns):
        for run in col.runs:
            add(run.name, "method", i, run, "student")
    ordered = sorted(method_rows.values(), key=lambda r: 0 if r.kind == "labels-only" else 1)
    rows += ordered

    tests: list[dict[str, Any]] = []
    best: dict[int, str] = {}
    noise: list[dict[str, Any]] = []
    for i, col in enumerate(columns):
        present = [r for r in ordered if r.values.get(i)]
        wins: dict[str, int] = {r.label: 0 for r in present}
        for a_index, a in enumerate(present):
            for b in present[a_index + 1 :]:
                result = t_test(a.values[i], b.values[i])
                significant = result.p is not None and result.p < alpha
                tests.append(
                    {
                        "column": col.label,
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
                    wins[a.label if result.diff > 0 else b.label] += 1
        for label, count in wins.items():
            if len(present) > 1 and count == len(present) - 1:
                best[i] = label
        sizes = [len(r.values[i]) for r in present]
        if present and min(sizes) >= 2:
            dof = sum(n - 1 for n in sizes)
            pooled = math.sqrt(sum((n - 1) * statistics.variance(r.values[i]) for r, n in zip(present, sizes)) / dof)
            n = min(sizes)
            noise.append(
                {
                    "column": col.label,
                    "n": n,
                    "pooled_std": pooled,
                    "se": pooled / math.sqrt(n),
                    "detectable": smallest_detectable(pooled, n, alpha),
                }
            )
        else:
            noise.append({"column": col.label, "n": None, "pooled_std": None, "se": None, "detectable": None})
    return Report(metric, alpha, columns, rows, tests, best, noise)


def report_runs(directories: Sequence[str | Path], *, metric: str = "accuracy", alpha: float = 0.05) -> Report:
    return build_report([load_run(d) for d in directories], metric=metric, alpha=alpha)

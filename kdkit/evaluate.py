"""Evaluation: each teacher, the ensemble, the students; ``results.json`` and the results table.

Metrics on the eval split:

* ``accuracy``;
* ``macro_f1``: the unweighted mean over classes of each class's F1;
* ``f1`` (two classes only): F1 of the positive class, label id 1 (GLUE's QQP / MRPC convention: "duplicate",
  "equivalent"; for sentiment, "positive").

The ensemble averages the teachers' probabilities (softmax at temperature 1). Over several student seeds the
mean and the sample standard deviation (``ddof = 1``; 0 for one seed) are reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdkit.batch import IGNORE_INDEX


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Metrics of predictions ``argmax(scores)`` (logits or probabilities ``[rows, C]``) against ``labels``.

    Rows labeled ``-100`` are ignored.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    keep = labels != IGNORE_INDEX
    pred = scores.argmax(dim=-1)[keep]
    gold = labels[keep]
    num_classes = scores.shape[-1]
    if gold.numel() == 0:
        raise ValueError("no labeled row to evaluate")
    result = {"accuracy": float((pred == gold).double().mean())}
    f1s = [_f1(pred, gold, c) for c in range(num_classes)]
    result["macro_f1"] = float(sum(f1s) / num_classes)
    if num_classes == 2:
        result["f1"] = float(f1s[1])
    return result


def _f1(pred: torch.Tensor, gold: torch.Tensor, cls: int) -> float:
    tp = int(((pred == cls) & (gold == cls)).sum())
    fp = int(((pred == cls) & (gold != cls)).sum())
    fn = int(((pred != cls) & (gold == cls)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def ensemble_probabilities(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``[rows, N, C]`` logits -> ``[rows, C]`` mean of the teachers' softmax probabilities."""
    return torch.softmax(teacher_logits.double(), dim=-1).mean(dim=1)


def mean_std(values: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-metric mean and sample standard deviation over runs."""
    keys = list(values[0])
    mean = {k: statistics.fmean(v[k] for v in values) for k in keys}
    std = {k: (statistics.stdev([v[k] for v in values]) if len(values) > 1 else 0.0) for k in keys}
    return mean, std


def metric_names(num_classes: int) -> list[str]:
    return ["accuracy", "f1", "macro_f1"] if num_classes == 2 else ["accuracy", "macro_f1"]


def results_table(results: Mapping[str, Any]) -> Any:
    """A rich table of ``results`` (as :func:`kdkit.pipeline.run_recipe` returns them)."""
    from rich.table import Table

    metrics = results["metrics"]
    table = Table(title=f"{results['name']}: {results['eval']['split']} ({results['eval']['rows']} rows)")
    table.add_column("model")
    table.add_column("steps", justify="right")
    for name in metrics:
        table.add_column(name.replace("_", " "), justify="right")

    def pct(value: float) -> str:
        return f"{100 * value:.2f}"

    def row(label: str, figures: Mapping[str, float], steps: Any = "", std: Mapping[str, float] | None = None) -> None:
        cells = [pct(figures[m]) + (f" ± {pct(std[m])}" if std is not None else "") for m in metrics]
        table.add_row(label, str(steps), *cells)

    for teacher in results["teachers"]:
        row(teacher["name"], teacher["metrics"], teacher.get("steps") or "")
    if len(results["teachers"]) > 1:
        row("teachers (mean)", results["teacher_mean"])
        row("ensemble (mean of probabilities)", results["ensemble"])
    table.add_section()
    for key, label in (("student", "student (distilled)"), ("labels_only", "student (labels only)")):
        block = results.get(key)
        if not block:
            continue
        for run in block["runs"]:
            row(f"{label}, seed {run['seed']}", run["metrics"], run["steps"])
        if len(block["runs"]) > 1:
            row(f"{label}, mean ± std", block["mean"], std=block["std"])
    return table


"""Plots of experiments (matplotlib on the file-only Agg backend): bars for an ablation, lines for a sweep."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError
from kdkit.experiments.stats import REPORT_EXTRA
from kdkit.experiments.tables import value_text
from kdkit.stages.results import metric_scale

def require_pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise KdkitError(f"this command draws plots with matplotlib, which is not installed: {REPORT_EXTRA}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metric: str,
    title: str,
    references: Sequence[tuple[str, float]] = (),
) -> Path:
    """Bars (mean, in percent; perplexity as it is) with error bars (std over seeds), one per record; dashed
    reference lines."""
    plt = require_pyplot()
    scale = metric_scale(metric)
    labels = [r["label"] for r in records]
    means = [scale * r["mean"] for r in records]
    stds = [scale * r["std"] for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 1.5), 4.0))
    try:
        ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="#4c72b0", edgecolor="black", linewidth=0.5)
        for (name, value), style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(scale * value, color="gray", linestyle=style, linewidth=1, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right")
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(title, fontsize=10)
        spread = [m - s for m, s in zip(means, stds, strict=True)] + [scale * v for _, v in references]
        top = [m + s for m, s in zip(means, stds, strict=True)] + [scale * v for _, v in references]
        if spread:
            low, high = min(spread), max(top)
            margin = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin) if scale == 100 else high + margin)
        if references:
            ax.legend(loc="lower right", fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if metric_scale(metric) == 100 else f"{metric} (lower is better)"


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure as a PNG, making its folder first."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def line_plot(
    records: Sequence[Mapping[str, Any]],
    axes: Sequence[tuple[str, Sequence[Any]]],
    path: str | Path,
    *,
    metric: str,
    title: str,
    references: Sequence[tuple[str, float]] = (),
) -> Path:
    """Mean (percent) against the first axis, with std error bars; one line per combination of the other axes.
    Numeric values are placed at their value on the x axis, other values at evenly spaced positions."""
    plt = require_pyplot()
    scale = metric_scale(metric)
    key, values = axes[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {json.dumps(v): (float(v) if numeric else i) for i, v in enumerate(values)}
    series: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        rest = ", ".join(f"{k.split('.')[-1]}={value_text(record['point'][k])}" for k, _ in axes[1:])
        series.setdefault(rest, []).append(record)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    try:
        for name, items in series.items():
            items = sorted(items, key=lambda r: position[json.dumps(r["point"][key])])
            xs = [position[json.dumps(r["point"][key])] for r in items]
            ax.errorbar(
                xs,
                [scale * r["mean"] for r in items],
                yerr=[scale * r["std"] for r in items],
                marker="o",
                capsize=4,
                label=name or None,
            )
        for (ref_name, value), style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(scale * value, color="gray", linestyle=style, linewidth=1, label=ref_name)
        if not numeric:
            ax.set_xticks(list(range(len(values))))
            ax.set_xticklabels([value_text(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(_axis_label(metric))
        ax.set_title(title, fontsize=10)
        if references or len(series) > 1:
            ax.legend(fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)

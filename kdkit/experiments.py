"""``kdkit ablate`` and ``kdkit sweep``: one recipe run as several variants, compared in a table and a plot.

Every variant is an ordinary run of the pipeline (its own run directory, its own ``results.json``). Variants differ
only in student-side settings, so the teachers (content-addressed in ``cache_dir``) are trained once and their
logits computed once for all of them, and a variant whose students are already finished is reused, not trained
again: running the same ablation or sweep twice resumes it.

Where the runs go (``<out>`` = the recipe's ``output_dir``, ``<name>`` = its ``name``):

* the recipe itself (with the command's fixed ``--set`` overrides) runs in ``<out>/<name>/``, exactly where
  ``kdkit run RECIPE --set ...`` puts it, so a finished ``kdkit run`` is reused;
* ``ablate``: each other variant in ``<out>/<name>/ablate/<variant>/``; the table, CSV, JSON and bar chart in
  ``<out>/<name>/ablate/ablation.{md,csv,json,png}``;
* ``sweep``: each point in ``<out>/<name>/sweep/<key>=<value>[,<key>=<value>]/`` (the point equal to the recipe
  itself in ``<out>/<name>/``); the table and line plot in ``<out>/<name>/sweep/sweep.{md,csv,json,png}``.

The table is rewritten after every variant, so partial results are visible while an experiment runs.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError, RecipeError
from kdkit.recipe import Recipe, parse_override, set_dotted, validate_recipe
from kdkit.report import (
    cell,
    csv_text,
    markdown_table,
    mean_std,
    p_text,
    require_pyplot,
    rich_table,
    steps_text,
    t_test,
    write_text,
)

RunFn = Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One run of an experiment: a label, a folder name, and the dotted overrides that make it."""

    label: str
    slug: str
    overrides: dict[str, Any] = field(default_factory=dict)
    point: dict[str, Any] = field(default_factory=dict)  # sweep: {dotted key: value}
    recipe: Recipe | None = None
    run_dir: Path | None = None
    results: dict[str, Any] | None = None


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the mapping it validates from (every default filled in)."""
    return recipe.model_dump(mode="json", by_alias=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_") or "variant"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def ablation_variants(recipe: Recipe) -> list[Variant]:
    """The recipe as written; once with each enabled plugin switched off (``enabled = false``); and, where the
    recipe distills on both streams, once on the labeled stream only and once on the unlabeled one only."""
    variants = [Variant("as written", "as-written")]
    for name in recipe.enabled_plugins():
        variants.append(Variant(f"without {name}", f"without-{name}", {f"plugins.{name}.enabled": False}))
    if set(recipe.distill.on) == {"labeled", "unlabeled"}:
        variants.append(Variant("kd on labeled only", "on-labeled", {"distill.on": ["labeled"]}))
        variants.append(Variant("kd on unlabeled only", "on-unlabeled", {"distill.on": ["unlabeled"]}))
    return variants


def split_values(text: str) -> list[str]:
    """Split ``text`` at the commas that are not inside brackets, braces or quotes: ``0,1,[1,2],"a,b"`` ->
    ``["0", "1", "[1,2]", '"a,b"']``."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote and text[i - 1] != "\\":
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_sweep(expressions: Sequence[str]) -> tuple[list[tuple[str, list[Any]]], dict[str, Any]]:
    """``--set`` expressions of a sweep -> (axes, fixed overrides).

    ``KEY=V1,V2,...`` (two or more values, each read as a TOML value) is an axis; ``KEY=VALUE`` is a fixed
    override applied to every point. Several axes make a grid (every combination).
    """
    axes: dict[str, list[Any]] = {}
    fixed: dict[str, Any] = {}
    for expression in expressions:
        key, sep, text = expression.partition("=")
        key = key.strip()
        if not sep or not key:
            parse_override(expression)  # raises the usual --set error
        pieces = split_values(text)
        if any(not p for p in pieces):
            raise RecipeError("--set", [(key, f"empty value in {text.strip()!r}")])
        values = [parse_override(f"{key}={piece}")[1] for piece in pieces]
        if len(values) == 1:
            fixed[key] = values[0]
            axes.pop(key, None)
        else:
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise RecipeError("--set", [(key, f"a value is listed twice in {text.strip()!r}")])
            axes[key] = values
            fixed.pop(key, None)
    if not axes:
        raise KdkitError(
            "a sweep needs at least one --set KEY=V1,V2,... with two or more comma-separated values, e.g. "
            "--set plugins.unikd-disagreement.lambda=0,1,5,10,15,20"
        )
    return list(axes.items()), fixed


def sweep_variants(axes: Sequence[tuple[str, Sequence[Any]]]) -> list[Variant]:
    variants = []
    for combo in itertools.product(*(values for _, values in axes)):
        point = {key: value for (key, _), value in zip(axes, combo, strict=True)}
        label = ", ".join(f"{key.split('.')[-1]}={_value_text(v)}" for key, v in point.items())
        slug = _slug(",".join(f"{key}={_value_text(v)}" for key, v in point.items()))
        variants.append(Variant(label, slug, dict(point), point))
    return variants


# --------------------------------------------------------------------------- running
def _get_dotted(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part.strip() not in node:
            return None
        node = node[part.strip()]
    return node


def _like(current: Any, value: Any) -> Any:
    """``10`` where the recipe holds ``10.0`` becomes ``10.0``: the same setting, so the same run (student run
    folders are named by a hash of the settings' JSON, where 10 and 10.0 differ)."""
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _prepare(
    base: Recipe, variants: list[Variant], *, kind: str, source: str, fixed: Mapping[str, Any]
) -> Path:
    """Validate every variant before anything runs, and give each its run directory."""
    root = Path(base.output_dir).expanduser() / base.name
    data = recipe_data(base)
    for variant in variants:
        values = copy.deepcopy(data)
        for key, value in variant.overrides.items():
            set_dotted(values, key, _like(_get_dotted(data, key), value))
        try:
            recipe = validate_recipe(values, source=f"{source} [{kind} variant '{variant.label}']")
        except RecipeError:
            raise
        if recipe == base and not fixed:
            variant.run_dir = root  # the recipe itself: the same folder as `kdkit run RECIPE`
        else:
            values["output_dir"] = str(root / kind)
            values["name"] = variant.slug
            recipe = validate_recipe(values, source=f"{source} [{kind} variant '{variant.label}']")
            variant.run_dir = root / kind / variant.slug
        variant.recipe = recipe
    return root / kind


def _run_all(
    variants: list[Variant],
    *,
    recipe_path: str | Path | None,
    console: Any,
    run: RunFn | None,
    after_each: Callable[[], None],
) -> None:
    if run is None:
        from kdkit.pipeline import run_recipe as run
    from kdkit.utils import say

    for number, variant in enumerate(variants, 1):
        say(console, f"=== variant {number}/{len(variants)}: {variant.label} -> {variant.run_dir}", style="bold")
        variant.results = run(variant.recipe, recipe_path=recipe_path, console=console, print_table=False)
        after_each()


def _student_values(results: Mapping[str, Any], metric: str, block: str = "student") -> list[float]:
    data = results.get(block) or {}
    return [float(r["metrics"][metric]) for r in data.get("runs", [])]


def _student_steps(results: Mapping[str, Any], block: str = "student") -> list[Any]:
    data = results.get(block) or {}
    return [r.get("steps") for r in data.get("runs", [])]


# --------------------------------------------------------------------------- ablation
@dataclass
class Experiment:
    """The outcome of an ablation or a sweep: rows of figures and the files written."""

    kind: str
    metric: str
    header: list[str]
    rows: list[list[str]]
    records: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    def table(self, title: str | None = None) -> Any:
        return rich_table(self.header, self.rows, title=title)


def _reference_lines(results: Mapping[str, Any] | None, metric: str) -> list[tuple[str, float]]:
    if not results:
        return []
    return [
        (f"teachers (mean of {len(results['teachers'])})", float(results["teacher_mean"][metric])),
        ("ensemble", float(results["ensemble"][metric])),
    ]


def ablation_table(variants: Sequence[Variant], metric: str) -> Experiment:
    """Rows: each finished variant (and the labels-only student of the recipe as written, if it trained one)."""
    base = variants[0].results
    base_values = _student_values(base, metric) if base else []
    header = ["variant", "steps", "seeds", f"{metric} (mean ± std)", "Δ vs as written", "p vs as written"]
    rows, records = [], []
    entries: list[tuple[str, str, dict[str, Any], str]] = []
    for v in variants:
        if v.results is not None:
            entries.append((v.label, v.slug, v.results, "student"))
    if base and base.get("labels_only"):
        entries.append(("labels only (same steps)", "labels-only", base, "labels_only"))
    for label, slug, results, block in entries:
        values = _student_values(results, metric, block)
        steps = _student_steps(results, block)
        if base_values and not (slug == "as-written" and block == "student"):
            test = t_test(values, base_values)
            delta, p = f"{100 * test.diff:+.2f}", p_text(test.p)
        else:
            test, delta, p = None, "", ""
        rows.append([label, steps_text(steps), str(len(values)), cell(values), delta, p])
        mean, std = mean_std(values) if values else (math.nan, math.nan)
        records.append(
            {
                "label": label,
                "slug": slug,
                "run_dir": results.get("run_dir"),
                "steps": steps,
                "values": values,
                "mean": mean,
                "std": std,
                "diff_vs_base": None if test is None else test.diff,
                "p_vs_base": None if test is None else test.p,
            }
        )
    return Experiment("ablation", metric, header, rows, records)


def bar_chart(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    metric: str,
    title: str,
    references: Sequence[tuple[str, float]] = (),
) -> Path:
    """Bars (mean, in percent) with error bars (std over seeds), one per record; dashed reference lines."""
    plt = require_pyplot()
    labels = [r["label"] for r in records]
    means = [100 * r["mean"] for r in records]
    stds = [100 * r["std"] for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 1.5), 4.0))
    try:
        ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color="#4c72b0", edgecolor="black", linewidth=0.5)
        for (name, value), style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(100 * value, color="gray", linestyle=style, linewidth=1, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(title, fontsize=10)
        spread = [m - s for m, s in zip(means, stds, strict=True)] + [100 * v for _, v in references]
        top = [m + s for m, s in zip(means, stds, strict=True)] + [100 * v for _, v in references]
        if spread:
            low, high = min(spread), max(top)
            margin = max(1.0, 0.15 * (high - low))
            ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
        if references:
            ax.legend(loc="lower right", fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure as a PNG, making its folder first."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _write_outputs(exp: Experiment, directory: Path, stem: str, extra: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    exp.files["markdown"] = write_text(directory / f"{stem}.md", markdown_table(exp.header, exp.rows))
    exp.files["csv"] = write_text(directory / f"{stem}.csv", csv_text(exp.header, exp.rows))
    document = {"kind": exp.kind, "metric": exp.metric, **extra, "rows": exp.records}
    exp.files["json"] = write_text(directory / f"{stem}.json", json.dumps(document, indent=2, default=str) + "\n")


def ablate(
    recipe: Recipe,
    *,
    recipe_path: str | Path | None = None,
    console: Any,
    fixed: Mapping[str, Any] | None = None,
    metric: str = "accuracy",
    plot: bool = True,
    run: RunFn | None = None,
) -> Experiment:
    """Run the ablation of ``recipe`` (see :func:`ablation_variants`) and write its table and bar chart.

    :param fixed: the ``--set`` overrides already applied to ``recipe`` (they decide where the base run goes).
    :param run: the function that runs one recipe (default :func:`kdkit.pipeline.run_recipe`).
    """
    if plot:
        require_pyplot()  # fail before hours of training, not after
    variants = ablation_variants(recipe)
    source = str(recipe_path) if recipe_path is not None else "<recipe>"
    directory = _prepare(recipe, variants, kind="ablate", source=source, fixed=fixed or {})
    state: dict[str, Experiment] = {}

    def write() -> None:
        exp = ablation_table(variants, metric)
        extra = {"recipe": recipe.name, "variants": {v.slug: v.overrides for v in variants}}
        _write_outputs(exp, directory, "ablation", extra)
        if plot and exp.records:
            exp.files["plot"] = bar_chart(
                exp.records,
                directory / "ablation.png",
                metric=metric,
                title=f"{recipe.name}: ablation ({metric}, mean ± std over seeds)",
                references=_reference_lines(variants[0].results, metric),
            )
        state["exp"] = exp

    _run_all(variants, recipe_path=recipe_path, console=console, run=run, after_each=write)
    return state["exp"]


# --------------------------------------------------------------------------- sweep
def sweep_table(variants: Sequence[Variant], axes: Sequence[tuple[str, Sequence[Any]]], metric: str) -> Experiment:
    keys = [key for key, _ in axes]
    header = [*keys, "steps", "seeds", f"{metric} (mean ± std)"]
    rows, records = [], []
    for v in variants:
        if v.results is None:
            continue
        values = _student_values(v.results, metric)
        steps = _student_steps(v.results)
        rows.append([*(_value_text(v.point[k]) for k in keys), steps_text(steps), str(len(values)), cell(values)])
        mean, std = mean_std(values) if values else (math.nan, math.nan)
        records.append(
            {
                "label": v.label,
                "point": v.point,
                "run_dir": v.results.get("run_dir"),
                "steps": steps,
                "values": values,
                "mean": mean,
                "std": std,
            }
        )
    return Experiment("sweep", metric, header, rows, records)


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
    key, values = axes[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    position = {json.dumps(v): (float(v) if numeric else i) for i, v in enumerate(values)}
    series: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        rest = ", ".join(f"{k.split('.')[-1]}={_value_text(record['point'][k])}" for k, _ in axes[1:])
        series.setdefault(rest, []).append(record)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    try:
        for name, items in series.items():
            items = sorted(items, key=lambda r: position[json.dumps(r["point"][key])])
            xs = [position[json.dumps(r["point"][key])] for r in items]
            ax.errorbar(
                xs,
                [100 * r["mean"] for r in items],
                yerr=[100 * r["std"] for r in items],
                marker="o",
                capsize=4,
                label=name or None,
            )
        for (ref_name, value), style in zip(references, ("--", ":", "-."), strict=False):
            ax.axhline(100 * value, color="gray", linestyle=style, linewidth=1, label=ref_name)
        if not numeric:
            ax.set_xticks(list(range(len(values))))
            ax.set_xticklabels([_value_text(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(title, fontsize=10)
        if references or len(series) > 1:
            ax.legend(fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)


def sweep(
    recipe: Recipe,
    axes: Sequence[tuple[str, Sequence[Any]]],
    *,
    recipe_path: str | Path | None = None,
    console: Any,
    fixed: Mapping[str, Any] | None = None,
    metric: str = "accuracy",
    plot: bool = True,
    run: RunFn | None = None,
) -> Experiment:
    """Run ``recipe`` at every point of the grid ``axes`` and write the table and the line plot.

    :param recipe: the recipe with the fixed overrides applied (``fixed`` names them).
    """
    if plot:
        require_pyplot()
    variants = sweep_variants(axes)
    source = str(recipe_path) if recipe_path is not None else "<recipe>"
    directory = _prepare(recipe, variants, kind="sweep", source=source, fixed=fixed or {})
    state: dict[str, Experiment] = {}

    def write() -> None:
        exp = sweep_table(variants, axes, metric)
        extra = {"recipe": recipe.name, "axes": {k: list(v) for k, v in axes}, "fixed": dict(fixed or {})}
        _write_outputs(exp, directory, "sweep", extra)
        if plot and exp.records:
            first = next((v.results for v in variants if v.results), None)
            exp.files["plot"] = line_plot(
                exp.records,
                axes,
                directory / "sweep.png",
                metric=metric,
                title=f"{recipe.name}: {axes[0][0].split('.')[-1]} ({metric}, mean ± std over seeds)",
                references=_reference_lines(first, metric),
            )
        state["exp"] = exp

    _run_all(variants, recipe_path=recipe_path, console=console, run=run, after_each=write)
    return state["exp"]

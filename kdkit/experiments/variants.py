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
from kdkit.experiments.plots import bar_chart, line_plot, require_pyplot
from kdkit.experiments.stats import t_test
from kdkit.experiments.tables import cell, csv_text, markdown_table, p_text, rich_table, steps_text, value_text, write_text
from kdkit.recipe.load import parse_override, validate_recipe, set_dotted
from kdkit.recipe.schema import Recipe
from kdkit.runtime import say
from kdkit.stages.results import Results, StudentKind, mean_std, metric_scale

#: Runs one variant's recipe: ``run(recipe, recipe_path=..., console=...) -> Results``.
RunFn = Callable[..., Results]


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
    results: Results | None = None


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the mapping it validates from (every default filled in)."""
    return recipe.model_dump(mode="json", by_alias=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).strip("_") or "variant"


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
        label = ", ".join(f"{key.split('.')[-1]}={value_text(v)}" for key, v in point.items())
        slug = _slug(",".join(f"{key}={value_text(v)}" for key, v in point.items()))
        variants.append(Variant(label, slug, dict(point), point))
    return variants


# --------------------------------------------------------------------------- running
def _prepare(
    base: Recipe, variants: list[Variant], *, kind: str, source: str, fixed: Mapping[str, Any]
) -> Path:
    """Validate every variant before anything runs, and give each its run directory."""
    root = Path(base.output_dir).expanduser() / base.name
    data = recipe_data(base)
    for variant in variants:
        values = copy.deepcopy(data)
        for key, value in variant.overrides.items():
            set_dotted(values, key, value)
        where = f"{source} [{kind} variant '{variant.label}']"
        recipe = validate_recipe(values, source=where)
        if recipe == base and not fixed:
            variant.run_dir = root  # the recipe itself: the same folder as `kdkit run RECIPE`
        else:
            values["output_dir"] = str(root / kind)
            values["name"] = variant.slug
            recipe = validate_recipe(values, source=where)
            variant.run_dir = root / kind / variant.slug
        variant.recipe = recipe
    return root / kind


# --------------------------------------------------------------------------- tables
def task_metric(recipe: Recipe) -> str:
    """The metric an experiment shows unless told: perplexity for a causal-LM recipe, else accuracy."""
    return "perplexity" if recipe.task == "causal-lm" else "accuracy"


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


def _reference_lines(results: Results | None, metric: str) -> list[tuple[str, float]]:
    if not results:
        return []
    return [
        (f"teachers (mean of {len(results.teachers)})", float(results.teacher_mean[metric])),
        ("ensemble", float(results.ensemble[metric])),
    ]


def _record(label: str, results: Results, kind: StudentKind, metric: str, **extra: Any) -> dict[str, Any]:
    """One row's figures: the per-seed values of ``metric``, their mean and std, the steps."""
    values = results.student_values(metric, kind)
    mean, std = mean_std(values) if values else (math.nan, math.nan)
    return {
        "label": label,
        **extra,
        "run_dir": results.run_dir or None,
        "steps": results.student_steps(kind),
        "values": values,
        "mean": mean,
        "std": std,
    }


def ablation_table(variants: Sequence[Variant], metric: str) -> Experiment:
    """Rows: each finished variant (and the labels-only student of the recipe as written, if it trained one)."""
    base = variants[0].results
    base_values = base.student_values(metric) if base else []
    header = ["variant", "steps", "seeds", f"{metric} (mean ± std)", "Δ vs as written", "p vs as written"]
    entries: list[tuple[str, str, Results, StudentKind]] = [
        (v.label, v.slug, v.results, "distilled") for v in variants if v.results is not None
    ]
    if base and base.labels_only:
        entries.append(("labels only (same steps)", "labels-only", base, "labels-only"))
    rows, records = [], []
    for label, slug, results, kind in entries:
        record = _record(label, results, kind, metric, slug=slug)
        test = None
        if base_values and not (slug == "as-written" and kind == "distilled"):
            test = t_test(record["values"], base_values)
        delta, p = (f"{metric_scale(metric) * test.diff:+.2f}", p_text(test.p)) if test else ("", "")
        rows.append(
            [label, steps_text(record["steps"]), str(len(record["values"])), cell(record["values"], metric_scale(metric)),
             delta, p]
        )
        records.append(
            {**record, "diff_vs_base": None if test is None else test.diff, "p_vs_base": None if test is None else test.p}
        )
    return Experiment("ablation", metric, header, rows, records)


def sweep_table(variants: Sequence[Variant], axes: Sequence[tuple[str, Sequence[Any]]], metric: str) -> Experiment:
    keys = [key for key, _ in axes]
    header = [*keys, "steps", "seeds", f"{metric} (mean ± std)"]
    rows, records = [], []
    for v in variants:
        if v.results is None:
            continue
        record = _record(v.label, v.results, "distilled", metric, point=v.point)
        values = record["values"]
        rows.append(
            [*(value_text(v.point[k]) for k in keys), steps_text(record["steps"]), str(len(values)),
             cell(values, metric_scale(metric))]
        )
        records.append(record)
    return Experiment("sweep", metric, header, rows, records)


def _write_outputs(exp: Experiment, directory: Path, stem: str, extra: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    exp.files["markdown"] = write_text(directory / f"{stem}.md", markdown_table(exp.header, exp.rows))
    exp.files["csv"] = write_text(directory / f"{stem}.csv", csv_text(exp.header, exp.rows))
    document = {"kind": exp.kind, "metric": exp.metric, **extra, "rows": exp.records}
    exp.files["json"] = write_text(directory / f"{stem}.json", json.dumps(document, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- the two experiments
def _run_experiment(
    recipe: Recipe,
    variants: list[Variant],
    *,
    kind: str,
    stem: str,
    tabulate: Callable[[Sequence[Variant]], Experiment],
    draw: Callable[[Experiment, Path], Path] | None,
    extra: Mapping[str, Any],
    recipe_path: str | Path | None,
    console: Any,
    fixed: Mapping[str, Any],
    run: RunFn | None,
) -> Experiment:
    """Validate every variant, then run them in order, rewriting the table (and plot) after each."""
    if draw is not None:
        require_pyplot()  # fail before hours of training, not after
    source = str(recipe_path) if recipe_path is not None else "<recipe>"
    directory = _prepare(recipe, variants, kind=kind, source=source, fixed=fixed)
    if run is None:
        from kdkit.stages.run import run_pipeline as run
    exp = tabulate(variants)
    for number, variant in enumerate(variants, 1):
        say(console, f"=== variant {number}/{len(variants)}: {variant.label} -> {variant.run_dir}", style="bold")
        variant.results = run(variant.recipe, recipe_path=recipe_path, console=console)
        exp = tabulate(variants)
        _write_outputs(exp, directory, stem, extra)
        if draw is not None and exp.records:
            exp.files["plot"] = draw(exp, directory / f"{stem}.png")
    return exp


def ablate(
    recipe: Recipe,
    *,
    recipe_path: str | Path | None = None,
    console: Any,
    fixed: Mapping[str, Any] | None = None,
    metric: str | None = None,
    plot: bool = True,
    run: RunFn | None = None,
) -> Experiment:
    """Run the ablation of ``recipe`` (see :func:`ablation_variants`) and write its table and bar chart.

    :param metric: the table's; :func:`task_metric` of the recipe by default.

    :param fixed: the ``--set`` overrides already applied to ``recipe`` (they decide where the base run goes).
    :param run: the function that runs one recipe (default :func:`kdkit.stages.run.run_pipeline`).
    """
    variants = ablation_variants(recipe)
    metric = metric or task_metric(recipe)

    def draw(exp: Experiment, path: Path) -> Path:
        return bar_chart(
            exp.records, path, metric=metric, title=f"{recipe.name}: ablation ({metric}, mean ± std over seeds)",
            references=_reference_lines(variants[0].results, metric),
        )

    return _run_experiment(
        recipe, variants, kind="ablate", stem="ablation", tabulate=lambda vs: ablation_table(vs, metric),
        draw=draw if plot else None, extra={"recipe": recipe.name, "variants": {v.slug: v.overrides for v in variants}},
        recipe_path=recipe_path, console=console, fixed=fixed or {}, run=run,
    )


def sweep(
    recipe: Recipe,
    axes: Sequence[tuple[str, Sequence[Any]]],
    *,
    recipe_path: str | Path | None = None,
    console: Any,
    fixed: Mapping[str, Any] | None = None,
    metric: str | None = None,
    plot: bool = True,
    run: RunFn | None = None,
) -> Experiment:
    """Run ``recipe`` at every point of the grid ``axes`` and write the table and the line plot (of ``metric``:
    :func:`task_metric` of the recipe by default).

    :param recipe: the recipe with the fixed overrides applied (``fixed`` names them).
    """
    variants = sweep_variants(axes)
    metric = metric or task_metric(recipe)

    def draw(exp: Experiment, path: Path) -> Path:
        first = next((v.results for v in variants if v.results), None)
        return line_plot(
            exp.records, axes, path, metric=metric,
            title=f"{recipe.name}: {axes[0][0].split('.')[-1]} ({metric}, mean ± std over seeds)",
            references=_reference_lines(first, metric),
        )

    extra = {"recipe": recipe.name, "axes": {k: list(v) for k, v in axes}, "fixed": dict(fixed or {})}
    return _run_experiment(
        recipe, variants, kind="sweep", stem="sweep", tabulate=lambda vs: sweep_table(vs, axes, metric),
        draw=draw if plot else None, extra=extra, recipe_path=recipe_path, console=console, fixed=fixed or {},
        run=run,
    )

"""The ``kdkit`` command line.

Results go to stdout (``--json`` for machines), progress and diagnostics to stderr. A user error (any
:class:`kdkit.errors.KdkitError`: a bad recipe, an unknown plugin, unusable data) prints its message and exits
with code 2, without a traceback. Ctrl-C stops with exit code 130 and says how to continue.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kdkit._version import __version__
from kdkit.errors import KdkitError, KdkitWarning
from kdkit.plugin.registry import discover_plugins
from kdkit.recipe.jsonschema import recipe_json_schema
from kdkit.recipe.load import load_recipe, parse_overrides
from kdkit.recipe.schema import Recipe
from kdkit.runtime import is_main_process
from kdkit.stages.preflight import preflight

app = typer.Typer(
    name="kdkit",
    help="Ensemble knowledge distillation with pluggable weighting strategies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


# --------------------------------------------------------------------------- output
def stderr_console() -> Console:
    """Diagnostics and progress. Plain text when stderr is not a terminal (rich decides; NO_COLOR is honoured)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def report_error(exc: KdkitError) -> None:
    """Print a user error to stderr: its message only, never markup-interpreted, never a traceback."""
    stderr_console().print(Text("error: ", style="bold red") + Text(str(exc)))


def _warn(message: str) -> None:
    stderr_console().print(Text("warning: ", style="yellow") + Text(message))


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except KdkitError as exc:
        report_error(exc)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        # Ctrl-C: everything finished so far is on disk (teachers, teacher logits, student checkpoints)
        stderr_console().print(
            Text(
                "interrupted: run the same command again to continue; finished teachers, teacher logits and the "
                "student's last checkpoint are kept"
            )
        )
        raise typer.Exit(INTERRUPTED) from None


#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def _load(recipe: Path, overrides: Sequence[str]) -> Recipe:
    return load_recipe(recipe, overrides=parse_overrides(overrides))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdkit {__version__}")
        raise typer.Exit()


RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="recipe file (TOML)", show_default=False)]
SetOption = Annotated[
    list[str],
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set plugins.unikd-disagreement.lambda=15 (VALUE is read as TOML, "
        "else as a string); repeatable",
        show_default=False,
    ),
]


# --------------------------------------------------------------------------- commands
@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="show the version and exit")
    ] = False,
) -> None:
    """Ensemble knowledge distillation with pluggable teacher-ensembling, loss- and sample-weighting plugins."""


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = []) -> None:  # noqa: B006 (typer reads the default)
    """Check a recipe as a whole (keys, types, plugins and their options, output folders, model references and
    their config.json where local) without reading data or loading a model."""
    with _user_errors():
        loaded = _load(recipe, set_)
        preflight(loaded, source=str(recipe), hub_needed="skip", launched=False)
    enabled = list(loaded.enabled_plugins())
    count = f"{len(enabled)} plugin{'s' if len(enabled) != 1 else ''} enabled"
    detail = f": {', '.join(enabled)}" if enabled else ""
    stdout_console().print(Text(f"ok: {loaded.name} ({count}{detail})"))


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOption = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON on stdout")] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="train the students again; teachers and teacher outputs are still reused")
    ] = False,
) -> None:
    """Run a recipe: data, teachers, teacher logits, student, evaluation; writes results.json."""
    with _user_errors():
        loaded = _load(recipe, set_)
        from kdkit.stages.run import run_recipe  # heavy (transformers, datasets): only when running

        # the pipeline prints its results table on stdout; with --json, stdout holds the JSON document only
        options = {"fresh": True} if fresh else {}
        results = run_recipe(
            loaded, recipe_path=recipe, console=stderr_console(), print_table=not as_json, **options
        )
    if as_json and is_main_process():  # under torchrun, one document from rank 0
        typer.echo(json.dumps(results, indent=2, default=str))


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipes, including the options of every installed plugin."""
    registry = discover_plugins()
    document, skipped = recipe_json_schema(registry)
    for name, reason in skipped:
        record = registry.records[name]
        if record.status == "blocked":
            _warn(f"plugin '{name}' is {reason}; its options are left out of the schema")
        else:
            _warn(f"plugin '{name}' failed to load and is left out of the schema: {reason}")
    typer.echo(json.dumps(document, indent=2))


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of a table")] = False,
) -> None:
    """List the installed plugins: name, version, hooks, the streams whose teacher weights each sets, distribution
    and load status (ok, failed, blocked)."""
    registry = discover_plugins()
    records = sorted(registry.records.values(), key=lambda r: r.name)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in records], indent=2))
        return
    table = Table(title=None, show_lines=False)
    for column in ("name", "version", "hooks", "streams", "distribution", "status", "error"):
        table.add_column(column, overflow="fold", no_wrap=column not in ("hooks", "streams", "error"))
    colours = {"ok": "green", "failed": "red", "blocked": "yellow"}
    for r in records:
        hooks = ", ".join(h.removeprefix("kdkit_") for h in r.hooks)
        table.add_row(
            Text(r.name),
            Text(r.version),
            Text(hooks),
            Text(r.streams),
            Text(r.distribution),
            Text(r.status, style=colours.get(r.status, "")),
            Text(r.error),
        )
    console = stdout_console()
    if not console.is_terminal:
        console.width = 10_000  # a pipe or a file gets whole lines; the table only takes the width it needs
    console.print(table)
    failed = [r.name for r in records if r.status == "failed"]
    if failed:
        _warn(f"{len(failed)} plugin{'s' if len(failed) != 1 else ''} failed to load: {', '.join(failed)}")


MetricOption = Annotated[
    str | None,
    typer.Option(
        "--metric",
        help="metric of the table and plot: accuracy, f1 or macro_f1; perplexity or accuracy (next token) for "
        "causal-lm runs [default: accuracy; perplexity for causal-lm]",
        show_default=False,
    ),
]


def _print_outputs(files: dict[str, Path]) -> None:
    for kind, path in files.items():
        stderr_console().print(Text(f"  {kind}: {path}"))


@app.command()
def ablate(
    recipe: RecipeArg,
    set_: SetOption = [],  # noqa: B006
    metric: MetricOption = None,
) -> None:
    """Run a recipe as written, once with each enabled plugin switched off and (when it distills on both streams)
    on each stream alone; over the recipe's seeds, reusing teachers and logits. Writes a table and a bar chart
    to <output_dir>/<name>/ablate/."""
    with _user_errors():
        fixed = parse_overrides(set_)
        loaded = load_recipe(recipe, overrides=fixed)
        from kdkit.experiments.variants import ablate as run_ablation

        exp = run_ablation(loaded, recipe_path=recipe, console=stderr_console(), fixed=fixed, metric=metric)
    stdout_console().print(exp.table(title=f"{loaded.name}: ablation"))
    _print_outputs(exp.files)


@app.command()
def sweep(
    recipe: RecipeArg,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            "-s",
            metavar="KEY=V1,V2,...",
            help="a swept key with comma-separated values, each read as TOML "
            "(e.g. plugins.unikd-disagreement.lambda=0,1,5,10,15,20); several swept keys make a grid; "
            "KEY=VALUE with one value is a fixed override",
            show_default=False,
        ),
    ] = [],  # noqa: B006
    metric: MetricOption = None,
) -> None:
    """Run a recipe at every value (or every combination of values) of the swept keys; writes a table and a line
    plot with error bars to <output_dir>/<name>/sweep/."""
    with _user_errors():
        from kdkit.experiments.variants import parse_sweep
        from kdkit.experiments.variants import sweep as run_sweep

        axes, fixed = parse_sweep(set_)
        loaded = load_recipe(recipe, overrides=fixed)
        exp = run_sweep(loaded, axes, recipe_path=recipe, console=stderr_console(), fixed=fixed, metric=metric)
    stdout_console().print(exp.table(title=f"{loaded.name}: sweep"))
    _print_outputs(exp.files)


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="finished run directories (holding results.json)")
    ],
    markdown: Annotated[Path | None, typer.Option("--markdown", help="write the tables as Markdown here")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="write one line per row and data set as CSV here")] = None,
    as_json: Annotated[Path | None, typer.Option("--json", help="write every figure and test as JSON here")] = None,
    metric: MetricOption = None,
    alpha: Annotated[float, typer.Option("--alpha", help="significance level of the t-tests")] = 0.05,
) -> None:
    """Collect finished runs into the paper's Table 2 layout (single teacher, ensemble, one row per method; one
    column per data set), mean ± std over student seeds, with Student's t-test between every two methods."""
    with _user_errors():
        from kdkit.experiments.report import report_runs
        from kdkit.experiments.tables import rich_table, write_text

        if not 0 < alpha < 1:
            raise KdkitError(f"--alpha must be between 0 and 1, got {alpha}")
        result = report_runs(run_dirs, metric=metric, alpha=alpha)
        console = stdout_console()
        if not console.is_terminal:
            console.width = 10_000
        console.print(rich_table(result.header(), result.body(), title=result.caption()))
        for line in result.protocol_lines() + result.noise_lines():
            console.print(Text(line))
        if result.tests:
            console.print(rich_table(result.test_header(), result.test_body(), title="Student's t-test, two-sided"))
        if markdown is not None:
            write_text(markdown, result.markdown())
        if csv is not None:
            write_text(csv, result.csv())
        if as_json is not None:
            write_text(as_json, json.dumps(result.as_dict(), indent=2) + "\n")


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> None:
    """The ``kdkit`` console script."""
    # kdkit's own warnings reach the console through the stages, once each; as Python warnings too they would
    # print a second time, with a source line nobody asked for
    warnings.filterwarnings("ignore", category=KdkitWarning)
    try:
        app(args=list(argv) if argv is not None else None, prog_name="kdkit")
    except KdkitError as exc:  # raised outside a command body (e.g. while Typer parses): same treatment
        report_error(exc)
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()

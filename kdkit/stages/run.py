"""``kdkit run``: data -> teachers -> teacher outputs -> students -> evaluation.

Paths: ``output_dir``, ``cache_dir`` and ``data.files`` in a recipe resolve against the current working
directory (as with any command-line tool), not against the recipe file. A run writes into
``<output_dir>/<name>/``:

* ``students/<kind>-seed<seed>-<hash>/``: each student run (checkpoints while training, then ``model/``,
  ``eval_logits.safetensors`` and ``done.json``); the hash covers every setting that changes the result, so a
  changed recipe starts a fresh run and the same recipe resumes or reuses the finished one;
* ``results.partial.json``: the figures of the student runs finished so far (removed at the end);
* ``recipe.resolved.json`` (the recipe with every default filled in) and ``results.json`` (every figure), each
  written atomically once everything is done; until then the previous run's pair stays in place.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdkit.modeling.loading import no_weight_progress_bars
from kdkit.recipe.schema import Recipe
from kdkit.runtime import init_distributed, is_main_process, say, world_size
from kdkit.stages.data import load_data
from kdkit.stages.evaluation import evaluate
from kdkit.stages.preflight import preflight
from kdkit.stages.results import PARTIAL_FILE, RESOLVED_RECIPE_FILE, RESULTS_FILE, Results, results_table
from kdkit.stages.students import run_students
from kdkit.stages.teacher_outputs import teacher_outputs
from kdkit.stages.teachers import prepare_teachers
from kdkit.store.files import atomic_write_json
from kdkit.tasks import task_for


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    tick = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - tick


def _stage(console: Any, number: int, title: str) -> None:
    say(console, f"{number}/5 {title}", style="bold")


def run_pipeline(
    recipe: Recipe, *, recipe_path: Path | str | None = None, console: Any, fresh: bool = False
) -> Results:
    """Run a recipe end to end; the main process writes ``<output_dir>/<name>/results.json``.

    :param fresh: train every student again (teachers and teacher outputs are still reused).
    """
    with no_weight_progress_bars():
        return _run_stages(recipe, recipe_path=recipe_path, console=console, fresh=fresh)


def _run_stages(recipe: Recipe, *, recipe_path: Path | str | None, console: Any, fresh: bool) -> Results:
    from transformers import set_seed

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    set_seed(recipe.seeds[0])
    init_distributed()  # several processes (torchrun): all train together; the main one alone writes the files
    task = task_for(recipe)  # the recipe's task (sequence classification unless it says causal-lm)
    preflight(recipe, source=str(recipe_path) if recipe_path is not None else "<recipe>")
    run_dir = _start_run_dir(recipe, console)
    cache_dir = Path(recipe.cache_dir).expanduser().resolve()
    with _timed(seconds, "data"):
        _stage(console, 1, "data")
        data = load_data(recipe, console, task=task)
    with _timed(seconds, "teachers"):
        _stage(console, 2, f"teachers ({recipe.teachers.count})")
        teachers = prepare_teachers(
            recipe.teachers, cache_dir=cache_dir, labeled=data.splits.labeled, text_columns=data.text_columns,
            label_names=data.label_names, max_length=recipe.data.max_length, console=console,
            world_size=world_size(), tune=data.splits.tune, task=task,
        )
    with _timed(seconds, "teacher_logits"):
        _stage(console, 3, "teacher outputs")
        outputs = teacher_outputs(recipe, task=task, data=data, teachers=teachers, cache_dir=cache_dir, console=console)
    with _timed(seconds, "students"):
        seeds = f"{len(recipe.seeds)} seed{'s' if len(recipe.seeds) != 1 else ''}"
        baseline = ", plus labels-only baseline" if recipe.student.label_only_baseline else ""
        _stage(console, 4, f"student ({seeds}{baseline})")
        students = run_students(
            recipe, task=task, data=data, teachers=teachers, outputs=outputs, run_dir=run_dir, cache_dir=cache_dir,
            console=console, fresh=fresh,
        )
    _stage(console, 5, "evaluation")
    seconds["total"] = time.perf_counter() - started
    results = evaluate(
        recipe, task=task, data=data, teachers=teachers, outputs=outputs, students=students,
        recipe_path=recipe_path, run_dir=run_dir, seconds=seconds, console=console,
    )
    if is_main_process():
        _finish_run_dir(recipe, results, run_dir)
        say(console, f"  results: {run_dir / RESULTS_FILE} ({seconds['total']:.0f} s)")
    return results


def _start_run_dir(recipe: Recipe, console: Any) -> Path:
    """``<output_dir>/<name>``, made. The results of an earlier run there stay in place (a run that fails loses
    nothing) until this run has finished and replaces them (:func:`_finish_run_dir`)."""
    run_dir = Path(recipe.output_dir).expanduser().resolve() / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    say(console, f"run {recipe.name} -> {run_dir}")
    return run_dir


def _finish_run_dir(recipe: Recipe, results: Results, run_dir: Path) -> None:
    """Replace the run's resolved recipe and results, each atomically, results last (a reader that finds
    ``results.json`` finds the recipe it belongs to beside it)."""
    atomic_write_json(run_dir / RESOLVED_RECIPE_FILE, recipe.model_dump(mode="json"))
    results.write(run_dir / RESULTS_FILE)
    (run_dir / PARTIAL_FILE).unlink(missing_ok=True)


def run_recipe(
    recipe: Recipe,
    *,
    recipe_path: Path | str | None = None,
    console: Any,
    results_console: Any = None,
    print_table: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run a recipe end to end and return its results as the JSON document written to
    ``<output_dir>/<name>/results.json`` (:func:`run_pipeline` returns the typed :class:`Results`).

    :param console: progress and diagnostics (stderr).
    :param results_console: where the results table goes (default: a console on stdout).
    :param print_table: print the results table (off for ``--json``).
    :param fresh: train every student again (teachers and teacher outputs are still reused).
    """
    results = run_pipeline(recipe, recipe_path=recipe_path, console=console, fresh=fresh)
    if print_table and is_main_process():
        if results_console is None:
            from rich.console import Console

            results_console = Console()
        results_console.print(results_table(results))
    return results.model_dump(mode="json")

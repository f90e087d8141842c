"""The experiment suite's runner (benchmarks/run_experiments.py) queues UniKD's ablation and lambda sweep one variant
a step, as plain ``kdkit run`` commands. Its promise: each step is exactly the run that ``kdkit ablate`` /
``kdkit sweep`` makes for that variant (the same recipe, the same folder), so that either command, run later,
finds the step's runs finished instead of training them again. Checked here on the suite's own recipes, without
training anything: the recipes each side would run are compared."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kdkit.experiments import ablate, parse_sweep, sweep
from kdkit.recipe import Recipe, load_recipe
from kdkit.recipe.load import parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def _runner() -> Any:
    spec = importlib.util.spec_from_file_location("run_experiments", ROOT / "benchmarks" / "run_experiments.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]


def _what_the_command_runs(
    kind: str, data: str, runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Recipe]:
    """{run folder: recipe} of every variant that ``kdkit ablate`` / ``kdkit sweep`` would train (none trained)."""
    monkeypatch.chdir(tmp_path)  # the tables of the (empty) experiment are written under the recipe's output_dir
    recipe_path = ROOT / "recipes" / "suite" / data / "unikd.toml"
    ran: dict[str, Recipe] = {}

    def record(recipe: Recipe, **_: Any) -> None:
        ran[str(Path(recipe.output_dir) / recipe.name)] = recipe

    console = Console(file=io.StringIO())
    if kind == "ablate":
        fixed = parse_overrides(_sets(runner.EARLY_SETS))
        ablate(load_recipe(recipe_path, overrides=fixed), recipe_path=recipe_path, console=console, fixed=fixed,
               plot=False, run=record)
    else:
        values = ",".join(str(v) for v in runner.LAMBDAS)
        axes, fixed = parse_sweep([*_sets(runner.EARLY_SETS), f"{runner.LAMBDA_KEY}={values}"])
        sweep(load_recipe(recipe_path, overrides=fixed), axes, recipe_path=recipe_path, console=console, fixed=fixed,
              plot=False, run=record)
    return ran


@pytest.mark.parametrize("data", ["vader", "rt"])
@pytest.mark.parametrize("kind", ["ablate", "sweep"])
def test_each_step_is_the_run_the_experiment_command_makes(
    kind: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _runner()
    steps = [s for s in runner.plan() if s.group == kind and s.name.startswith(f"{data}-")]
    expected = _what_the_command_runs(kind, data, runner, tmp_path, monkeypatch)
    # kdkit ablate also runs the recipe as written; the suite takes that row from Table 2 (same recipe and seeds)
    expected.pop(f"runs/suite/{data}/unikd/ablate/as-written", None)
    assert len(steps) == len(expected) == (4 if kind == "ablate" else len(runner.LAMBDAS)), sorted(expected)
    for step in steps:
        assert step.args[0] == "run", step.name
        recipe = load_recipe(ROOT / step.args[1], overrides=parse_overrides(_sets(step.args)))
        folder = str(Path(recipe.output_dir) / recipe.name)
        assert folder in expected, f"{step.name}: {folder} is not a folder of kdkit {kind} ({sorted(expected)})"
        # as JSON, where 5 and 5.0 differ: student run folders are named by a hash of it
        assert recipe.model_dump_json() == expected[folder].model_dump_json(), step.name


def test_the_sweep_leaves_out_only_the_recipes_own_lambda() -> None:
    runner = _runner()
    recipe = load_recipe(ROOT / "recipes" / "suite" / "vader" / "unikd.toml")
    assert recipe.plugins["unikd-disagreement"]["lambda"] == 10.0
    assert sorted([*runner.LAMBDAS, 10]) == [0, 1, 5, 10, 20]

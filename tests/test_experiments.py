"""kdkit ablate and kdkit sweep on tiny random BERTs: every variant runs, teachers are trained once for all of
them, tables and plots are written, and a second invocation trains nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from helpers_models import make_bert, quick_recipe
from kdkit.cli import app
from kdkit.errors import KdkitError
from kdkit.experiments import ablate, ablation_variants, parse_sweep, split_values, sweep
from kdkit.recipe import validate_recipe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("base") / "tiny-bert", layers=1, seed=0)


def _recipe(tmp_path: Path, base_model: Path, **overrides: Any) -> dict[str, Any]:
    data = quick_recipe(
        tmp_path,
        base_model,
        **{
            "teachers.epochs": 1,
            "student.max_steps": 4,
            "student.save_steps": 100,
            "plugins": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}},
            **overrides,
        },
    )
    return data


def _console() -> Console:
    return Console(file=io.StringIO(), width=200)


def _count_calls(monkeypatch: pytest.MonkeyPatch, target: str) -> list[Any]:
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    calls: list[Any] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("seed"))
        return original(*args, **kwargs)

    monkeypatch.setattr(target, counting)
    return calls


def _assert_png(path: Path) -> None:
    raw = path.read_bytes()
    assert raw.startswith(PNG_MAGIC) and len(raw) > 2000


def test_ablation_variants_of_a_recipe(tmp_path: Path, base_model: Path) -> None:
    recipe = validate_recipe(_recipe(tmp_path, base_model))
    assert [(v.label, v.overrides) for v in ablation_variants(recipe)] == [
        ("as written", {}),
        ("without unikd-correctness", {"plugins.unikd-correctness.enabled": False}),
        ("without unikd-disagreement", {"plugins.unikd-disagreement.enabled": False}),
        ("kd on labeled only", {"distill.on": ["labeled"]}),
        ("kd on unlabeled only", {"distill.on": ["unlabeled"]}),
    ]
    one_stream = validate_recipe(_recipe(tmp_path, base_model, **{"distill.on": ["labeled"], "plugins": {"aekd": {}}}))
    assert [v.label for v in ablation_variants(one_stream)] == ["as written", "without aekd"]


def test_ablate_trains_teachers_once_writes_table_and_plot_and_resumes(
    tmp_path: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = validate_recipe(_recipe(tmp_path, base_model, seeds=[1, 2]))
    teacher_calls = _count_calls(monkeypatch, "kdkit.stages.teachers.train_teacher")
    exp = ablate(recipe, console=_console())

    # two teachers, trained once for the five variants
    assert sorted(teacher_calls) == [1, 2]
    root = tmp_path / "runs" / "tiny"
    dirs = {
        "as-written": root,
        "without-unikd-correctness": root / "ablate" / "without-unikd-correctness",
        "without-unikd-disagreement": root / "ablate" / "without-unikd-disagreement",
        "on-labeled": root / "ablate" / "on-labeled",
        "on-unlabeled": root / "ablate" / "on-unlabeled",
    }
    for slug, directory in dirs.items():
        results = json.loads((directory / "results.json").read_text())
        assert results["cache"]["teachers_trained"] == (2 if slug == "as-written" else 0), slug
        # each (teacher, split) predicted once, by the first variant: labeled, unlabeled, tune, eval x 2 teachers
        assert len(results["cache"]["logits_built"]) == (8 if slug == "as-written" else 0), slug
        assert [r["steps"] for r in results["student"]["runs"]] == [4, 4], slug  # max_steps: equal steps
    switched = json.loads((dirs["without-unikd-correctness"] / "recipe.resolved.json").read_text())
    assert switched["plugins"]["unikd-correctness"]["enabled"] is False
    assert json.loads((dirs["on-labeled"] / "results.json").read_text())["distill"]["on"] == ["labeled"]

    assert [r["label"] for r in exp.records] == [
        "as written",
        "without unikd-correctness",
        "without unikd-disagreement",
        "kd on labeled only",
        "kd on unlabeled only",
    ]
    for record, slug in zip(exp.records, dirs, strict=True):
        results = json.loads((dirs[slug] / "results.json").read_text())
        values = [r["metrics"]["accuracy"] for r in results["student"]["runs"]]
        assert record["values"] == values
        assert record["mean"] == pytest.approx(sum(values) / 2)
        assert record["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    out = root / "ablate"
    _assert_png(out / "ablation.png")
    md = (out / "ablation.md").read_text()
    assert md.startswith("| variant | steps | seeds | accuracy (mean ± std) |") and "| kd on unlabeled only | 4 | 2 |" in md
    assert (out / "ablation.csv").read_text().count("\n") == 6
    assert json.loads((out / "ablation.json").read_text())["variants"]["on-labeled"] == {"distill.on": ["labeled"]}

    # again: everything is reused, nothing is trained or predicted
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("trained again")

    monkeypatch.setattr("kdkit.training.loop.make_trainer", forbidden)
    again = ablate(recipe, console=_console())
    assert sorted(teacher_calls) == [1, 2]
    for directory in dirs.values():
        assert json.loads((directory / "results.json").read_text())["cache"]["logits_built"] == []
    assert [r["values"] for r in again.records] == [r["values"] for r in exp.records]


def test_sweep_on_the_cli_reuses_the_recipe_run_for_its_own_value(
    tmp_path: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe(tmp_path, base_model)
    path = tmp_path / "tiny.toml"
    path.write_text(_toml(recipe))
    teacher_calls = _count_calls(monkeypatch, "kdkit.stages.teachers.train_teacher")
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(path)])
    assert first.exit_code == 0, first.output
    student_calls = _count_calls(monkeypatch, "kdkit.training.loop.make_trainer")

    result = runner.invoke(app, ["sweep", str(path), "--set", "plugins.unikd-disagreement.lambda=0,10,20"])
    assert result.exit_code == 0, result.output
    assert sorted(teacher_calls) == [1, 2]  # trained by `run`, reused by the three points
    assert len(student_calls) == 2  # lambda 0 and 20; lambda 10 is the recipe itself, finished by `run`
    root = tmp_path / "runs" / "tiny"
    out = root / "sweep"
    for value in (0, 20):
        resolved = json.loads((out / f"plugins.unikd-disagreement.lambda={value}" / "recipe.resolved.json").read_text())
        assert resolved["plugins"]["unikd-disagreement"]["lambda"] == value
    _assert_png(out / "sweep.png")
    table = (out / "sweep.md").read_text()
    assert [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]] == ["0", "10", "20"]
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["axes"] == {"plugins.unikd-disagreement.lambda": [0, 10, 20]}
    assert doc["rows"][1]["run_dir"] == str(root.resolve())
    assert "lambda=20" in result.output or "20" in result.output


def test_sweep_arguments() -> None:
    assert split_values('0, 1.5,[1,2],"a,b",{x = 1, y = 2}') == ["0", "1.5", "[1,2]", '"a,b"', "{x = 1, y = 2}"]
    axes, fixed = parse_sweep(["plugins.x.lambda=0,5", "seeds=[1,2]", "student.learning_rate=1e-4,2e-4"])
    assert axes == [("plugins.x.lambda", [0, 5]), ("student.learning_rate", [1e-4, 2e-4])]
    assert fixed == {"seeds": [1, 2]}
    with pytest.raises(KdkitError, match="needs at least one --set KEY=V1,V2"):
        parse_sweep(["seeds=[1,2]"])
    with pytest.raises(KdkitError, match="listed twice"):
        parse_sweep(["a=1,1"])
    with pytest.raises(KdkitError, match="empty value"):
        parse_sweep(["a=1,"])


def test_sweep_rejects_a_bad_value_before_running_anything(tmp_path: Path, base_model: Path) -> None:
    recipe = validate_recipe(_recipe(tmp_path, base_model))

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ran a variant although another one is invalid")

    with pytest.raises(KdkitError, match=r"(?s)variant 'lambda=-1'.*plugins\.unikd-disagreement\.lambda: must be greater than or equal to 0"):
        sweep(recipe, [("plugins.unikd-disagreement.lambda", [1, -1])], console=_console(), run=never)


# --------------------------------------------------------------------------- a tiny TOML writer for the CLI test
def _toml(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not (isinstance(v, dict) and k in ("data", "teachers", "student", "plugins") or prefix == "plugins")}
        subtables = {k: v for k, v in node.items() if k not in scalars}
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{json.dumps(k)} = {value(v)}")
        for k, v in subtables.items():
            table(f"{prefix}.{json.dumps(k)}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"

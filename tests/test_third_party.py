"""A third-party plugin installed for real (pip, entry points) is listed, validated and changes the loss; a
broken one is reported while everything else keeps working.

The distributions are installed with ``pip install --target`` into temporary folders (never into .venv) and
made visible with PYTHONPATH (subprocesses) or ``sys.path`` (in process).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdkit import cli
from kdkit.plugin.registry import BLOCK_ENV_VAR, discover_plugins
from kdkit.recipe import load_recipe

EXAMPLE = Path(__file__).parent / "example_plugin"

BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "kdkit-broken-plugin"
version = "0.0.1"

[project.entry-points.kdkit]
broken-weighting = "kdkit_broken_plugin:BrokenWeighting"

[tool.setuptools]
packages = ["kdkit_broken_plugin"]
"""

BROKEN_MODULE = """
import kdkit
import kdkit_dependency_that_is_not_installed  # the bug: a dependency nobody installed


class BrokenWeighting(kdkit.Plugin):
    name = "broken-weighting"
"""


def _pip_install(source: Path, target: Path) -> None:
    """``pip install --no-deps --no-build-isolation --target target`` of a copy of ``source`` (building in the
    copy keeps build/ and *.egg-info out of the repository)."""
    work = target.parent / f"src-{source.name}"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "--quiet", "--target", str(target), str(work),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("example-site") / "site"
    _pip_install(EXAMPLE, target)
    return target


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("broken-site")
    source = root / "kdkit-broken-plugin"
    (source / "kdkit_broken_plugin").mkdir(parents=True)
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "kdkit_broken_plugin" / "__init__.py").write_text(textwrap.dedent(BROKEN_MODULE))
    target = root / "site"
    _pip_install(source, target)
    return target


def kdkit(*args: str, sites: list[Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", BLOCK_ENV_VAR)}
    environment["PYTHONPATH"] = os.pathsep.join(str(s) for s in sites)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kdkit", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def recipe_file(tmp_path: Path, plugins: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(
        textwrap.dedent(
            """
            name = "third-party"
            [data]
            dataset = "some/dataset"
            text = ["sentence"]
            [teachers]
            model = "some/model"
            [student]
            model = "some/model"
            """
        )
        + textwrap.dedent(plugins)
    )
    return path


def test_the_installed_distribution_is_a_real_install(example_site):
    assert (example_site / "kdkit_example_plugin" / "__init__.py").is_file()
    [info] = example_site.glob("kdkit_example_plugin-0.1.0.dist-info")
    assert "confidence-weighting = kdkit_example_plugin:ConfidenceWeighting" in (info / "entry_points.txt").read_text()


def test_kdkit_plugins_lists_it_with_its_distribution(example_site):
    done = kdkit("plugins", "--json", sites=[example_site])
    assert done.returncode == 0, done.stderr
    records = {r["name"]: r for r in json.loads(done.stdout)}
    record = records["confidence-weighting"]
    assert record["status"] == "ok"
    assert record["distribution"] == "kdkit-example-plugin"
    assert record["version"] == "0.1.0"
    assert record["hooks"] == ["kdkit_sample_weights"]
    assert {"average", "unikd-correctness", "unikd-disagreement", "aekd"} <= set(records)


def test_kdkit_validate_accepts_a_recipe_enabling_it(example_site, tmp_path):
    path = recipe_file(
        tmp_path,
        """
        [plugins.unikd-disagreement]
        lambda = 10.0
        [plugins.confidence-weighting]
        power = 2.0
        """,
    )
    done = kdkit("validate", str(path), sites=[example_site])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok: third-party (2 plugins enabled: unikd-disagreement, confidence-weighting)"


# The checks below run the CLI in this process (typer's CliRunner) with the installed folders on sys.path:
# the same discovery as the subprocesses above, without paying for a Python start-up each time.
runner = CliRunner()


@pytest.fixture
def on_path(monkeypatch):
    """Put installed folders on sys.path for this test (and forget any copy of their modules imported before)."""
    monkeypatch.delenv(BLOCK_ENV_VAR, raising=False)

    def add(*sites: Path) -> None:
        for site in sites:
            monkeypatch.syspath_prepend(str(site))
        for name in ("kdkit_example_plugin", "kdkit_broken_plugin"):
            monkeypatch.delitem(sys.modules, name, raising=False)

    return add


def test_its_options_are_checked_by_kdkit_validate(example_site, on_path, tmp_path):
    path = recipe_file(tmp_path, "[plugins.confidence-weighting]\npower = 2.0\n")
    result = runner.invoke(cli.app, ["validate", str(path)])
    assert result.exit_code == 2  # not on the path yet: unknown plugin
    assert "plugins.confidence-weighting: unknown plugin 'confidence-weighting'" in result.stderr

    on_path(example_site)
    assert runner.invoke(cli.app, ["validate", str(path)]).exit_code == 0
    result = runner.invoke(cli.app, ["validate", str(path), "--set", "plugins.confidence-weighting.powr=3"])
    assert result.exit_code == 2
    assert "plugins.confidence-weighting.powr: unknown key 'powr' (did you mean 'power'?)" in result.stderr
    result = runner.invoke(cli.app, ["validate", str(path), "--set", "plugins.confidence-weighting.power=-1"])
    assert result.exit_code == 2
    # the recipe holds 2.0, so `--set power=-1` is read as the float -1.0 (the same setting, the same run)
    assert "plugins.confidence-weighting.power: must be greater than or equal to 0 (got -1.0)" in result.stderr
    assert "Traceback" not in result.output


def test_kdkit_schema_carries_its_options(example_site, on_path):
    on_path(example_site)
    result = runner.invoke(cli.app, ["schema"])
    assert result.exit_code == 0, result.stderr
    options = json.loads(result.stdout)["properties"]["plugins"]["properties"]["confidence-weighting"]
    assert set(options["properties"]) == {"power", "apply_to", "enabled"}
    assert options["properties"]["power"]["minimum"] == 0
    assert options["additionalProperties"] is False


@pytest.fixture
def installed_example(example_site, monkeypatch):
    """The installed example plugin, importable in this process (whatever copy was imported before)."""
    monkeypatch.syspath_prepend(str(example_site))
    monkeypatch.delitem(sys.modules, "kdkit_example_plugin", raising=False)
    return example_site


def test_enabling_it_scales_the_loss_by_its_equation(installed_example, tmp_path):
    record = discover_plugins().records["confidence-weighting"]
    assert record.status == "ok" and record.distribution == "kdkit-example-plugin"
    assert Path(sys.modules[record.cls.__module__].__file__).is_relative_to(installed_example)

    path = recipe_file(
        tmp_path,
        """
        [plugins.confidence-weighting]
        power = 2.0
        apply_to = "all"
        """,
    )
    on = load_recipe(path).distillation_loss()
    off = load_recipe(path, overrides={"plugins.confidence-weighting.enabled": False}).distillation_loss()
    assert [p.name for p in on.plugins] == ["confidence-weighting"] and off.plugins == []

    # Every sample has the same two teachers, P_1 = (1/2, 1/2) and P_2 = (3/4, 1/4): the averaged teachers
    # are (5/8, 3/8), so each sample's weight, and hence the whole loss, is multiplied by (5/8)^2 = 25/64.
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 2, generator=gen, requires_grad=True)
    teachers = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).expand(6, 2, 2)
    labels = torch.tensor([0, 1, 1, -100, -100, -100])
    loss_on, loss_off = on(student, teachers, labels).loss, off(student, teachers, labels).loss
    assert loss_off.item() > 0
    assert loss_on.item() == pytest.approx(25 / 64 * loss_off.item(), rel=1e-6)

    # random teachers, default apply_to = "unlabeled": per sample, s_b = (max_c mean_i P_i[b, c])^2 on unlabeled
    # samples and 1 on labeled ones, against a float64 reference
    default = load_recipe(path, overrides={"plugins.confidence-weighting.apply_to": "unlabeled"}).distillation_loss()
    teachers = torch.randn(6, 3, 2, generator=gen) * 3
    probs = teachers.double().exp() / teachers.double().exp().sum(-1, keepdim=True)
    expected = probs.mean(1).max(-1).values ** 2
    expected[:3] = 1.0
    out_on, out_off = default(student, teachers, labels), off(student, teachers, labels)
    assert torch.allclose(out_on.sample_weights.double(), expected, rtol=1e-6)
    assert torch.allclose(out_on.per_sample.double(), expected * out_off.per_sample.double(), rtol=1e-5)
    assert out_on.loss.item() == pytest.approx((expected * out_off.per_sample.double()).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- a broken distribution
def test_a_broken_plugin_is_reported_and_the_rest_still_works(example_site, broken_site, tmp_path):
    done = kdkit("plugins", "--json", sites=[example_site, broken_site])
    assert done.returncode == 0, done.stderr
    records = {r["name"]: r for r in json.loads(done.stdout)}
    broken = records["broken-weighting"]
    assert broken["status"] == "failed"
    assert broken["distribution"] == "kdkit-broken-plugin"
    assert "kdkit_dependency_that_is_not_installed" in broken["error"]
    for name in ("confidence-weighting", "average", "unikd-correctness", "unikd-disagreement", "aekd"):
        assert records[name]["status"] == "ok", records[name]

    good = recipe_file(tmp_path, "[plugins.confidence-weighting]\n[plugins.unikd-disagreement]\n")
    bad = tmp_path / "bad" / "recipe.toml"
    bad.parent.mkdir()
    bad.write_text(good.read_text() + "[plugins.broken-weighting]\n")
    done = kdkit("validate", str(bad), sites=[example_site, broken_site])
    assert done.returncode == 2
    assert "plugins.broken-weighting: plugin 'broken-weighting' could not be loaded: ModuleNotFoundError" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_with_a_broken_plugin_installed_every_command_still_works(example_site, broken_site, on_path, tmp_path):
    on_path(example_site, broken_site)
    table = runner.invoke(cli.app, ["plugins"])
    assert table.exit_code == 0
    row = next(line for line in table.stdout.splitlines() if "broken-weighting" in line)
    assert "failed" in row and "ModuleNotFoundError" in row
    assert "warning: 1 plugin failed to load: broken-weighting" in table.stderr

    good = recipe_file(tmp_path, "[plugins.confidence-weighting]\n[plugins.unikd-disagreement]\n")
    result = runner.invoke(cli.app, ["validate", str(good)])
    assert result.exit_code == 0, result.stderr

    schema = runner.invoke(cli.app, ["schema"])
    assert schema.exit_code == 0
    plugins = json.loads(schema.stdout)["properties"]["plugins"]["properties"]
    assert "confidence-weighting" in plugins and "broken-weighting" not in plugins
    assert "warning: plugin 'broken-weighting' failed to load" in schema.stderr

    # blocking it (environment) hides the failure; a recipe that still enables it is told why it cannot run
    blocked = runner.invoke(cli.app, ["plugins", "--json"], env={BLOCK_ENV_VAR: "broken-weighting"})
    assert {r["name"]: r["status"] for r in json.loads(blocked.stdout)}["broken-weighting"] == "blocked"
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text() + "[plugins.broken-weighting]\n")
    result = runner.invoke(cli.app, ["validate", str(bad)], env={BLOCK_ENV_VAR: "broken-weighting"})
    assert result.exit_code == 2 and "plugin 'broken-weighting' is blocked" in result.stderr


# --------------------------------------------------------------------------- CONTRIBUTING.md walks through this plugin
CONTRIBUTING = Path(__file__).resolve().parent.parent / "CONTRIBUTING.md"
FILE_BLOCK = re.compile(r"\*\*`([^`]+)`\*\*\n\n```\w*\n(.*?)```\n", re.DOTALL)
CODE_BLOCK = re.compile(r"```(\w+)\n(.*?)```\n", re.DOTALL)


def test_contributing_shows_the_example_plugin_files_verbatim():
    shown = dict(FILE_BLOCK.findall(CONTRIBUTING.read_text()))
    assert set(shown) >= {
        "pyproject.toml",
        "kdkit_example_plugin/__init__.py",
        "tests/test_confidence_weighting.py",
    }
    for relative, text in shown.items():
        assert text == (EXAMPLE / relative).read_text(), f"CONTRIBUTING.md and tests/example_plugin/{relative} differ"


def test_contributing_snippets_run(installed_example, tmp_path):
    text = CONTRIBUTING.read_text()
    blocks = CODE_BLOCK.findall(text)
    python = [code for lang, code in blocks if lang == "python"]
    toml = [code for lang, code in blocks if lang == "toml"]
    assert len(python) >= 3 and len(toml) >= 2
    for code in python:
        compile(code, "CONTRIBUTING.md", "exec")
    for code in toml:
        tomllib.loads(code)
    # the recipe snippet enables the installed plugin; the library snippet builds a loss with it
    [snippet] = [code for code in toml if code.startswith("[plugins.confidence-weighting]")]
    recipe = load_recipe(recipe_file(tmp_path, snippet))
    assert recipe.enabled_plugins() == {"confidence-weighting": {"power": 2.0, "apply_to": "unlabeled"}}
    [library] = [code for code in python if "DistillationLoss.from_plugins" in code]
    namespace: dict = {}
    exec(library, namespace)
    assert sorted(p.name for p in namespace["loss_fn"].plugins) == ["confidence-weighting", "unikd-correctness"]

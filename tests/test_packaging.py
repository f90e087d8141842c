"""Packaging: the wheel (what `pip install .` installs) carries kdkit, the built-in plugins and their entry points,
and nothing else at the top level; the editable install of the development venv registers the same plugins."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kdkit
from kdkit.plugin.registry import BLOCK_ENV_VAR, discover_plugins

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {
    "average": "kdkit_plugins.average:AveragePlugin",
    "unikd-correctness": "kdkit_plugins.unikd:CorrectnessPlugin",
    "unikd-disagreement": "kdkit_plugins.unikd:DisagreementPlugin",
    "aekd": "kdkit_plugins.aekd:AEKDPlugin",
}
DIST_INFO = f"kdkit-{kdkit.__version__}.dist-info"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` of a copy of the project (building in the copy keeps build/ and *.egg-info out of the
    repository, where they would shadow the editable install's metadata)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "kdkit-src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    for folder in ("kdkit", "plugins"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    out = tmp / "dist"
    command = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--disable-pip-version-check", "--quiet", "-w", str(out), str(source),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = out.glob("kdkit-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _read(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode()


def test_the_wheel_carries_kdkit_and_every_builtin_plugin_module(wheel):
    names = set(_names(wheel))
    for module in (ROOT / "kdkit").glob("*.py"):
        assert f"kdkit/{module.name}" in names
    assert "kdkit/py.typed" in names
    plugin_modules = sorted(p.name for p in (ROOT / "plugins").glob("*.py"))
    assert {"__init__.py", "average.py", "unikd.py", "aekd.py"} <= set(plugin_modules)
    for module in plugin_modules:
        assert f"kdkit_plugins/{module}" in names
    assert not any(name.startswith("plugins/") for name in names)  # installed under its kdkit_ name only


def test_the_wheel_carries_the_data_converters(wheel):
    names = set(_names(wheel))
    modules = sorted((ROOT / "kdkit" / "sources").glob("*.py"))
    assert {"__init__.py", "common.py", "polarity.py"} <= {m.name for m in modules}
    for module in modules:
        assert f"kdkit/sources/{module.name}" in names


def test_the_wheel_has_no_top_level_name_but_kdkit_ones(wheel):
    tops = {name.split("/", 1)[0] for name in _names(wheel)}
    assert tops == {"kdkit", "kdkit_plugins", DIST_INFO}
    top_level = f"{DIST_INFO}/top_level.txt"
    if top_level in _names(wheel):
        assert set(_read(wheel, top_level).split()) == {"kdkit", "kdkit_plugins"}


def test_the_wheel_declares_the_builtins_and_the_console_script(wheel):
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # keep names as written
    parser.read_string(_read(wheel, f"{DIST_INFO}/entry_points.txt"))
    assert dict(parser["kdkit"]) == BUILTINS
    assert dict(parser["console_scripts"]) == {"kdkit": "kdkit.cli:main"}
    names = set(_names(wheel))
    for target in BUILTINS.values():
        module, cls = target.split(":")
        path = module.replace(".", "/") + ".py"
        assert path in names
        assert f"class {cls}(" in _read(wheel, path)


def test_a_regular_install_of_the_wheel_registers_the_builtins(wheel, tmp_path):
    target = tmp_path / "site"
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
        "--quiet", "--target", str(target), str(wheel),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    probe = (
        "import json, sys, kdkit\n"
        "from kdkit.plugin.registry import discover_plugins\n"
        "records = discover_plugins().records\n"
        "print(json.dumps({'kdkit': kdkit.__file__, 'plugins': {n: [r.status, r.distribution, r.error,"
        " sys.modules[r.cls.__module__].__file__ if r.cls else ''] for n, r in records.items()}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != BLOCK_ENV_VAR}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["kdkit"]).is_relative_to(target)
    for name in BUILTINS:
        status, distribution, error, module_file = found["plugins"][name]
        assert (status, distribution) == ("ok", "kdkit"), error
        assert Path(module_file).is_relative_to(target / "kdkit_plugins")


def test_the_editable_install_registers_the_builtins_from_the_source_tree():
    records = discover_plugins().records
    for name, target in BUILTINS.items():
        record = records[name]
        assert (record.status, record.distribution, record.entry_point) == ("ok", "kdkit", target), record.error
        module_file = Path(sys.modules[record.cls.__module__].__file__).resolve()
        assert module_file.parent == ROOT / "plugins"

"""The ``kdkit`` command line: results on stdout, diagnostics on stderr, user errors exit 2 without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

import kdkit
from kdkit import cli
from kdkit.errors import DataError
from kdkit.plugin.registry import BLOCK_ENV_VAR

runner = CliRunner()

BASE = """
name = "demo"

[data]
dataset = "some/dataset"
text = ["sentence"]

[teachers]
model = "some/model"
seeds = [1, 2, 3]

[student]
model = "some/model"
"""


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def invoke(*args: str, env: dict[str, str | None] | None = None):
    result = runner.invoke(cli.app, list(args), env={BLOCK_ENV_VAR: None, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


class ScaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(2.0, gt=0)


class Scale(kdkit.Plugin):
    """Multiplies every kd weight by `factor`."""

    name = "cli-scale"
    version = "1.2"
    Options = ScaleOptions

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return torch.full((batch.size,), self.options.factor)


@pytest.fixture
def scale_installed(fake_distribution):
    fake_distribution("cli-scale-dist", {"cli-scale": f"{__name__}:Scale"})


# --------------------------------------------------------------------------- validate
def test_validate_ok_goes_to_stdout(tmp_path):
    path = write(tmp_path, BASE + "[plugins.unikd-correctness]\n[plugins.unikd-disagreement]\nlambda = 15\n")
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "ok: demo (2 plugins enabled: unikd-correctness, unikd-disagreement)\n"
    assert result.stderr == ""


def test_validate_counts_switched_off_plugins_out(tmp_path):
    path = write(tmp_path, BASE + "[plugins.unikd-disagreement]\nenabled = false\nlambda = 15\n")
    assert invoke("validate", str(path)).stdout == "ok: demo (0 plugins enabled)\n"
    one = invoke("validate", str(path), "--set", "plugins.unikd-disagreement.enabled=true")
    assert one.stdout == "ok: demo (1 plugin enabled: unikd-disagreement)\n"


def test_validate_with_a_plugin_from_another_distribution(tmp_path, scale_installed):
    path = write(tmp_path, BASE + "[plugins.cli-scale]\nfactor = 3\n")
    assert invoke("validate", str(path)).stdout == "ok: demo (1 plugin enabled: cli-scale)\n"
    result = invoke("validate", str(path), "--set", "plugins.cli-scale.factr=3")
    assert result.exit_code == 2
    assert "plugins.cli-scale.factr: unknown key 'factr' (did you mean 'factor'?)" in result.stderr


BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"

# (id, recipe text or bytes, expected pieces of the message)
RECIPE_ERRORS = [
    # BASE starts with an empty line: its 13 lines end with `model = ...` of [student]
    ("toml-syntax", BASE + "[distill\non = ['labeled']\n", ["TOML syntax error at line 14, column 9", "14 | [distill"]),
    ("toml-duplicate-key", "name = 'first'" + BASE, ["TOML syntax error at line 2", "Cannot overwrite a value", 'name = "demo"']),
    ("empty", "", ["file is empty"]),
    ("blank", "\n   \n\t\n", ["file is empty"]),
    ("binary", BINARY, ["binary file"]),
    ("not-utf8", b"name = '\xff\xfe'\n", ["not UTF-8", "binary file"]),
    ("wrong-type-int", BASE + "[distill]\ntemperature = 'hot'\n", ["distill.temperature: must be a number (got 'hot')"]),
    ("wrong-type-array", BASE.replace("seeds = [1, 2, 3]", "seeds = 3"), ["teachers.seeds: must be an array (got 3)"]),
    ("wrong-type-table", "name = 'x'\ndata = 'csv'\n[teachers]\nmodel='m'\n[student]\nmodel='m'\n", ["data: must be a table"]),
    ("wrong-type-model", BASE.replace('model = "some/model"\nseeds', "model = 5\nseeds"), ["teachers.model: must be a string or a table (got 5)"]),
    ("missing-table", BASE.split("[student]")[0], ["student: required key is missing"]),
    ("unknown-key-top", "sedes = [1]\n" + BASE, ["sedes: unknown key 'sedes' (did you mean 'seeds'?)"]),
    ("unknown-key-nested", BASE + "lerning_rate = 1e-5\n", ["student.lerning_rate: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"]),
    ("unknown-key-deeper", BASE.replace('model = "some/model"\nseeds', 'model = {pakage = "p"}\nseeds'), ["teachers.model.pakage: unknown key 'pakage' (did you mean 'package'?)", "teachers.model.package: required key is missing"]),
    ("unknown-plugin", BASE + "[plugins.unikd-corectness]\n", ["plugins.unikd-corectness: unknown plugin 'unikd-corectness' (did you mean 'unikd-correctness'?); installed plugins: aekd, average, unikd-correctness, unikd-disagreement"]),
    ("unknown-plugin-option", BASE + "[plugins.unikd-disagreement]\nlamda = 3\n", ["plugins.unikd-disagreement.lamda: unknown key 'lamda' (did you mean 'lambda'?)"]),
    ("negative-lambda", BASE + "[plugins.unikd-disagreement]\nlambda = -1.0\n", ["plugins.unikd-disagreement.lambda: must be greater than or equal to 0 (got -1.0)"]),
    ("aekd-C-zero", BASE + "[plugins.aekd]\nC = 0\n", ["plugins.aekd.C: must be greater than 0 (got 0)"]),
    ("aekd-C-negative-while-off", BASE + "[plugins.aekd]\nenabled = false\nC = -0.5\n", ["plugins.aekd.C: must be greater than 0 (got -0.5)"]),
    ("teacher-weighting", BASE + "[plugins.unikd-correctness]\nteacher_weighting = 'inverse_loss'\n", ["plugins.unikd-correctness.teacher_weighting: must be one of 'inverse-loss', 'softmax-neg-loss', 'as-printed' (got 'inverse_loss') (did you mean 'inverse-loss'?)"]),
    ("enabled-not-bool", BASE + "[plugins.aekd]\nenabled = 'no'\n", ["plugins.aekd.enabled: must be true or false (got 'no')"]),
    ("ensembling-conflict", BASE + "[plugins.unikd-correctness]\n[plugins.aekd]\n", ["plugins: ensembling conflict: plugins 'unikd-correctness' and 'aekd' both set teacher weights for labeled samples"]),
    ("one-teacher-disagreement", BASE.replace("seeds = [1, 2, 3]", "seeds = [1]") + "[plugins.unikd-disagreement]\n", ["plugins: with 1 teacher: unikd-disagreement needs at least 2 teachers"]),
    ("distill-on-empty", BASE + "[distill]\non = []\n", ["distill.on: `on` is empty"]),
    ("distill-on-unknown", BASE + "[distill]\non = ['unlabled']\n", ["distill.on: unknown stream 'unlabled' (did you mean 'unlabeled'?)"]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in RECIPE_ERRORS], ids=[c[0] for c in RECIPE_ERRORS])
def test_recipe_errors_exit_2_naming_the_place(tmp_path, text, expected):
    path = tmp_path / "recipe.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for command in (["validate"], ["run"]):
        result = invoke(*command, str(path))
        assert result.exit_code == 2, (result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith(f"error: {path}")
        for piece in expected:
            assert piece in result.stderr
        assert "Traceback" not in result.output


def test_missing_file_and_directory(tmp_path):
    result = invoke("validate", str(tmp_path / "nowhere.toml"))
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'nowhere.toml'}: file not found\n"
    result = invoke("validate", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.stderr


def test_every_problem_is_reported_at_once(tmp_path):
    text = BASE.replace("[student]", "[student]\nbatch_size = 0") + "[plugins.aekd]\nC = -1\n[plugins.avrage]\n"
    result = invoke("validate", str(write(tmp_path, "nmae = 'x'\n" + text)))
    assert result.exit_code == 2
    assert "4 problems" in result.stderr
    for path in ("nmae:", "student.batch_size:", "plugins.aekd.C:", "plugins.avrage:"):
        assert f"\n  {path}" in result.stderr


# --------------------------------------------------------------------------- --set
@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("student.learning_rate=1e-5", 1e-5),
        ("student.gradient_checkpointing=true", True),
        ('student.model="a b"', "a b"),
        ("student.model=bert-base-uncased", "bert-base-uncased"),
        ("student.report_to=['none']", ["none"]),
        ("seeds=[4, 5]", [4, 5]),
        ("student.model = spaced ", "spaced"),
    ],
)
def test_set_values_are_read_as_toml(monkeypatch, tmp_path, expression, expected):
    seen = {}
    real = cli.load_recipe

    def spy(path, overrides=None, **kwargs):
        seen.update(overrides)
        return real(path, overrides=overrides, **kwargs)

    monkeypatch.setattr(cli, "load_recipe", spy)
    result = invoke("validate", str(write(tmp_path, BASE)), "--set", expression)
    assert result.exit_code == 0, result.stderr
    [(key, value)] = seen.items()
    assert value == expected and type(value) is type(expected)


def test_set_changes_what_is_validated(tmp_path):
    path = write(tmp_path, BASE + "[plugins.unikd-disagreement]\n")
    result = invoke("validate", str(path), "--set", "plugins.unikd-disagreement.lambda=-2")
    assert result.exit_code == 2 and "plugins.unikd-disagreement.lambda: must be greater than or equal to 0" in result.stderr
    # the last --set of a key wins
    result = invoke("validate", str(path), "-s", "plugins.unikd-disagreement.lambda=-2", "--set", "plugins.unikd-disagreement.lambda=15")
    assert result.exit_code == 0, result.stderr
    result = invoke("validate", str(path), "--set", "student.lerning_rate=1e-5")
    assert result.exit_code == 2 and "student.lerning_rate: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in result.stderr


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("student.learning_rate", "student.learning_rate: expected KEY=VALUE, got 'student.learning_rate'"),
        ("=3", "no key before '='"),
        ("student..model=x", "empty part in the dotted key"),
        ("name.first=x", "name: is a value ('demo'), not a table"),
    ],
)
def test_malformed_set_is_a_user_error(tmp_path, expression, message):
    result = invoke("validate", str(write(tmp_path, BASE)), "--set", expression)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --set")
    assert message in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- run
@pytest.fixture
def fake_pipeline(monkeypatch):
    """Stands in for kdkit.stages.run (its own tests run it for real): records what the CLI hands over."""
    calls = []

    def run_recipe(recipe, *, recipe_path, console, print_table):
        calls.append({"recipe": recipe, "recipe_path": recipe_path, "console": console, "print_table": print_table})
        console.print("training ...")
        if recipe.name == "broken-data":
            raise DataError("data.files.train: column 'sentence' not found; columns: text, label")
        return {"name": recipe.name, "student": {"accuracy": 0.5}, "path": Path("runs") / recipe.name}

    module = types.ModuleType("kdkit.stages.run")
    module.run_recipe = run_recipe
    monkeypatch.setitem(sys.modules, "kdkit.stages.run", module)
    return calls


def test_the_fake_pipeline_has_the_real_signature():
    import inspect

    from kdkit.stages.run import run_recipe

    inspect.signature(run_recipe).bind(object(), recipe_path=Path("r.toml"), console=object(), print_table=False)


def test_run_hands_the_validated_recipe_to_the_pipeline(tmp_path, fake_pipeline):
    path = write(tmp_path, BASE + "[plugins.unikd-disagreement]\n")
    result = invoke("run", str(path), "--set", "plugins.unikd-disagreement.lambda=15", "--json")
    assert result.exit_code == 0, result.stderr
    [call] = fake_pipeline
    assert call["recipe_path"] == path
    assert call["recipe"].plugins["unikd-disagreement"] == {"lambda": 15}
    assert call["console"].stderr is True
    assert call["print_table"] is False  # stdout carries the JSON document alone
    assert json.loads(result.stdout) == {"name": "demo", "student": {"accuracy": 0.5}, "path": "runs/demo"}
    assert "training ..." in result.stderr


def test_run_without_json_leaves_stdout_to_the_pipeline_table(tmp_path, fake_pipeline):
    result = invoke("run", str(write(tmp_path, BASE)))
    assert result.exit_code == 0 and result.stdout == ""
    assert fake_pipeline[0]["print_table"] is True  # the pipeline's own results table goes to stdout


def test_run_reports_a_pipeline_user_error_without_traceback(tmp_path, fake_pipeline):
    result = invoke("run", str(write(tmp_path, BASE.replace('"demo"', '"broken-data"'))))
    assert result.exit_code == 2
    assert "error: data.files.train: column 'sentence' not found" in result.stderr
    assert "Traceback" not in result.output


def test_run_never_reaches_the_pipeline_with_a_bad_recipe(tmp_path, fake_pipeline):
    result = invoke("run", str(write(tmp_path, BASE + "[plugins.nope]\n")))
    assert result.exit_code == 2 and fake_pipeline == []


# --------------------------------------------------------------------------- plugins and schema
def test_plugins_json_lists_the_builtins(scale_installed):
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    records = {r["name"]: r for r in json.loads(result.stdout)}
    for name in ("average", "unikd-correctness", "unikd-disagreement", "aekd"):
        assert records[name]["status"] == "ok" and records[name]["distribution"] == "kdkit"
    assert records["cli-scale"] == {
        "name": "cli-scale",
        "version": "1.2",
        "status": "ok",
        "hooks": ["kdkit_kd_weights"],
        "streams": "",
        "distribution": "cli-scale-dist",
        "entry_point": f"{__name__}:Scale",
        "error": "",
    }


def test_plugins_table_shows_a_broken_and_a_blocked_plugin(fake_distribution):
    fake_distribution(
        "mixed-dist",
        {"cli-broken": "kdkit_t_cli_broken:X", "cli-scale": f"{__name__}:Scale"},
        {"kdkit_t_cli_broken": "raise ImportError('needs libfoo')\n"},
    )
    result = invoke("plugins", env={BLOCK_ENV_VAR: "cli-scale"})
    assert result.exit_code == 0
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "failed" in rows["cli-broken"] and "ImportError: needs libfoo" in rows["cli-broken"]
    assert "blocked by $KDKIT_BLOCK_PLUGINS" in rows["cli-scale"] and "mixed-dist" in rows["cli-scale"]
    assert "ok" in rows["average"] and "teacher_weights" in rows["average"]
    assert "warning: 1 plugin failed to load: cli-broken" in result.stderr


def test_schema_holds_every_installed_plugin_and_skips_a_broken_one(fake_distribution, scale_installed):
    fake_distribution("broken-dist", {"cli-broken": "kdkit_t_cli_broken2:X"}, {"kdkit_t_cli_broken2": "1/0\n"})
    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    plugins = schema["properties"]["plugins"]
    assert plugins["additionalProperties"] is False
    assert set(plugins["properties"]) >= {"average", "unikd-correctness", "unikd-disagreement", "aekd", "cli-scale"}
    assert "cli-broken" not in plugins["properties"]
    scale = plugins["properties"]["cli-scale"]
    assert scale["properties"]["factor"]["exclusiveMinimum"] == 0
    assert scale["properties"]["enabled"] == {
        "type": "boolean",
        "default": True,
        "description": "false switches the plugin off and keeps its options",
    }
    assert plugins["properties"]["unikd-disagreement"]["properties"]["lambda"]["minimum"] == 0
    assert set(schema["required"]) == {"name", "data", "teachers", "student"}
    assert "warning: plugin 'cli-broken' failed to load and is left out of the schema: ZeroDivisionError" in result.stderr


# --------------------------------------------------------------------------- the program itself
def test_main_turns_a_user_error_into_exit_2(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise kdkit.PluginError("plugin 'x' is broken")

    monkeypatch.setattr(cli, "discover_plugins", boom)
    with pytest.raises(SystemExit) as info:
        cli.main(["plugins"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: plugin 'x' is broken\n" and captured.out == ""
    assert cli.app.pretty_exceptions_show_locals is False


def test_the_console_script_and_python_m(tmp_path):
    script = Path(sys.executable).parent / "kdkit"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", BLOCK_ENV_VAR)}
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stdout) == (0, f"kdkit {kdkit.__version__}\n")

    path = write(tmp_path, BASE + "[plugins.unikd-correctness]\nteacher_weighting = 'as_printed'\n")
    done = subprocess.run(
        [sys.executable, "-m", "kdkit", "validate", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {path}: 1 problem\n  plugins.unikd-correctness.teacher_weighting:")
    assert "(did you mean 'as-printed'?)" in done.stderr
    assert "Traceback" not in done.stderr
    assert "\x1b[" not in done.stderr  # plain text when stderr is not a terminal

    done = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "validate" in done.stdout + done.stderr  # no command: help, usage exit code

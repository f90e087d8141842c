"""Security (issue 6): recipes never import or execute code; ``trust_remote_code`` is off unless a recipe turns it
on, with a warning; kdkit's own weights and caches are safetensors and JSON, never pickles, and nothing in kdkit
calls ``torch.load`` without ``weights_only=True``; a broken third-party plugin cannot stop kdkit from starting.

The broken plugin is covered for ``kdkit plugins`` / ``validate`` / ``schema`` by tests/test_third_party.py (a real
pip-installed distribution); here ``kdkit run`` completes with one installed.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers_models import make_bert, quick_recipe
from helpers_reliability import one_thread, write_recipe
from kdkit import cli
from kdkit.plugin.registry import BLOCK_ENV_VAR
from kdkit.modeling import resolve_model_ref
from kdkit.recipe import PackageModel, validate_recipe

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "kdkit").rglob("*.py")) + sorted((REPO / "plugins").rglob("*.py"))
LABELS = ["negative", "positive"]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def invoke(*args: str) -> Any:
    result = runner.invoke(cli.app, list(args), env={BLOCK_ENV_VAR: None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --------------------------------------------------------------------------- the source, read as code
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(_dotted(node.func), node) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> Any:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_the_sources_are_found() -> None:
    names = {p.name for p in SOURCES}
    # the modules that load recipes, teachers' outputs, students and teachers, and a built-in plugin (named by
    # their files since the house reshape: recipe.py -> recipe/load.py, cache.py -> tasks/logit_cache.py, ...)
    assert {"load.py", "logit_cache.py", "students.py", "teachers.py", "unikd.py"} <= names


def test_no_pickle_and_no_torch_load_without_weights_only() -> None:
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and [a.name for a in node.names] != ["UnpicklingError"]:
                modules = [node.module or ""]  # importing the exception type alone is fine
            for module in modules:
                if module.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}:
                    problems.append(f"{path.name}:{node.lineno}: imports {module}")
        for name, call in _calls(path):
            where = f"{path.name}:{call.lineno}: {name}"
            if name.endswith("torch.load") and _keyword(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if name.endswith("torch.save"):
                problems.append(f"{where} (a pickle; kdkit writes safetensors and JSON)")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy"):
                if _keyword(call, "allow_pickle") not in (None, False):
                    problems.append(f"{where} with allow_pickle")
    assert problems == []


def test_recipes_cannot_reach_code_execution() -> None:
    """kdkit never evaluates a string as code or imports a module by a name it read."""
    forbidden = {
        "eval", "exec", "compile", "__import__", "importlib.import_module", "import_module", "runpy.run_module",
        "runpy.run_path", "pydoc.locate", "yaml.load", "yaml.unsafe_load", "getattr_static",
    }
    found = [f"{p.name}:{call.lineno}: {name}" for p in SOURCES for name, call in _calls(p) if name in forbidden]
    assert found == []


def test_every_model_load_passes_trust_remote_code_explicitly() -> None:
    loads = []
    for path in SOURCES:
        source = path.read_text(encoding="utf-8")
        for name, call in _calls(path):
            if name.endswith(".from_pretrained") and not name.startswith("cls"):
                explicit = _keyword(call, "trust_remote_code") is not None
                # AutoModel...from_pretrained(resolved, **kwargs) with kwargs = {"trust_remote_code": ...}
                spread = any(k.arg is None for k in call.keywords) and '{"trust_remote_code": trust_remote_code}' in source
                loads.append((f"{path.name}:{call.lineno}", explicit or spread))
    assert len(loads) >= 3 and all(ok for _, ok in loads), loads


def test_trust_remote_code_is_off_by_default() -> None:
    recipe = validate_recipe(
        {"name": "x", "data": {"dataset": "d", "text": ["s"]}, "teachers": {"model": "m"}, "student": {"model": "m"}}
    )
    assert recipe.teachers.trust_remote_code is False and recipe.student.trust_remote_code is False


# --------------------------------------------------------------------------- recipes naming code
@pytest.fixture
def payload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package on sys.path whose import leaves a marker file; returns the marker's path."""
    marker = tmp_path / "IMPORTED"
    package = tmp_path / "site" / "kdkit_t_payload"
    (package / "sub" / "model").mkdir(parents=True)
    (package / "__init__.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    (package / "sub" / "__init__.py").write_text((package / "__init__.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    import sys

    for name in [m for m in sys.modules if m.startswith("kdkit_t_payload")]:
        del sys.modules[name]


def test_recipe_values_that_name_code_are_never_imported(tmp_path: Path, payload: Path) -> None:
    base = """name = "x"\n[data]\ndataset = "d"\ntext = ["s"]\n[teachers]\nmodel = "m"\n[student]\nmodel = "m"\n"""
    attempts = {
        "plugin by module path": base + '[plugins."kdkit_t_payload:Plugin"]\n',
        "plugin by module name": base + "[plugins.kdkit_t_payload]\n",
        "a _target_ key": base + '[distill]\n_target_ = "kdkit_t_payload.run"\n',
    }
    for what, text in attempts.items():
        path = tmp_path / "recipe.toml"
        path.write_text(text)
        result = invoke("validate", str(path))
        assert result.exit_code == 2, what
        assert "Traceback" not in result.output
    assert not payload.exists()

    # a model shipped inside a package is found without importing the package (nor a parent of a subpackage)
    assert resolve_model_ref(PackageModel(package="kdkit_t_payload.sub", path="model")).endswith(
        "kdkit_t_payload/sub/model"
    )
    assert resolve_model_ref(PackageModel(package="kdkit_t_payload", path="sub/model")).endswith("sub/model")
    assert not payload.exists()


# --------------------------------------------------------------------------- trust_remote_code end to end
def _remote_code_checkpoint(directory: Path, marker: Path) -> Path:
    """A classifier checkpoint whose config names its own Python classes (``auto_map``): loading it needs their
    code, which leaves ``marker`` when it runs."""
    make_bert(directory, layers=1, seed=5, num_labels=2, label_names=LABELS)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="kdkit-remote-bert",
        architectures=["RemoteModel"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForSequenceClassification": "modeling_remote.RemoteModel",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_remote.py").write_text(
        "from pathlib import Path\n\nfrom transformers import BertConfig\n\n"
        f"Path({str(marker)!r}).write_text('the checkpoint code ran')\n\n\n"
        "class RemoteConfig(BertConfig):\n    model_type = 'kdkit-remote-bert'\n"
    )
    (directory / "modeling_remote.py").write_text(
        "from transformers import BertForSequenceClassification\n\nfrom .configuration_remote import RemoteConfig\n\n\n"
        "class RemoteModel(BertForSequenceClassification):\n    config_class = RemoteConfig\n"
    )
    return directory


def test_remote_code_runs_only_when_the_recipe_turns_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_distribution: Any
) -> None:
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # not the user's cache
    marker = tmp_path / "REMOTE-CODE-RAN"
    base = make_bert(tmp_path / "base", layers=1, seed=0)
    remote = _remote_code_checkpoint(tmp_path / "remote", marker)
    plain = make_bert(tmp_path / "plain", layers=1, seed=6, num_labels=2, label_names=LABELS)
    data = quick_recipe(tmp_path, base, **{"student.max_steps": 2})
    data["teachers"] = {"checkpoints": [str(remote), str(plain)]}
    path = write_recipe(tmp_path / "recipe.toml", data)

    refused = invoke("run", str(path))
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    message = refused.stderr[refused.stderr.index("error: ") :]
    assert f"teacher 1 ({remote}): '{remote}' needs its own Python code to load" in message
    assert "set trust_remote_code = true in [teachers] or [student], and only for code you trust" in message
    assert not marker.exists()
    assert not (tmp_path / "runs" / "tiny" / "results.json").exists()

    # on in the recipe: a warning, then the checkpoint's code runs (here with a broken plugin installed too)
    fake_distribution("kdkit-t-broken", {"t-broken": "kdkit_t_broken_mod:X"}, {"kdkit_t_broken_mod": "1 / 0\n"})
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        allowed = invoke("run", str(path), "--set", "teachers.trust_remote_code=true")
    assert allowed.exit_code == 0, allowed.stderr[-3000:]
    assert "warning: teachers.trust_remote_code is on: model code will run" in allowed.stderr
    assert marker.read_text() == "the checkpoint code ran"
    assert (tmp_path / "runs" / "tiny" / "results.json").is_file()


# --------------------------------------------------------------------------- what kdkit reads
def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    base = make_bert(tmp_path / "base", layers=1, seed=0)
    good = make_bert(tmp_path / "good", layers=1, seed=1, num_labels=2, label_names=LABELS)
    evil = make_bert(tmp_path / "evil", layers=1, seed=2, num_labels=2, label_names=LABELS)
    (evil / "model.safetensors").unlink()
    torch.save({"classifier.bias": Payload()}, evil / "pytorch_model.bin")  # an old-style checkpoint, poisoned
    data = quick_recipe(tmp_path, base, **{"student.max_steps": 2})
    data["teachers"] = {"checkpoints": [str(good), str(evil)]}
    result = invoke("run", str(write_recipe(tmp_path / "recipe.toml", data)))
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.stderr[result.stderr.index("error: ") :]
    assert f"teacher 2 ({evil}): the weights of '{evil}' are a pickle holding more than tensors" in message
    assert "GLOBAL exec was not an allowed global" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- what kdkit writes
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}


def _is_pickle_or_torch_zip(path: Path) -> bool:
    head = path.read_bytes()[:4]
    return head[:1] == b"\x80" or head == b"PK\x03\x04"  # pickle protocol 2+ / torch.save's zip format


def test_everything_kdkit_writes_is_safetensors_or_text(tmp_path: Path) -> None:
    base = make_bert(tmp_path / "base", layers=1, seed=0)
    data = quick_recipe(
        tmp_path, base, **{"teachers.max_steps": 2, "student.max_steps": 4, "student.save_steps": 2}
    )
    result = invoke("run", str(write_recipe(tmp_path / "recipe.toml", data)))
    assert result.exit_code == 0, result.stderr[-3000:]
    written = [p for root in (tmp_path / "cache", tmp_path / "runs") for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written) and any(p.name == "done.json" for p in written)
    offenders = [str(p) for p in written if p.suffix in PICKLE_SUFFIXES or _is_pickle_or_torch_zip(p)]
    assert offenders == []
    for p in written:
        if p.suffix == ".json" or p.name == ".complete":
            json.loads(p.read_text(encoding="utf-8"))

"""Runs you can trust (issue 11): reuse is exact, labels are a contract, everything that would fail late fails in
``kdkit validate``, a failed run loses nothing, degenerate results are flagged, and the messages name the place.

The tiny pipeline runs in this process with two given teacher checkpoints (no teacher training).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from helpers_models import base_and_two_teachers, quick_recipe, sentences, write_jsonl
from helpers_reliability import one_thread, run_kdkit, write_recipe
from kdkit import cli
from kdkit.errors import DataError
from kdkit.plugin.registry import BLOCK_ENV_VAR

LABELS = ["negative", "positive"]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return base_and_two_teachers(tmp_path_factory.mktemp("models"), LABELS)


def recipe(tmp_path: Path, models: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    data = quick_recipe(tmp_path, models["base"], **{"student.max_steps": 3, **overrides})
    if "teachers" not in {k.split(".")[0] for k in overrides}:
        data["teachers"] = {"checkpoints": [str(models["t1"]), str(models["t2"])]}
    return data


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Any:
    result = runner.invoke(cli.app, list(args), env={BLOCK_ENV_VAR: None, **(env or {})})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run(tmp_path: Path, data: dict[str, Any], *extra: str) -> Any:
    return invoke("run", str(write_recipe(tmp_path / "recipe.toml", data)), "--json", *extra)


def validate(tmp_path: Path, data: dict[str, Any], *extra: str) -> Any:
    return invoke("validate", str(write_recipe(tmp_path / "recipe.toml", data)), *extra)


def user_error(result: Any, *pieces: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:])
    assert "Traceback" not in result.output
    message = result.stderr[result.stderr.index("error: ") :]
    for piece in pieces:
        assert piece in message, (piece, message)
    return message


def student_trainings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the output folder of every student trained from here on."""
    import kdkit.training.loop

    real = kdkit.training.loop.make_trainer
    made: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        trainer = real(*args, **kwargs)
        made.append(Path(trainer.args.output_dir).name)
        return trainer

    monkeypatch.setattr(kdkit.training.loop, "make_trainer", recording)
    return made


# --------------------------------------------------------------------------- 1. reuse is exact
PLUGIN_SOURCE = '''
import kdkit


class Halving(kdkit.Plugin):
    name = "halving"
    version = "1.0"

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return batch.uniform_weights[:, 0] * 0 + FACTOR


FACTOR = 0.5
'''


def test_a_changed_plugin_retrains_the_student(tmp_path: Path, models, fake_distribution, monkeypatch) -> None:
    site = fake_distribution("kdkit-halving", {"halving": "kdkit_halving:Halving"}, {"kdkit_halving": PLUGIN_SOURCE})
    data = recipe(tmp_path, models, plugins={"halving": {}})
    made = student_trainings(monkeypatch)
    first = run(tmp_path, data)
    assert first.exit_code == 0, first.output[-3000:]
    results = json.loads(first.stdout)
    assert results["plugins"]["halving"]["distribution"] == "kdkit-halving"
    assert results["plugins"]["halving"]["version"] == "1.0" and len(results["plugins"]["halving"]["code"]) == 16
    assert results["kdkit_version"]
    assert len(made) == 1
    # the same code again: the finished student is reused
    assert run(tmp_path, data).exit_code == 0 and len(made) == 1
    # the author changes the code (not even the version): the student is trained again, with the new code
    module = site / "kdkit_halving.py"
    module.write_text(module.read_text().replace("FACTOR = 0.5", "FACTOR = 0.25"))
    sys.modules.pop("kdkit_halving", None)
    third = run(tmp_path, data)
    assert third.exit_code == 0 and len(made) == 2
    changed = json.loads(third.stdout)
    assert changed["plugins"]["halving"]["code"] != results["plugins"]["halving"]["code"]
    assert changed["student"]["runs"][0]["directory"] != results["student"]["runs"][0]["directory"]


def test_fresh_retrains_the_students_and_nothing_else(tmp_path: Path, models, monkeypatch) -> None:
    data = recipe(tmp_path, models, **{"student.label_only_baseline": True})
    assert run(tmp_path, data).exit_code == 0
    made = student_trainings(monkeypatch)
    again = run(tmp_path, data)
    assert again.exit_code == 0 and made == []  # reused
    fresh = run(tmp_path, data, "--fresh")
    assert fresh.exit_code == 0, fresh.output[-3000:]
    results = json.loads(fresh.stdout)
    assert len(made) == 2 and not results["student"]["runs"][0]["reused"]
    assert results["cache"] == {"teachers_trained": 0, "logits_built": [], "logits_read": 8}


def test_the_labels_only_baseline_is_trained_once_for_all_ablation_variants(tmp_path: Path, models, monkeypatch) -> None:
    data = recipe(
        tmp_path, models, **{"student.label_only_baseline": True, "distill.on": ["labeled"]},
        plugins={"unikd-correctness": {}},
    )
    made = student_trainings(monkeypatch)
    result = invoke("ablate", str(write_recipe(tmp_path / "recipe.toml", data)))
    assert result.exit_code == 0, result.output[-3000:]
    # two variants (as written, without unikd-correctness): two distilled students, one labels-only student
    assert sorted(name.split("-seed")[0] for name in made) == ["distilled", "distilled", "labels-only"]
    rows = json.loads((tmp_path / "runs" / "tiny" / "ablate" / "ablation.json").read_text())["rows"]
    assert [r["label"] for r in rows][-1] == "labels only (same steps)"


# --------------------------------------------------------------------------- 6. labels are a contract
def _files(tmp_path: Path, train: list[dict[str, Any]], dev: list[dict[str, Any]]) -> dict[str, str]:
    return {
        "train": str(write_jsonl(tmp_path / "d" / "train.jsonl", train)),
        "validation": str(write_jsonl(tmp_path / "d" / "dev.jsonl", dev)),
    }


def _rows(labels: list[Any], seed: int = 0) -> list[dict[str, Any]]:
    texts = sentences(len(labels), seed=seed)
    return [{"sentence": t["sentence"], "label": label} for t, label in zip(texts, labels, strict=True)]


@pytest.mark.parametrize(
    ("dev_labels", "pieces"),
    [
        (["negative", "positive"], ("dev.jsonl", "row 0", "'negative'", "outside the label set ['neg', 'pos']")),
        (["neg", "pos "], ("dev.jsonl", "row 1", "'pos '", "did you mean 'pos'")),
        (["neg", "neutral"], ("dev.jsonl", "row 1", "'neutral'", "outside the label set ['neg', 'pos']")),
    ],
)
def test_a_label_the_training_split_never_saw_is_an_error(tmp_path, models, dev_labels, pieces) -> None:
    from kdkit.data import load_splits
    from kdkit.recipe import DataConfig

    files = _files(tmp_path, _rows(["neg", "pos"] * 10), _rows(dev_labels * 4, seed=1))
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(files=files, text=["sentence"]))
    for piece in pieces:
        assert piece in str(caught.value), (piece, str(caught.value))


def test_one_class_in_training_is_an_error(tmp_path: Path) -> None:
    from kdkit.data import load_splits
    from kdkit.recipe import DataConfig

    files = _files(tmp_path, _rows(["pos"] * 20), _rows(["pos", "neg"], seed=1))
    with pytest.raises(DataError, match=r"train.jsonl.*every row has the label 'pos'.*at least two classes"):
        load_splits(DataConfig(files=files, text=["sentence"]))


def test_a_label_map_turns_raw_values_into_names(tmp_path: Path) -> None:
    from kdkit.data import load_splits
    from kdkit.recipe import DataConfig

    files = _files(tmp_path, _rows([1, -1] * 10), _rows([-1, 1, 1], seed=1))
    splits = load_splits(
        DataConfig(files=files, text=["sentence"], label_map={"1": "positive", "-1": "negative"}, tune_fraction=0)
    )
    assert splits.label_names == ["negative", "positive"]  # sorted names of the mapped training labels
    assert list(splits.eval["label"]) == [0, 1, 1]
    files = _files(tmp_path, _rows([1, -1, 0] * 10), _rows([1], seed=1))
    with pytest.raises(DataError, match=r"train.jsonl\), row 2: label '0' .* not a key of data.label_map"):
        load_splits(DataConfig(files=files, text=["sentence"], label_map={"1": "positive", "-1": "negative"}))


# --------------------------------------------------------------------------- 5. validate catches what fails late
def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("overrides", "pieces"),
    [
        ({"distill.temperature": float("inf")}, ("distill.temperature", "finite")),
        ({"student.learning_rate": float("inf")}, ("student.learning_rate", "finite")),
        ({"teachers.epochs": float("inf")}, ("teachers.epochs", "finite")),
        ({"seeds": [-1]}, ("seeds.0", "greater than or equal to 0")),
        ({"seeds": [1, 1]}, ("seeds", "lists 1 more than once")),
        ({"teachers.seeds": [2, 2]}, ("teachers.seeds", "lists 2 more than once")),
        ({"student.optimizer": "adamw_torhc"}, ("student.optimizer", "did you mean 'adamw_torch'")),
        ({"student.report_to": ["tensorbord"]}, ("student.report_to", "did you mean 'tensorboard'")),
        ({"name": "../x"}, ("name", "not a single folder name")),
        ({"name": "/abs/x"}, ("name", "not a single folder name")),
        ({"name": ""}, ("name", "is empty")),
        ({"name": "n" * 300}, ("name", "300 characters long; at most 200")),
        ({"data.max_length": 100}, ("data.max_length", "more than student.model has positions (64")),
        ({"plugins": {"aekd": {"C": _nested(34)}}}, ("nested", "at most 32")),
    ],
)
def test_validate_refuses_what_would_fail_late(tmp_path: Path, models, overrides, pieces) -> None:
    plugins = overrides.pop("plugins", None)
    data = recipe(tmp_path, models, **overrides)
    if plugins is not None:
        data["plugins"] = plugins
    message = user_error(validate(tmp_path, data), *pieces)
    assert "(file)" not in message
    # and run refuses it the same way, before writing anything
    user_error(run(tmp_path, data), *pieces)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_report_to_that_is_not_installed(tmp_path: Path, models) -> None:
    pytest.importorskip("transformers")
    if "tensorboard" in sys.modules or any(Path(p, "tensorboard").is_dir() for p in sys.path if p):
        pytest.skip("tensorboard is installed here")
    data = recipe(tmp_path, models, **{"student.report_to": ["tensorboard"]})
    user_error(validate(tmp_path, data), "student.report_to", "'tensorboard' is not installed")


@pytest.mark.parametrize("where", ["file", "under-file", "not-writable"])
def test_output_and_cache_folders_that_cannot_be_written(tmp_path: Path, models, monkeypatch, where) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    if where == "file":
        target, piece = blocker, "is a file, not a folder"
    elif where == "under-file":
        target, piece = blocker / "runs", f"cannot be created: {blocker} is a file"
    else:
        target, piece = tmp_path / "locked" / "runs", "cannot be written: no write permission"
        (tmp_path / "locked").mkdir()
        real_access = os.access
        monkeypatch.setattr(
            "kdkit.stages.preflight.os.access",
            lambda path, mode: False if Path(path) == tmp_path / "locked" else real_access(path, mode),
        )
    for key in ("output_dir", "cache_dir"):
        data = recipe(tmp_path, models, **{key: str(target)})
        user_error(validate(tmp_path, data), key, piece)


def test_a_model_reference_typo_suggests_the_local_folder(tmp_path: Path, models, monkeypatch) -> None:
    monkeypatch.chdir(models["base"].parent)
    data = recipe(tmp_path, models, **{"student.model": "bsae"})
    # validate lets a hub id pass (the recipe may be meant for a machine that reaches the hub); run refuses it at
    # once, before anything is written
    assert validate(tmp_path, data).exit_code == 0
    user_error(run(tmp_path, data), "student.model", "'bsae' is neither a local directory nor in the local hub cache",
               "HF_HUB_OFFLINE=1", "did you mean './base'")
    data = recipe(tmp_path, models, **{"student.model": "./bsae"})
    user_error(validate(tmp_path, data), "student.model", "does not exist", "did you mean './base'")


def test_a_recipe_with_a_byte_order_mark_validates(tmp_path: Path, models) -> None:
    path = write_recipe(tmp_path / "recipe.toml", recipe(tmp_path, models))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output


def test_texts_longer_than_max_length_are_truncated(tmp_path: Path, models) -> None:
    data = recipe(tmp_path, models, **{"data.max_length": 64})
    long = " ".join(["good film"] * 200)  # 400 words, far above the model's 64 positions
    rows = sentences(60, seed=5) + [{"sentence": long, "label": 1}] * 4
    data["data"]["files"]["train"] = str(write_jsonl(tmp_path / "long" / "train.jsonl", rows))
    result = run(tmp_path, data)
    assert result.exit_code == 0, result.output[-3000:]


# --------------------------------------------------------------------------- 7. a failed run loses nothing
def test_a_failed_run_keeps_the_previous_results(tmp_path: Path, models) -> None:
    data = recipe(tmp_path, models)
    assert run(tmp_path, data).exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    before = {name: (run_dir / name).read_bytes() for name in ("results.json", "recipe.resolved.json")}
    path = write_recipe(tmp_path / "recipe.toml", data)
    failed = invoke("run", str(path), "--set", f"data.files.validation={tmp_path / 'missing.jsonl'}")
    user_error(failed, "data.files.validation", "file not found")
    failed = invoke("run", str(path), "--set", "seeds=[7]", "--set", "student.max_steps=20", "--set",
                    "student.learning_rate=1e30")  # diverges in the student stage: a non-finite loss
    user_error(failed, "non-finite training loss")
    assert {name: (run_dir / name).read_bytes() for name in before} == before


# --------------------------------------------------------------------------- 8. degenerate results are flagged
def test_a_model_predicting_one_class_is_flagged(tmp_path: Path, models) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    one_class = tmp_path / "one-class"
    model = AutoModelForSequenceClassification.from_pretrained(str(models["t1"]))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([50.0, -50.0]))
    model.save_pretrained(str(one_class))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models["t1"] / name).exists():
            (one_class / name).write_bytes((models["t1"] / name).read_bytes())
    data = recipe(tmp_path, models)
    data["teachers"] = {"checkpoints": [str(models["t1"]), str(one_class)]}
    result = run(tmp_path, data)
    assert result.exit_code == 0, result.output[-3000:]
    assert f"teacher 2 ({one_class}) predicts 'negative' for all 80 eval rows" in " ".join(result.stderr.split())


def test_a_tokenizer_that_knows_few_of_the_words_is_flagged(tmp_path: Path, models) -> None:
    data = recipe(tmp_path, models)
    rows = [{"sentence": f"zyx{i} qwv{i} good", "label": i % 2} for i in range(60)]
    data["data"]["files"]["train"] = str(write_jsonl(tmp_path / "unk" / "train.jsonl", rows))
    result = run(tmp_path, data)
    assert result.exit_code == 0, result.output[-3000:]
    assert "student: the tokenizer maps 67% of the labeled split's tokens to its unknown token" in " ".join(
        result.stderr.split()
    )


# --------------------------------------------------------------------------- 9. messages that name the place
@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ('{"sentence": "a b", "label": "pos"}\n{"sentence": "c d", "label": "neg"\n', ("line 2: not valid JSON",)),
        ('{"sentence": "a b", "label": NaN}\n{"sentence": "c d", "label": 1}\n', ("row 0: label NaN",)),
        ('{"sentence": "a b", "label": "pos"}\n{"sentence": "c d", "label": 1}\n', ("row 1: label 1", "is a number",
                                                                                    "row 0's 'pos' is text")),
    ],
)
def test_bad_json_lines_name_the_line_or_row(tmp_path: Path, text: str, pieces: tuple[str, ...]) -> None:
    from kdkit.data import load_splits
    from kdkit.recipe import DataConfig

    bad = tmp_path / "train.jsonl"
    bad.write_text(text, encoding="utf-8")
    dev = write_jsonl(tmp_path / "dev.jsonl", _rows(["pos", "neg"]))
    with pytest.raises(DataError) as caught:
        load_splits(DataConfig(files={"train": str(bad), "validation": str(dev)}, text=["sentence"]))
    assert "train.jsonl" in str(caught.value)
    for piece in pieces:
        assert piece in str(caught.value), (piece, str(caught.value))


def test_a_corrupt_cache_entry_is_reported_once(tmp_path: Path, models) -> None:
    # the real console script (a Python warning would print a second time there, with its source line)
    path = write_recipe(tmp_path / "recipe.toml", recipe(tmp_path, models))
    assert run_kdkit(["run", str(path)], cwd=tmp_path).returncode == 0
    corrupt = sorted((tmp_path / "cache" / "logits").glob("*.safetensors"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    again = run_kdkit(["run", str(path)], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count(f"logit cache {corrupt.name}") == 1, again.stderr

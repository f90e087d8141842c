"""End to end on tiny random BERTs: teachers trained, logits cached, students distilled, results.json; then a
second run that trains and runs no teacher, and a changed student that never loads a teacher model."""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from helpers_models import make_bert, quick_recipe
from kdkit.store.logits import CacheWarning
from kdkit.data import load_splits
from kdkit.errors import KdkitError
from kdkit.stages.run import run_recipe
from kdkit.recipe import validate_recipe
from kdkit.stages.teachers import prepare_teachers, teacher_key
from kdkit.store.files import verify_complete_marker


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("base") / "tiny-bert", layers=2, seed=0)


def _consoles() -> tuple[Console, Console]:
    return Console(file=io.StringIO(), width=200), Console(file=io.StringIO(), width=200)


def _reference_logits(directory: str | Path, texts: list[str], max_length: int) -> torch.Tensor:
    """Logits of a saved classifier, all rows in one padded float64 batch (no bucketing, no cache)."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).double().eval()
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _figures(pred: list[int], gold: list[int]) -> dict[str, float]:
    """Accuracy, F1 of class 1 and macro F1, counted by hand."""
    out = {"accuracy": sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)}
    f1 = []
    for c in (0, 1):
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        predicted, actual = pred.count(c), gold.count(c)
        f1.append(2 * tp / (predicted + actual) if tp else 0.0)
    out["f1"], out["macro_f1"] = f1[1], (f1[0] + f1[1]) / 2
    return out


def _assert_figures(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_end_to_end_then_reuse_then_a_new_student_without_teacher_models(
    tmp_path: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = quick_recipe(
        tmp_path, base_model, **{"seeds": [1, 2], "student.label_only_baseline": True, "teachers.epochs": 3}
    )
    recipe = validate_recipe(data)
    console, table_console = _consoles()
    results = run_recipe(recipe, recipe_path=None, console=console, results_console=table_console)

    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert not (run_dir / "results.partial.json").exists()
    resolved = json.loads((run_dir / "recipe.resolved.json").read_text())
    assert validate_recipe(resolved) == recipe
    assert resolved["student"]["warmup_ratio"] == 0.0 and resolved["distill"]["on"] == ["labeled", "unlabeled"]

    # teachers: trained once each, saved as safetensors with their tokenizer, marked complete
    teacher_dirs = sorted(p for p in (tmp_path / "cache" / "teachers").iterdir() if p.is_dir())
    assert len(teacher_dirs) == 2
    for directory in teacher_dirs:
        assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
        assert verify_complete_marker(directory) is None
    assert [t["trained_now"] for t in results["teachers"]] == [True, True]
    # logits: 2 teachers x (labeled, unlabeled, tune, eval)
    assert len(list((tmp_path / "cache" / "logits").glob("*.safetensors"))) == 8
    assert results["cache"]["teachers_trained"] == 2 and len(results["cache"]["logits_built"]) == 8

    # every figure, recomputed from the saved models with a plain forward pass
    splits = load_splits(recipe.data)
    texts, gold = list(splits.eval["sentence"]), list(splits.eval["label"])
    assert results["eval"]["rows"] == len(gold) == 80
    teacher_logits = []
    for row in results["teachers"]:
        logits = _reference_logits(row["path"], texts, 24)
        teacher_logits.append(logits)
        _assert_figures(row["metrics"], _figures(logits.argmax(-1).tolist(), gold))
    probs = torch.stack([torch.softmax(z, -1) for z in teacher_logits]).mean(0)
    _assert_figures(results["ensemble"], _figures(probs.argmax(-1).tolist(), gold))
    for metric in ("accuracy", "f1", "macro_f1"):
        values = [row["metrics"][metric] for row in results["teachers"]]
        assert results["teacher_mean"][metric] == pytest.approx(sum(values) / 2)

    for key in ("student", "labels_only"):
        block = results[key]
        assert [r["seed"] for r in block["runs"]] == [1, 2]
        for run in block["runs"]:
            logits = _reference_logits(Path(run["directory"]) / "model", texts, 24)
            _assert_figures(run["metrics"], _figures(logits.argmax(-1).tolist(), gold))
        for metric in ("accuracy", "f1", "macro_f1"):
            values = [r["metrics"][metric] for r in block["runs"]]
            assert block["mean"][metric] == pytest.approx((values[0] + values[1]) / 2)
            assert block["std"][metric] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    distilled_steps = [r["steps"] for r in results["student"]["runs"]]
    # labeled 108 + unlabeled 120 = 228 samples at batch 16 -> 15 steps; the baseline sees 108 samples, same steps
    assert distilled_steps == [15, 15]
    assert [r["steps"] for r in results["labels_only"]["runs"]] == distilled_steps
    assert [r["train_samples"] for r in results["labels_only"]["runs"]] == [108, 108]
    table = table_console.file.getvalue()
    assert "ensemble" in table and "labels only" in table and "mean ± std" in table

    # ---- the same recipe again: no teacher is trained or run, no student trained
    def forbidden(what: str):
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{what} was called on a second run of the same recipe")

        return fail

    monkeypatch.setattr("kdkit.stages.teachers.train_teacher", forbidden("train_teacher"))
    monkeypatch.setattr("kdkit.tasks.logit_cache.load_model_for_prediction", forbidden("loading a teacher for prediction"))
    monkeypatch.setattr("kdkit.tasks.logit_cache.predict_logits", forbidden("predict_logits"))
    monkeypatch.setattr("kdkit.training.loop.make_trainer", forbidden("training a student"))
    again = run_recipe(recipe, recipe_path=None, console=console, results_console=table_console)
    assert again["cache"] == {"teachers_trained": 0, "logits_built": [], "logits_read": 8}
    assert [t["metrics"] for t in again["teachers"]] == [t["metrics"] for t in results["teachers"]]
    assert again["ensemble"] == results["ensemble"] and again["teacher_mean"] == results["teacher_mean"]
    for key in ("student", "labels_only"):
        assert [r["metrics"] for r in again[key]["runs"]] == [r["metrics"] for r in results[key]["runs"]]
        assert [r["reused"] for r in again[key]["runs"]] == [True, True]

    # ---- a new student (other learning rate): teachers and logits reused, no teacher model instantiated
    monkeypatch.undo()
    monkeypatch.setattr("kdkit.stages.teachers.train_teacher", forbidden("train_teacher"))
    monkeypatch.setattr("kdkit.tasks.logit_cache.load_model_for_prediction", forbidden("loading a teacher for prediction"))
    loads: list[str] = []
    original = AutoModelForSequenceClassification.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(counting))
    changed = validate_recipe({**data, "seeds": [1], "student": {**data["student"], "learning_rate": 1e-3, "label_only_baseline": False}})
    third = run_recipe(changed, recipe_path=None, console=console, print_table=False)
    assert loads == [str(base_model.resolve())]  # the student's base model, nothing else
    assert third["cache"]["teachers_trained"] == 0 and third["cache"]["logits_built"] == []
    assert third["student"]["runs"][0]["reused"] is False
    assert third["student"]["runs"][0]["directory"] != results["student"]["runs"][0]["directory"]
    assert third["labels_only"] is None


def test_teacher_key_covers_what_changes_the_weights(tmp_path: Path, base_model: Path) -> None:
    cfg = validate_recipe(quick_recipe(tmp_path, base_model)).teachers
    base = dict(seed=1, data_hash="d", label_names=["n", "p"], max_length=24)
    key, inputs = teacher_key(cfg, **base)
    assert inputs["seed"] == 1 and inputs["max_length"] == 24
    changed = [
        teacher_key(cfg, **{**base, "seed": 2})[0],
        teacher_key(cfg, **{**base, "data_hash": "e"})[0],
        teacher_key(cfg, **{**base, "max_length": 25})[0],
        teacher_key(cfg, **{**base, "label_names": ["p", "n"]})[0],
        teacher_key(cfg.model_copy(update={"learning_rate": 1e-3}), **base)[0],
        teacher_key(cfg.model_copy(update={"num_layers": 1}), **base)[0],
        teacher_key(cfg.model_copy(update={"epochs": 3.0}), **base)[0],
        teacher_key(cfg.model_copy(update={"pooling": "mean"}), **base)[0],
    ]
    assert len(set(changed)) == len(changed) and key not in changed
    # settings that do not change the weights keep the key
    same = cfg.model_copy(update={"logging_steps": 1, "report_to": ["tensorboard"], "eval_batch_size": 7})
    assert teacher_key(same, **base)[0] == key
    # so does a copy of the base model elsewhere (content, not path); an edited copy does not
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base_model, copy)
    assert teacher_key(cfg.model_copy(update={"model": str(copy)}), **base)[0] == key
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "extra": 1}', 1))
    assert teacher_key(cfg.model_copy(update={"model": str(copy)}), **base)[0] != key


def test_a_corrupt_cached_teacher_is_trained_again(tmp_path: Path, base_model: Path, monkeypatch) -> None:
    recipe = validate_recipe(quick_recipe(tmp_path, base_model, **{"teachers.max_steps": 2, "teachers.seeds": [4]}))
    splits = load_splits(recipe.data)
    calls: list[int] = []
    import kdkit.stages.teachers as teachers_module

    original = teachers_module.train_teacher

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["seed"])
        return original(*args, **kwargs)

    monkeypatch.setattr("kdkit.stages.teachers.train_teacher", counting)
    kwargs = dict(
        cache_dir=tmp_path / "cache", labeled=splits.labeled, text_columns=["sentence"],
        label_names=splits.label_names, max_length=24,
    )
    first = prepare_teachers(recipe.teachers, **kwargs)
    assert calls == [4] and first[0].trained_now
    assert prepare_teachers(recipe.teachers, **kwargs)[0].trained_now is False
    assert calls == [4]

    weights = Path(first[0].path) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.warns(CacheWarning, match="model.safetensors does not match its checksum"):
        again = prepare_teachers(recipe.teachers, **kwargs)
    assert calls == [4, 4] and again[0].trained_now and again[0].path == first[0].path
    assert verify_complete_marker(again[0].path) is None
    assert not [p for p in (tmp_path / "cache" / "teachers").iterdir() if p.name.startswith(".tmp-")]


def test_given_checkpoints_are_checked_against_the_data(tmp_path: Path, base_model: Path) -> None:
    good = make_bert(tmp_path / "good", num_labels=2, label_names=["negative", "positive"], seed=1)
    swapped = make_bert(tmp_path / "swapped", num_labels=2, label_names=["positive", "negative"], seed=2)
    three = make_bert(tmp_path / "three", num_labels=3, seed=3)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((good / "config.json").read_text())

    def recipe_with(*checkpoints: Path):
        data = quick_recipe(tmp_path, base_model)
        data["teachers"] = {"checkpoints": [str(c) for c in checkpoints]}
        return validate_recipe(data)

    splits = load_splits(recipe_with(good).data)
    kwargs = dict(
        cache_dir=tmp_path / "cache", labeled=splits.labeled, text_columns=["sentence"],
        label_names=splits.label_names, max_length=24,
    )
    teachers = prepare_teachers(recipe_with(good, good).teachers, **kwargs)
    assert [t.source for t in teachers] == ["checkpoint", "checkpoint"]
    assert teachers[0].key == teachers[1].key and teachers[0].path == str(good.resolve())

    with pytest.raises(KdkitError, match=r"teacher 2 \(.*swapped\): label order \['positive', 'negative'\]"):
        prepare_teachers(recipe_with(good, swapped).teachers, **kwargs)
    with pytest.raises(KdkitError, match=r"teacher 1 \(.*three\): predicts 3 classes but the data has 2"):
        prepare_teachers(recipe_with(three).teachers, **kwargs)
    with pytest.raises(KdkitError, match="holds no weights") as info:
        prepare_teachers(recipe_with(empty).teachers, **kwargs)
    assert str(empty.resolve()) in str(info.value)
    with pytest.raises(KdkitError, match="does not exist"):
        prepare_teachers(recipe_with(tmp_path / "missing").teachers, **kwargs)


def test_a_plugin_refusing_the_ensemble_fails_before_any_teacher_is_trained(
    tmp_path: Path, base_model: Path, monkeypatch
) -> None:
    data = quick_recipe(tmp_path, base_model, **{"teachers.seeds": [1]})
    data["plugins"] = {"unikd-disagreement": {}}
    monkeypatch.setattr("kdkit.stages.teachers.train_teacher", lambda *a, **k: pytest.fail("a teacher was trained"))
    console, _ = _consoles()
    with pytest.raises(KdkitError, match="unikd-disagreement"):
        run_recipe(validate_recipe(data), console=console, print_table=False)
    assert not (tmp_path / "runs" / "tiny" / "results.json").exists()


def test_results_std_is_the_sample_std() -> None:
    from kdkit.stages.results import metric_mean_std as mean_std

    mean, std = mean_std([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": 0.9}])
    assert mean["accuracy"] == pytest.approx(0.7)
    assert std["accuracy"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9])) == pytest.approx(0.2)

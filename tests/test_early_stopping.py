"""Early stopping as a protocol (issue 15) and the [trainer] pass-through table (issue 12).

The rule is made deterministic with ``threshold = 1.0``: no tune-split accuracy can improve by more than 1, so the
first evaluation is the best one whatever the numbers, and training stops ``patience`` evaluations later. With a
constant learning rate (``[student.trainer] lr_scheduler_type = "constant"``, the pass-through table) the weights
at that first evaluation equal those of a run that simply stops there, which is how "the best checkpoint is kept"
is checked.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from helpers_models import base_and_two_teachers, quick_recipe
from helpers_reliability import one_thread, run_kdkit, write_recipe
from kdkit import cli
from kdkit.plugin.registry import BLOCK_ENV_VAR
from kdkit.store.logits import read_logits

LABELS = ["negative", "positive"]
runner = CliRunner()
EARLY = {"eval_steps": 2, "patience": 2, "metric": "accuracy", "threshold": 1.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return base_and_two_teachers(tmp_path_factory.mktemp("models"), LABELS)


def recipe(tmp_path: Path, models: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    data = quick_recipe(
        tmp_path, models["base"],
        **{"student.max_steps": 40, "student.trainer": {"lr_scheduler_type": "constant"}, **overrides},
    )
    data["teachers"] = {"checkpoints": [str(models["t1"]), str(models["t2"])]}
    return data


def run(tmp_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    path = write_recipe(tmp_path / "recipe.toml", data)
    result = runner.invoke(cli.app, ["run", str(path), "--json"], env={BLOCK_ENV_VAR: None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout)


def _eval_logits(results: dict[str, Any], block: str = "student") -> torch.Tensor:
    directory = Path(results[block]["runs"][0]["directory"])
    return read_logits(directory / "eval_logits.safetensors")


def test_the_best_checkpoint_is_kept_and_the_stop_step_recorded(tmp_path: Path, models) -> None:
    early = run(tmp_path / "a", recipe(tmp_path / "a", models, **{"student.early_stopping": EARLY}))
    figures = early["student"]["runs"][0]
    # evaluations at steps 2 (best: the first), 4 and 6 (two without an improvement > 1.0): stop at 6, keep 2
    assert figures["steps"] == 6 and figures["best_step"] == 2
    assert early["early_stopping"]["student"] == EARLY
    done = json.loads((Path(figures["directory"]) / "done.json").read_text())
    assert [e["step"] for e in done["evaluations"] if "eval_accuracy" in e] == [2, 4, 6]
    assert not list(Path(figures["directory"]).glob("checkpoint-*"))  # only the final model is kept

    # the same student stopped at step 2 by max_steps (no early stopping): the kept model is that one
    plain = run(tmp_path / "b", recipe(tmp_path / "b", models, **{"student.max_steps": 2}))
    assert plain["student"]["runs"][0]["steps"] == 2 and plain["student"]["runs"][0]["best_step"] is None
    assert torch.allclose(_eval_logits(early), _eval_logits(plain), atol=1e-5)
    assert early["student"]["runs"][0]["metrics"] == plain["student"]["runs"][0]["metrics"]


def test_the_labels_only_student_stops_by_the_same_rule_and_the_report_says_so(tmp_path: Path, models) -> None:
    from kdkit.experiments import report_runs

    data = recipe(tmp_path, models, **{"student.early_stopping": EARLY, "student.label_only_baseline": True})
    early = run(tmp_path, data)
    assert [r["steps"] for r in early["labels_only"]["runs"]] == [6]  # early-stopped, not forced to equal steps
    data = recipe(tmp_path, models, name="equal", **{"student.max_steps": 4})
    run(tmp_path, data)
    report = report_runs([tmp_path / "runs" / "tiny", tmp_path / "runs" / "equal"])
    assert [r.label for r in report.rows][2] == "labels only (early stopping)"
    lines = report.protocol_lines()
    assert len(lines) == 1 and "MIXED PROTOCOLS" in lines[0]
    assert "tiny: early stopping on the tune split (accuracy, every 2 steps, patience 2)" in lines[0]
    assert "equal: equal steps" in lines[0]
    assert "MIXED PROTOCOLS" in report.markdown()


def test_a_run_killed_between_evaluations_resumes_with_its_patience(tmp_path: Path, models) -> None:
    data = recipe(tmp_path, models, **{"student.early_stopping": EARLY})
    path = write_recipe(tmp_path / "recipe.toml", data)
    killed = run_kdkit(["run", str(path)], cwd=tmp_path, stop="student-step:5")  # after the evaluation at 4
    assert killed.returncode != 0
    (student,) = [p for p in (tmp_path / "runs" / "tiny" / "students").iterdir() if p.is_dir()]  # not its .lock
    assert (student / "checkpoint-4" / "trainer_state.json").is_file()
    resumed = run_kdkit(["run", str(path), "--json"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming student (seed 1) from {student / 'checkpoint-4'}" in resumed.stderr
    figures = json.loads(resumed.stdout)["student"]["runs"][0]
    # the patience counter came back with the checkpoint: one more evaluation without improvement ends it at 6
    # (a counter starting again from 0 would have gone on to step 8)
    assert figures["steps"] == 6 and figures["best_step"] == 2


@pytest.mark.parametrize("protocol", ["equal steps", "early stopping"])
def test_a_run_killed_after_its_last_step_resumes_without_a_step_too_many(tmp_path: Path, models, protocol) -> None:
    # The Trainer checks for the end of training only after a step: resumed from the checkpoint of the last step
    # (or of the evaluation that used up the patience) it trained one step more (found in the suite: 201 steps of
    # 200). The rerun must repeat the uninterrupted run instead.
    if protocol == "early stopping":
        overrides: dict[str, Any] = {"student.early_stopping": EARLY}  # evaluations at 2, 4, 6: stops at 6, keeps 2
    else:
        overrides = {"student.max_steps": 6, "student.save_steps": 3}
    path = write_recipe(tmp_path / "recipe.toml", recipe(tmp_path, models, **overrides))
    killed = run_kdkit(["run", str(path)], cwd=tmp_path, stop="student-trained")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (student,) = [p for p in (tmp_path / "runs" / "tiny" / "students").iterdir() if p.is_dir()]
    assert (student / "checkpoint-6" / "trainer_state.json").is_file() and not (student / "done.json").exists()

    resumed = run_kdkit(["run", str(path), "--json"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures = json.loads(resumed.stdout)["student"]["runs"][0]
    reference = run(tmp_path / "ref", recipe(tmp_path / "ref", models, **overrides))  # never interrupted
    expected = reference["student"]["runs"][0]
    assert figures["steps"] == expected["steps"] == 6
    assert figures["best_step"] == expected["best_step"] == (2 if protocol == "early stopping" else None)
    assert "written after the last training step" in resumed.stderr
    assert torch.allclose(
        read_logits(student / "eval_logits.safetensors"), _eval_logits(reference), atol=1e-5
    )


def test_teachers_stop_early_too_and_their_key_says_so(tmp_path: Path, models) -> None:
    from kdkit.recipe import validate_recipe
    from kdkit.stages.teachers import teacher_key

    data = quick_recipe(
        tmp_path, models["base"],
        **{"teachers.max_steps": 40, "teachers.seeds": [1], "teachers.early_stopping": EARLY, "student.max_steps": 2,
           "teachers.trainer": {"lr_scheduler_type": "constant"}},
    )
    results = run(tmp_path, data)
    assert results["teachers"][0]["steps"] == 6
    info = json.loads((Path(results["teachers"][0]["path"]) / "kdkit-teacher.json").read_text())
    assert info["training"]["best_step"] == 2
    plain = validate_recipe({**data, "teachers": {k: v for k, v in data["teachers"].items() if k != "early_stopping"}})
    with_es = validate_recipe(data)
    key = {"seed": 1, "data_hash": "d", "label_names": LABELS, "max_length": 24}
    assert teacher_key(plain.teachers, **key)[0] != teacher_key(with_es.teachers, **key)[0]


def test_a_trainer_field_reaches_the_trainer(tmp_path: Path, models, monkeypatch) -> None:
    import kdkit.training.loop

    seen: list[Any] = []
    real = kdkit.training.loop.make_trainer

    def recording(*args: Any, **kwargs: Any) -> Any:
        trainer = real(*args, **kwargs)
        seen.append(trainer.args)
        return trainer

    monkeypatch.setattr(kdkit.training.loop, "make_trainer", recording)
    trainer_table = {"lr_scheduler_type": "constant", "adam_beta2": 0.95, "max_grad_norm": 0.5}
    run(tmp_path, recipe(tmp_path, models, **{"student.max_steps": 2, "student.trainer": trainer_table}))
    (args,) = seen
    assert (args.lr_scheduler_type, args.adam_beta2, args.max_grad_norm) == ("constant", 0.95, 0.5)
    assert args.ddp_find_unused_parameters is False  # kdkit's default


def test_trainer_fields_that_kdkit_owns_or_that_do_not_exist_are_refused(tmp_path: Path, models) -> None:
    data = recipe(tmp_path, models, **{"student.trainer": {"seed": 3, "lr_schedular_type": "constant"}})
    path = write_recipe(tmp_path / "recipe.toml", data)
    result = runner.invoke(cli.app, ["validate", str(path)], env={BLOCK_ENV_VAR: None})
    assert result.exit_code == 2
    assert "student.trainer.seed: is set by kdkit (the recipe's seeds decide it)" in result.stderr
    assert "student.trainer.lr_schedular_type: is not a field of transformers.TrainingArguments" in result.stderr
    assert "did you mean 'lr_scheduler_type'" in result.stderr
    data = recipe(tmp_path, models, **{"student.early_stopping": EARLY, "data.tune_fraction": 0.0})
    result = runner.invoke(cli.app, ["validate", str(write_recipe(path, data))], env={BLOCK_ENV_VAR: None})
    assert result.exit_code == 2 and "student.early_stopping: evaluates on the tune split" in result.stderr


def test_fewer_unlabeled_rows_leave_the_labeled_ones_alone(tmp_path: Path) -> None:
    from helpers_models import sentences, write_jsonl
    from kdkit.data import load_splits
    from kdkit.recipe import DataConfig

    files = {
        "train": str(write_jsonl(tmp_path / "train.jsonl", sentences(200, seed=1))),
        "validation": str(write_jsonl(tmp_path / "dev.jsonl", sentences(20, seed=2))),
    }
    full = load_splits(DataConfig(files=files, text=["sentence"], label_names=LABELS))
    part = load_splits(DataConfig(files=files, text=["sentence"], label_names=LABELS, max_unlabeled_samples=30))
    assert list(part.labeled["row"]) == list(full.labeled["row"]) and list(part.tune["row"]) == list(full.tune["row"])
    assert len(full.unlabeled) == 100 and len(part.unlabeled) == 30
    assert set(part.unlabeled["row"]) <= set(full.unlabeled["row"])
    assert list(part.unlabeled["row"]) == sorted(part.unlabeled["row"])  # source order kept
    assert part.fingerprint != full.fingerprint

"""Weights sharded by the Trainer (issue 12, FSDP full state dict; DeepSpeed ZeRO-3 where installed).

Under FSDP or ZeRO-3 the model object of each process holds a share of the weights. kdkit then saves the student
through the Trainer on every process (the Trainer gathers the full state dict; rank 0 writes it), and predicts the
eval split with the saved model, loaded whole by every process (each predicts a share of the batches, which a
forward pass through the sharded model, a collective, would not allow). Shown here:

* one process, the sharded path forced on: the student predicts from the model it saved, and its eval
  predictions equal, bit for bit, those of the same student predicting from memory, and a float64 reference
  forward of the saved model within ``TOLERANCE``;
* two processes (torchrun, gloo, CPU) with ``[student.trainer] fsdp = true``: the saved student loads with
  ``from_pretrained`` and predicts its eval logits. accelerate (1.16 here) turns FSDP on for GPUs and other
  accelerators only: on CPU processes it drops the FSDP plugin without a word and the Trainer trains with DDP.
  Which of the two happened is read from the run: the FSDP test runs where the Trainer sharded, the fallback test
  (kdkit says so, and still saves on every process) where it did not;
* what cannot work is refused before any data is read: sharded weights on one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdkit.tasks.classification
from helpers_models import make_bert, quick_recipe, sentences
from helpers_reliability import kdkit_env, one_thread, write_recipe
from kdkit.errors import KdkitError, RecipeError
from kdkit.modeling import encode, load_tokenizer
from kdkit.recipe import validate_recipe
from kdkit.stages.preflight import preflight
from kdkit.stages.students import train_student
from kdkit.stages.teachers import schedule_teachers
from kdkit.training import EncodedDataset, KDTrainer, training_arguments

LABELS = ["negative", "positive"]
#: Largest difference allowed between kdkit's eval logits (float32, rows batched by length) and a float64 padded
#: forward of the saved model.
TOLERANCE = 1e-6  # measured here: 1.1e-8 (one process), 1.5e-8 (two), on logits of about 0.08
#: What kdkit prints (rank 0) when the recipe asks for FSDP and the Trainer does not shard.
NOT_SHARDED = "fsdp is set, but the Trainer does not shard the weights here"
FSDP_TABLE = {"fsdp": True, "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("fsdp-student"), layers=1, seed=5)


def _reference_logits(directory: Path, texts: list[str], max_length: int) -> torch.Tensor:
    """Logits of a saved classifier, loaded by transformers alone, all rows in one padded float64 batch."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).double().eval()
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _rows(count: int, seed: int) -> datasets.Dataset:
    rows = sentences(count, seed=seed)
    return datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [r["label"] for r in rows]})


# --------------------------------------------------------------------------- one process, sharded path forced on
def test_a_sharded_student_predicts_from_the_model_it_saved(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    recipe = validate_recipe(
        quick_recipe(tmp_path, model_dir, **{"student.batch_size": 8, "student.max_steps": 3, "student.save_steps": 2})
    )
    tokenizer = load_tokenizer(str(model_dir), who="s")
    train = _rows(24, seed=7)
    dataset = EncodedDataset(encode(tokenizer, train, ["sentence"], 24), list(train["label"]))
    eval_split = _rows(30, seed=8)
    common = dict(
        tokenizer=tokenizer, dataset=dataset, eval_split=eval_split, text_columns=["sentence"], label_names=LABELS,
        seed=2, kind="labels-only",
    )
    from_memory = train_student(recipe, directory=tmp_path / "memory", **common)

    loaded: list[tuple[str, bool]] = []
    real = kdkit.tasks.classification.load_classifier

    def recording(resolved: str, **kwargs: Any) -> Any:
        loaded.append((resolved, kwargs.get("fine_tuned", False)))
        return real(resolved, **kwargs)

    monkeypatch.setattr(kdkit.tasks.classification, "load_classifier", recording)
    monkeypatch.setattr(KDTrainer, "weights_sharded", property(lambda self: True))
    sharded = train_student(recipe, directory=tmp_path / "sharded", **common)

    saved = tmp_path / "sharded" / "model"
    assert loaded == [(str(model_dir), False), (str(saved), True)]  # the base model, then the saved student
    assert (saved / "model.safetensors").is_file() and not (saved / "training_args.bin").exists()
    assert sharded.steps == from_memory.steps == 3
    assert torch.equal(sharded.eval_logits, from_memory.eval_logits)
    assert torch.equal(load_file(str(tmp_path / "sharded" / "eval_logits.safetensors"))["logits"], sharded.eval_logits)
    reference = _reference_logits(saved, list(eval_split["sentence"]), 24)
    assert float((sharded.eval_logits.double() - reference).abs().max()) <= TOLERANCE


# --------------------------------------------------------------------------- refused before anything runs
def test_sharded_weights_on_one_process_are_refused_before_any_data_is_read(model_dir: Path, tmp_path: Path) -> None:
    recipe = validate_recipe(quick_recipe(tmp_path, model_dir, **{"student.trainer": FSDP_TABLE}))
    with pytest.raises(RecipeError) as caught:
        preflight(recipe)
    assert "student.trainer.fsdp" in str(caught.value) and "one process" in str(caught.value)
    preflight(recipe, launched=False)  # kdkit validate: the recipe may be meant for torchrun
    with pytest.raises(KdkitError, match=r"student\.trainer\.fsdp: shards the weights"):
        training_arguments(recipe.student, output_dir=tmp_path / "o", seed=0)

    teachers = validate_recipe(quick_recipe(tmp_path, model_dir, **{"teachers.trainer": {"deepspeed": "ds.json"}}))
    with pytest.raises(RecipeError, match=r"teachers\.trainer\.deepspeed"):
        preflight(teachers)


def test_teachers_whose_weights_are_sharded_all_train_over_every_process() -> None:
    assert schedule_teachers([0, 1, 2, 3, 4], 2, "global") == ([[0, 2], [1, 3]], [4])
    assert schedule_teachers([0, 1, 2, 3, 4], 2, "global", sharded=True) == ([[], []], [0, 1, 2, 3, 4])


# --------------------------------------------------------------------------- two processes, fsdp in the recipe
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``kdkit run`` under ``torchrun --nproc_per_node 2`` with ``[student.trainer] fsdp = true``; the teachers are
    given checkpoints (nothing to train but the student)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("fsdp-run")
    base = make_bert(tmp / "base", layers=1, seed=0)
    teachers = [str(make_bert(tmp / f"teacher{s}", layers=1, seed=s, num_labels=2, label_names=LABELS)) for s in (1, 2)]
    data = quick_recipe(
        tmp, base, **{"student.max_steps": 4, "student.save_steps": 2, "student.batch_size": 16,
                      "student.trainer": FSDP_TABLE},
    )
    data["teachers"] = {"checkpoints": teachers, "eval_batch_size": 16}
    path = write_recipe(tmp / "recipe.toml", data)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kdkit", "run", str(path), "--json"],
        cwd=tmp, env=kdkit_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    [run] = json.loads(done.stdout)["student"]["runs"]
    texts = [json.loads(line)["sentence"] for line in (tmp / "data" / "dev.jsonl").read_text().splitlines()]
    return {"run": run, "stderr": done.stderr, "texts": texts, "sharded": NOT_SHARDED not in done.stderr}


def _assert_saved_student_predicts_its_eval_logits(fsdp_run: dict[str, Any]) -> None:
    directory = Path(fsdp_run["run"]["directory"])
    assert fsdp_run["run"]["steps"] == 4
    assert (directory / "done.json").is_file() and not list(directory.glob("checkpoint-*"))
    assert not (directory / "model" / "training_args.bin").exists()
    eval_logits = load_file(str(directory / "eval_logits.safetensors"))["logits"]
    reference = _reference_logits(directory / "model", fsdp_run["texts"], 24)
    assert eval_logits.shape == reference.shape == (80, 2)
    assert float((eval_logits.double() - reference).abs().max()) <= TOLERANCE


def test_an_fsdp_student_saves_a_model_that_loads_and_predicts_like_an_unsharded_one(fsdp_run) -> None:
    if not fsdp_run["sharded"]:
        pytest.skip(
            "the Trainer did not shard on these CPU processes: accelerate enables FSDP on GPUs and other "
            "accelerators only (on gloo/CPU it drops the plugin and the Trainer trains with DDP; with its FSDP state "
            "forced on, wrapping the model fails: FSDP2 in fully_shard, FSDP1 on the CPU device id), so no FSDP run "
            "is possible here"
        )
    _assert_saved_student_predicts_its_eval_logits(fsdp_run)


def test_fsdp_that_the_trainer_drops_is_reported_and_the_student_still_saved(fsdp_run) -> None:
    if fsdp_run["sharded"]:
        pytest.skip("the Trainer sharded the weights here (see the FSDP test)")
    assert fsdp_run["stderr"].count(NOT_SHARDED) == 1  # said once, by the main process
    assert "student (seed 1): " + NOT_SHARDED in fsdp_run["stderr"].replace("\n", " ")
    _assert_saved_student_predicts_its_eval_logits(fsdp_run)

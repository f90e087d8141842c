"""The student Trainer: its loss, the kd_index column, the labels-only baseline's step count, resuming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from transformers import TrainerCallback

from helpers_models import make_bert, quick_recipe, sentences
from kdkit.distill import DistillationLoss
from kdkit.modeling import encode, load_classifier, load_tokenizer
from kdkit.plugin import IGNORE_INDEX, Plugin, hookimpl
from kdkit.recipe import validate_recipe
from kdkit.errors import DataError, NonFiniteLossError
from kdkit.stages.students import train_student
from kdkit.training import EncodedDataset, KDCollator, make_trainer, optimizer_steps, training_arguments
from kdkit.testing import plugin_registry

LABELS = ["negative", "positive"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = 3.0


class UnlabeledBoost(Plugin):
    """Test plugin: unlabeled samples weigh ``factor`` times more."""

    name = "test-unlabeled-boost"
    version = "1"
    Options = _Options

    @hookimpl
    def kdkit_sample_weights(self, batch: Any) -> torch.Tensor | None:
        if batch.stream != "unlabeled":
            return None
        return torch.full((batch.size,), self.options.factor)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("student"), layers=1, seed=11)


def _rows(count: int, seed: int) -> datasets.Dataset:
    rows = sentences(count, seed=seed)
    return datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [r["label"] for r in rows]})


def _dataset(tokenizer: Any, labeled: int, unlabeled: int) -> tuple[EncodedDataset, list[int]]:
    ds = _rows(labeled + unlabeled, seed=21)
    labels = list(ds["label"])
    labels[labeled:] = [IGNORE_INDEX] * unlabeled
    return EncodedDataset(encode(tokenizer, ds, ["sentence"], 16), labels, kd_index=range(len(ds))), labels


def _reference_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float, boost: float) -> float:
    """DESIGN.md section 1 with the average teacher weights, k = 1 and s = boost on unlabeled rows, in float64."""
    total = 0.0
    for b in range(student.shape[0]):
        zs = student[b].double()
        target = torch.stack([torch.softmax(teacher[b, i].double() / t, -1) for i in range(teacher.shape[1])]).mean(0)
        log_ps = zs / t - torch.logsumexp(zs / t, -1)
        kd = -(target * log_ps).sum() * t * t
        if int(labels[b]) == IGNORE_INDEX:
            total += boost * float(kd)
        else:
            task = -(zs - torch.logsumexp(zs, -1))[int(labels[b])]
            total += float(kd + task)
    return total / student.shape[0]


def test_trainer_loss_is_the_distillation_loss_on_the_cached_rows(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir), who="s")
    model = load_classifier(str(model_dir), label_names=LABELS, who="s").eval()
    dataset, labels = _dataset(tokenizer, labeled=6, unlabeled=6)
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(len(dataset), 3, 2, generator=gen) * 2
    registry = plugin_registry(UnlabeledBoost)
    loss_fn = DistillationLoss.from_plugins(
        {"test-unlabeled-boost": {"factor": 3.0}}, temperature=2.0, registry=registry
    )
    args = training_arguments(
        validate_recipe(quick_recipe(tmp_path, model_dir)).student, output_dir=tmp_path / "o", seed=0
    )
    trainer = make_trainer(model, tokenizer, dataset, args, teacher_logits=teacher_logits, loss_fn=loss_fn)

    order = [7, 2, 11, 0, 5, 9]  # mixed labeled / unlabeled, not in row order
    batch = KDCollator(tokenizer)([dataset[i] for i in order])
    seen: dict[str, Any] = {}
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return forward(*args, **kwargs)

    model.forward = spy  # type: ignore[method-assign]
    loss = trainer.compute_loss(model, dict(batch))
    assert "kd_index" not in seen and "labels" not in seen  # the model gets only its own inputs

    with torch.no_grad():
        student = forward(**{k: v for k, v in batch.items() if k not in ("kd_index", "labels")}).logits
    rows = torch.tensor(order)
    expected = _reference_loss(student, teacher_logits[rows], torch.tensor(labels)[rows], t=2.0, boost=3.0)
    loss = loss.detach()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    direct = loss_fn(student, teacher_logits[rows], torch.tensor(labels)[rows]).loss
    assert float(loss) == pytest.approx(float(direct), rel=1e-6)
    # the logged weights are the batch means: k = 1, s = 1 (labeled) or 3 (unlabeled; 3 of the 6)
    assert trainer._stats["kd_weight"] == [6.0, 6]
    assert trainer._stats["sample_weight"] == [3 * 1.0 + 3 * 3.0, 6]


def test_kd_index_survives_the_collator_and_the_trainer_dataloader(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir), who="s")
    model = load_classifier(str(model_dir), label_names=LABELS, who="s")
    dataset, labels = _dataset(tokenizer, labeled=10, unlabeled=13)
    cfg = validate_recipe(quick_recipe(tmp_path, model_dir, **{"student.batch_size": 4})).student
    args = training_arguments(cfg, output_dir=tmp_path / "o", seed=0)
    assert args.remove_unused_columns is False
    trainer = make_trainer(
        model, tokenizer, dataset, args, teacher_logits=torch.zeros(len(dataset), 2, 2), loss_fn=DistillationLoss()
    )
    seen = []
    for batch in trainer.get_train_dataloader():
        assert batch["kd_index"].dtype == torch.long
        for position, row in enumerate(batch["kd_index"].tolist()):
            # the row it names is the sample it travels with
            assert batch["labels"][position] == labels[row]
            expected_ids = dataset.encoded["input_ids"][row]
            assert batch["input_ids"][position, : len(expected_ids)].tolist() == expected_ids
            assert batch["attention_mask"][position].sum() == len(expected_ids)
        seen.extend(batch["kd_index"].tolist())
    assert sorted(seen) == list(range(len(dataset)))
    assert seen != list(range(len(dataset)))  # shuffled by the Trainer


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1


def _recipe(tmp_path: Path, model_dir: Path, **overrides: Any):
    settings = {
        "student.batch_size": 8,  # global: 4 per forward pass, accumulated by 2
        "student.gradient_accumulation_steps": 2,
        "student.epochs": 1,
        "student.save_steps": 2,
        "student.logging_steps": 1,
        "student.eval_batch_size": 8,
        **overrides,
    }
    return validate_recipe(quick_recipe(tmp_path, model_dir, **settings))


def test_labels_only_baseline_runs_as_many_optimizer_steps(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    recipe = _recipe(tmp_path, model_dir)
    tokenizer = load_tokenizer(str(model_dir), who="s")
    distill, _ = _dataset(tokenizer, labeled=16, unlabeled=24)
    baseline = EncodedDataset(
        {k: v[:16] for k, v in distill.encoded.items()}, distill.labels[:16]
    )
    eval_split = _rows(8, seed=3)
    counters: list[StepCounter] = []
    original = make_trainer

    def counting(*args: Any, **kwargs: Any):
        trainer = original(*args, **kwargs)
        counters.append(StepCounter())
        trainer.add_callback(counters[-1])
        return trainer

    monkeypatch.setattr("kdkit.training.loop.make_trainer", counting)
    common = dict(tokenizer=tokenizer, eval_split=eval_split, text_columns=["sentence"], label_names=LABELS, seed=1)
    run = train_student(
        recipe, dataset=distill, kind="distilled", directory=tmp_path / "d",
        teacher_logits=torch.zeros(40, 2, 2), loss_fn=DistillationLoss(), **common,
    )
    # 40 samples / batch 4 = 10 micro-batches, accumulated by 2: 5 optimizer steps
    assert run.steps == 5 == counters[0].steps
    assert optimizer_steps(40, recipe.student) == 5
    base = train_student(recipe, dataset=baseline, kind="labels-only", directory=tmp_path / "b", max_steps=run.steps, **common)
    # 16 samples give 2 optimizer steps an epoch: the baseline repeats its data to reach 5
    assert optimizer_steps(16, recipe.student) == 2
    assert base.steps == 5 == counters[1].steps
    assert base.eval_logits.shape == (8, 2)
    assert (tmp_path / "d" / "done.json").is_file() and (tmp_path / "d" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "d").glob("checkpoint-*"))  # removed once the run is done


class Interrupt(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_student_resumes_and_matches_an_uninterrupted_run(
    model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    recipe = _recipe(tmp_path, model_dir, **{"student.epochs": 2})
    tokenizer = load_tokenizer(str(model_dir), who="s")
    distill, _ = _dataset(tokenizer, labeled=12, unlabeled=12)
    teacher_logits = torch.randn(24, 2, 2, generator=torch.Generator().manual_seed(1))
    eval_split = _rows(10, seed=4)
    common = dict(
        tokenizer=tokenizer, dataset=distill, eval_split=eval_split, text_columns=["sentence"], label_names=LABELS,
        seed=3, kind="distilled", teacher_logits=teacher_logits, loss_fn=DistillationLoss(),
    )
    straight = train_student(recipe, directory=tmp_path / "straight", **common)
    assert straight.steps == 6

    original = make_trainer

    def interrupted(*args: Any, **kwargs: Any):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Interrupt(at=3))
        return trainer

    monkeypatch.setattr("kdkit.training.loop.make_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_student(recipe, directory=tmp_path / "cut", **common)
    assert (tmp_path / "cut" / "checkpoint-2").is_dir()
    assert not (tmp_path / "cut" / "done.json").exists()
    monkeypatch.undo()

    resumed = train_student(recipe, directory=tmp_path / "cut", **common)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.steps == 6
    torch.testing.assert_close(resumed.eval_logits, straight.eval_logits, rtol=1e-5, atol=1e-6)

    reused = train_student(recipe, directory=tmp_path / "cut", **common)
    assert reused.reused and reused.steps == 6
    torch.testing.assert_close(reused.eval_logits, resumed.eval_logits, rtol=0, atol=0)


class NaNWeights(Plugin):
    """Sample weights that are NaN: a plugin gone wrong, which makes the loss NaN."""

    name, version = "nan-weights", "1"

    @hookimpl
    def kdkit_sample_weights(self, batch: Any) -> torch.Tensor:
        return torch.full((batch.size,), float("nan"))


def test_a_non_finite_loss_stops_training_and_names_the_step(model_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, model_dir, **{"student.gradient_accumulation_steps": 1, "student.batch_size": 4})
    tokenizer = load_tokenizer(str(model_dir), who="s")
    distill, _ = _dataset(tokenizer, labeled=8, unlabeled=8)

    def train(teacher_logits: torch.Tensor, loss_fn: DistillationLoss, name: str) -> None:
        train_student(
            recipe, tokenizer=tokenizer, dataset=distill, eval_split=_rows(4, seed=1), text_columns=["sentence"],
            label_names=LABELS, seed=1, kind="distilled", directory=tmp_path / name,
            teacher_logits=teacher_logits, loss_fn=loss_fn,
        )

    with pytest.raises(NonFiniteLossError, match=r"step 1 .*no checkpoint was written yet"):
        train(torch.zeros(16, 2, 2), DistillationLoss([NaNWeights()]), "nan")
    # NaN teacher logits never get as far as a NaN loss: the objective names the sample and the teacher
    with pytest.raises(DataError, match=r"teacher logits are not finite: sample \d+, teacher 1, class 0 holds nan"):
        train(torch.full((16, 2, 2), float("nan")), DistillationLoss(), "nan-teachers")


def test_optimizer_steps_matches_the_trainer_formula() -> None:
    from kdkit.recipe import StudentConfig

    cfg = StudentConfig(model="m", batch_size=24, gradient_accumulation_steps=3, epochs=2.5)
    # global batch 24 = 8 per forward pass x 3 accumulated
    # 100 samples -> 13 batches of 8 -> accumulated by 3: 4 full steps + 1 short one = 5 an epoch -> ceil(2.5 * 5) = 13
    assert optimizer_steps(100, cfg) == 13
    assert optimizer_steps(100, cfg.model_copy(update={"max_steps": 7})) == 7
    # per device: 8 a forward pass whatever the accumulation, the same 13
    assert optimizer_steps(100, cfg.model_copy(update={"batch_size": 8, "batch_scope": "per-device"})) == 13
    # two processes, global 24: 4 per process per pass, 8 together -> the same 13 batches, the same 13 steps
    assert optimizer_steps(100, cfg, world_size=2) == 13
    # per device 8 on two processes: 16 a pass -> 7 batches -> 3 steps an epoch (2 full + 1 short) -> ceil(7.5) = 8
    assert optimizer_steps(100, cfg.model_copy(update={"batch_size": 8, "batch_scope": "per-device"}), world_size=2) == 8


def test_a_global_batch_is_split_over_processes_and_accumulation(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    from kdkit.errors import RecipeError
    from kdkit.stages.preflight import preflight
    from kdkit.training.arguments import per_device_batch

    recipe = validate_recipe(quick_recipe(tmp_path, model_dir, **{"student.batch_size": 48}))
    cfg = recipe.student
    # 48 a step: 48 in one process, 24 each in two, 8 each in three at 2 accumulation steps
    assert per_device_batch(cfg, 1) == 48 and per_device_batch(cfg, 2) == 24
    assert per_device_batch(cfg.model_copy(update={"gradient_accumulation_steps": 2}), 3) == 8
    assert per_device_batch(cfg.model_copy(update={"batch_scope": "per-device"}), 3) == 48
    args = training_arguments(cfg.model_copy(update={"gradient_accumulation_steps": 4}), output_dir=tmp_path, seed=0)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (12, 4)
    # 48 over 5 processes does not divide: the error names the key, at preflight (kdkit validate and run)
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(RecipeError, match=r"student\.batch_size: 48 is the global batch .* over 5 processes x 1 "
                                          r"accumulation step = 5; use a multiple of 5, or set student\.batch_scope"):
        preflight(recipe)
    # five teachers on five processes: each trains alone, so a teacher batch of 7 needs no split
    preflight(validate_recipe(quick_recipe(tmp_path, model_dir, **{"student.batch_size": 45, "teachers.batch_size": 7,
                                                                     "teachers.seeds": [1, 2, 3, 4, 5]})))
    # two teachers on five processes train with DDP: their batch of 16 must divide by 5 as well
    with pytest.raises(RecipeError, match=r"teachers\.batch_size: 16 is the global batch"):
        preflight(validate_recipe(quick_recipe(tmp_path, model_dir, **{"student.batch_size": 45})))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_bf16_on_a_cpu_trains_instead_of_being_refused_by_the_trainer(tmp_path: Path) -> None:
    """transformers refuses bf16 without a GPU unless told to use the CPU (recipes/smollm2_distill.toml on a CPU)."""
    cfg = validate_recipe(quick_recipe(tmp_path, tmp_path / "m", **{"student.precision": "bf16"})).student
    args = training_arguments(cfg, output_dir=tmp_path / "o", seed=0)
    assert args.bf16 and args.use_cpu and args.device.type == "cpu"

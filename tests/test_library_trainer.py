"""kdkit.DistillationTrainer: a Trainer for your own dataset whose rows carry teacher logits (README example)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kdkit
from helpers_models import make_bert, sentences
from kdkit.testing import plugin_registry


def _dataset(tokenizer, rows: int, teachers: int, seed: int = 0):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    data = sentences(rows, seed=seed)
    logits = (torch.randn(rows, teachers, 2, generator=gen) * 2).tolist()
    labels = [r["label"] if i % 2 == 0 else -100 for i, r in enumerate(data)]  # every other row unlabeled
    ds = Dataset.from_dict({"text": [r["sentence"] for r in data], "label": labels, "teacher_logits": logits})
    return ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=24), batched=True)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_the_trainer_distills_from_the_teacher_column(tmp_path: Path, remove_unused_columns: bool) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    directory = make_bert(tmp_path / "m", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory), num_labels=2)
    ds = _dataset(tokenizer, rows=16, teachers=3)
    seen: list[torch.Tensor] = []

    class Recording(kdkit.DistillationLoss):
        def __call__(self, student_logits, teacher_logits, labels):  # type: ignore[override]
            seen.append(teacher_logits.detach().clone())
            return super().__call__(student_logits, teacher_logits, labels)

    loss_fn = Recording(temperature=2.0)
    args = TrainingArguments(
        str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, report_to="none", use_cpu=True,
        remove_unused_columns=remove_unused_columns, save_strategy="no", data_seed=0, seed=0,
    )
    trainer = kdkit.DistillationTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, loss_fn=loss_fn
    )
    result = trainer.train()
    assert trainer.state.global_step == 4 and math.isfinite(result.training_loss)
    # every batch brought its rows' teacher logits, [4 rows, 3 teachers, 2 classes], taken from the dataset
    assert len(seen) == 4 and all(t.shape == (4, 3, 2) for t in seen)
    stored = {tuple(round(x, 5) for x in torch.tensor(r).flatten().tolist()) for r in ds["teacher_logits"]}
    for batch in seen:
        for row in batch:
            assert tuple(round(x, 5) for x in row.flatten().tolist()) in stored


def test_the_loss_is_the_distillation_loss_of_the_batch(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from kdkit_plugins.unikd import CorrectnessPlugin

    directory = make_bert(tmp_path / "m", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory), num_labels=2)
    ds = _dataset(tokenizer, rows=8, teachers=2, seed=3)
    loss_fn = kdkit.DistillationLoss.from_plugins(
        {"unikd-correctness": {}}, registry=plugin_registry(CorrectnessPlugin)
    )
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", use_cpu=True)
    trainer = kdkit.DistillationTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, loss_fn=loss_fn
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "teacher_logits"}
    model.eval()
    got = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch.get("token_type_ids")).logits
    expected = loss_fn(logits, batch["teacher_logits"], batch["labels"]).loss
    assert float(got.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_a_dataset_without_teacher_logits_is_a_clear_error(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    directory = make_bert(tmp_path / "m", layers=1)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForSequenceClassification.from_pretrained(str(directory), num_labels=2)
    ds = Dataset.from_dict({"text": ["good film", "bad film"], "label": [1, 0]}).map(
        lambda b: tokenizer(b["text"]), batched=True
    )
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", use_cpu=True)
    trainer = kdkit.DistillationTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tokenizer, loss_fn=kdkit.DistillationLoss()
    )
    with pytest.raises(kdkit.KdkitError, match="no 'teacher_logits' column"):
        next(iter(trainer.get_train_dataloader()))

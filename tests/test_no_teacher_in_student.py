"""The student stage never instantiates a teacher model when every enabled plugin needs only teacher outputs.

The teachers exist as checkpoints and their logits come from the real cache; then the student stage runs
(``kdkit.stages.students.train_student``) with the paper's plugins enabled while every construction of a transformers
model is recorded. Exactly one classifier may be built: the student. (The pipeline test checks the same for a
whole ``kdkit run`` with the default average; this one is per plugin set, and counts every model construction,
not only ``from_pretrained``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_models import make_bert, quick_recipe, sentences

from kdkit import DistillationLoss, IGNORE_INDEX
from kdkit.modeling import encode, load_tokenizer
from kdkit.tasks.base import TeacherRef
from kdkit.tasks.logit_cache import LogitCache
from kdkit.recipe import validate_recipe
from kdkit.stages.students import train_student
from kdkit.training import EncodedDataset

PLUGIN_SETS = {
    "unikd": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}},
    "aekd": {"aekd": {"C": 0.6}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("models")
    base = make_bert(root / "base", layers=2, seed=0)
    teachers = [
        make_bert(root / f"teacher{i}", layers=2, seed=10 + i, num_labels=2, label_names=["negative", "positive"])
        for i in range(3)
    ]
    return base, teachers


@pytest.mark.parametrize("plugins", list(PLUGIN_SETS))
def test_student_stage_builds_only_the_student(
    plugins: str, models: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    from transformers import PreTrainedModel

    base, teacher_dirs = models
    recipe = validate_recipe(
        quick_recipe(
            tmp_path,
            base,
            **{"student.max_steps": 2, "student.num_layers": 1, "plugins": PLUGIN_SETS[plugins]},
        )
    )
    rows = sentences(40, seed=5)
    labeled = datasets.Dataset.from_list(rows[:20])
    unlabeled = datasets.Dataset.from_list([{"sentence": r["sentence"], "label": IGNORE_INDEX} for r in rows[20:]])
    label_names = ["negative", "positive"]
    refs = [TeacherRef(name=f"teacher-{i}", key=f"t{i}", path=str(d)) for i, d in enumerate(teacher_dirs)]
    logits = LogitCache(tmp_path / "cache", batch_size=8).teacher_logits(
        refs, {"labeled": labeled, "unlabeled": unlabeled}, ["sentence"], label_names, max_length=24
    )
    teacher_logits = torch.cat([logits["labeled"], logits["unlabeled"]])
    assert teacher_logits.shape == (40, 3, 2)

    tokenizer = load_tokenizer(str(base), who="student")
    dataset = EncodedDataset.concat(
        [
            EncodedDataset(encode(tokenizer, labeled, ["sentence"], 24), labeled["label"], kd_index=range(20)),
            EncodedDataset(encode(tokenizer, unlabeled, ["sentence"], 24), [IGNORE_INDEX] * 20, kd_index=range(20, 40)),
        ]
    )
    loss_fn = DistillationLoss.from_plugins(recipe.enabled_plugins())
    assert sorted(p.name for p in loss_fn.plugins) == sorted(PLUGIN_SETS[plugins])

    built: list[tuple[str, int]] = []
    original_init = PreTrainedModel.__init__

    def recording_init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        built.append((type(self).__name__, config.num_hidden_layers))
        original_init(self, config, *args, **kwargs)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the student stage loaded a teacher for prediction")

    monkeypatch.setattr(PreTrainedModel, "__init__", recording_init)
    monkeypatch.setattr("kdkit.tasks.logit_cache.load_model_for_prediction", forbidden)
    run = train_student(
        recipe,
        tokenizer=tokenizer,
        dataset=dataset,
        eval_split=datasets.Dataset.from_list(sentences(8, seed=6)),
        text_columns=["sentence"],
        label_names=label_names,
        seed=1,
        kind="distilled",
        directory=tmp_path / "student",
        teacher_logits=teacher_logits,
        loss_fn=loss_fn,
    )
    assert run.steps == 2
    classifiers = [entry for entry in built if entry[0].endswith("ForSequenceClassification")]
    # one classifier, with the student's single layer (every teacher has two)
    assert classifiers == [("BertForSequenceClassification", 1)]
    assert all(layers == 1 for _, layers in built)

"""Every recipe shipped under recipes/ validates offline, and the paper recipes carry the paper's settings.

The paper's settings (UniKD, Wu et al. 2022): bert-base-uncased teachers and student, five teachers and five
student runs, Adam with learning rate 1e-5, batch size 16, lambda 10, half of the training set labeled. Table 2
compares UniKD with KD-Labeled, AE-KD and KD-Unlabeled.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdkit.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL = sorted(RECIPES.rglob("*.toml"))
TASKS = {
    # task: (text columns, eval split) in GLUE's own layout
    "qqp": (["question1", "question2"], "validation"),
    "sst2": (["sentence"], "validation"),
    "mnli": (["premise", "hypothesis"], "validation_matched"),
    "qnli": (["question", "sentence"], "validation"),
}
# Table 2 baselines: (plugins enabled, streams distilled on)
BASELINES = {
    "kd-labeled": ({"average"}, ["labeled"]),
    "aekd": ({"aekd"}, ["labeled"]),
    "kd-unlabeled": ({"average"}, ["unlabeled"]),
}


def test_the_recipe_folder_holds_the_paper_recipes():
    names = {p.relative_to(RECIPES).as_posix() for p in ALL}
    expected = {f"unikd_{t}.toml" for t in TASKS}
    expected |= {f"baselines/{t}_{b}.toml" for t in TASKS for b in BASELINES}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", ALL, ids=[p.relative_to(RECIPES).as_posix() for p in ALL])
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name


def _paper_settings(recipe, task: str) -> None:
    text, eval_split = TASKS[task]
    data = recipe.data
    assert (data.dataset, data.config, data.text, data.eval_split) == ("nyu-mll/glue", task, text, eval_split)
    assert data.train_split == "train" and data.label == "label"
    assert data.labeled_fraction == 0.5 and data.max_length == 128
    assert recipe.seeds == [1, 2, 3, 4, 5]
    assert recipe.teachers.model == "bert-base-uncased" and recipe.teachers.seeds == [1, 2, 3, 4, 5]
    assert recipe.student.model == "bert-base-uncased"
    for part in (recipe.teachers, recipe.student):
        assert (part.learning_rate, part.batch_size, part.gradient_accumulation_steps) == (1e-5, 16, 1)
        assert part.weight_decay == 0.0 and part.optimizer.startswith("adam")  # Adam: no weight decay
        assert part.precision == "auto" and part.epochs == 3.0 and part.max_steps == -1


@pytest.mark.parametrize("task", TASKS)
def test_unikd_recipes_carry_the_paper_settings(task):
    recipe = load_recipe(RECIPES / f"unikd_{task}.toml")
    _paper_settings(recipe, task)
    assert recipe.distill.on == ["labeled", "unlabeled"]
    enabled = recipe.enabled_plugins()
    assert set(enabled) == {"unikd-correctness", "unikd-disagreement"}
    assert enabled["unikd-disagreement"]["lambda"] == 10


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_recipes(task, baseline):
    recipe = load_recipe(RECIPES / "baselines" / f"{task}_{baseline}.toml")
    _paper_settings(recipe, task)
    plugins, streams = BASELINES[baseline]
    assert set(recipe.enabled_plugins()) == plugins
    assert recipe.distill.on == streams
    # the same data split and teachers as UniKD on this task, so that the comparison (and the teacher cache) is shared
    unikd = load_recipe(RECIPES / f"unikd_{task}.toml")
    assert recipe.data == unikd.data and recipe.teachers == unikd.teachers
    assert recipe.student == unikd.student and recipe.distill.temperature == unikd.distill.temperature
    assert recipe.name != unikd.name

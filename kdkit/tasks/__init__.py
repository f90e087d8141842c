"""Tasks: what depends on the kind of model (see :mod:`kdkit.tasks.base`)."""

from kdkit.recipe.schema import Recipe
from kdkit.tasks.base import StudentSets, Task
from kdkit.tasks.causal_lm import CausalLM
from kdkit.tasks.classification import (
    SequenceClassification,
    classification_metrics,
    ensemble_probabilities,
    metric_names,
)

#: Every task by the name a recipe gives it (``task = ...``), with default settings. Sequence classification is
#: the default; a run takes its task from :func:`task_for`, which configures it from the recipe.
TASKS: dict[str, Task] = {SequenceClassification.name: SequenceClassification(), CausalLM.name: CausalLM()}
DEFAULT_TASK = SequenceClassification.name


def task_for(recipe: Recipe) -> Task:
    """The task of ``recipe`` (its ``task`` key), configured by it."""
    if recipe.task == CausalLM.name:
        return CausalLM.from_recipe(recipe)
    return TASKS[recipe.task]


__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "CausalLM",
    "SequenceClassification",
    "StudentSets",
    "Task",
    "classification_metrics",
    "ensemble_probabilities",
    "metric_names",
    "task_for",
]

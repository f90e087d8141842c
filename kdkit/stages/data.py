"""Stage 1, data: the recipe's splits, checked row by row, and everything that can be refused before any model
is touched (plugins that reject this ensemble, base model directories without weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import Any

from kdkit.data.splits import Splits
from kdkit.plugin.identity import PluginIdentity, plugin_identities
from kdkit.plugin.registry import discover_plugins
from kdkit.recipe.schema import Recipe
from kdkit.runtime import say
from kdkit.store.hashing import arrow_column
from kdkit.tasks import Task, task_for


@dataclass
class RunData:
    """What stage 1 hands on: the splits, the run's distillation loss, and the sizes the results report."""

    splits: Splits
    loss_fn: Any  #: the task's distillation loss (DistillationLoss; TokenDistillationLoss for causal LMs)
    need_unlabeled: bool  #: the run distills on unlabeled rows
    sizes: dict[str, int]  #: rows per part: labeled, unlabeled (0 when not distilled on), tune, eval
    plugins: dict[str, PluginIdentity]  #: the enabled plugins' distribution, version and code fingerprint

    @property
    def label_names(self) -> list[str]:
        return list(self.splits.label_names)

    @property
    def text_columns(self) -> list[str]:
        return list(self.splits.text_columns)

    @property
    def eval_labels(self) -> torch.Tensor:
        return torch.from_numpy(arrow_column(self.splits.eval, "label").to_numpy().astype("int64"))


def load_data(recipe: Recipe, console: object, *, task: Task | None = None) -> RunData:
    """Load and split the data, build the distillation loss and check that its plugins accept this ensemble of
    this many classes (found now, not after hours of teacher training). ``task``: the recipe's by default."""
    task = task or task_for(recipe)
    need_unlabeled = "unlabeled" in recipe.distill.on
    splits = task.load_splits(recipe.data, need_unlabeled)
    registry = discover_plugins(blocked=recipe.blocked_plugins)
    loss_fn = task.distillation_loss(recipe, registry)
    task.check_plugins(loss_fn, recipe.teachers.count, splits, unlabeled=need_unlabeled)
    sizes = {
        "labeled": len(splits.labeled),
        "unlabeled": len(splits.unlabeled) if need_unlabeled else 0,
        "tune": len(splits.tune) if splits.tune is not None else 0,
        "eval": len(splits.eval),
    }
    plugins = plugin_identities(registry, list(recipe.enabled_plugins()))
    data = RunData(splits=splits, loss_fn=loss_fn, need_unlabeled=need_unlabeled, sizes=sizes, plugins=plugins)
    what = f"classes: {', '.join(data.label_names)}" if data.label_names else f"task {task.name}"
    say(console, "  " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"; {what}; {loss_fn!r}")
    return data

"""kdkit: ensemble knowledge distillation with pluggable weighting strategies.

The public API (stable within a minor version; see docs/ARCHITECTURE.md) is what this module exports, plus
``kdkit.testing`` for plugin authors. Everything else may move between releases.
"""

from kdkit._version import __version__
from kdkit.distill.loss import DistillationLoss, DistillationOutput
from kdkit.distill.tokens import TokenDistillationLoss, TokenDistillationOutput, TopKTeachers
from kdkit.errors import DataError, KdkitError, ModelError, PluginError, RecipeError
from kdkit.plugin.base import NoOptions, Options, Plugin
from kdkit.plugin.batch import IGNORE_INDEX, KDBatch
from kdkit.plugin.hookspecs import hookimpl
from kdkit.plugin.registry import PluginRegistry, discover_plugins

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DistillationLoss",
    "DistillationOutput",
    "DistillationTrainer",
    "KDBatch",
    "KdkitError",
    "ModelError",
    "NoOptions",
    "Options",
    "Plugin",
    "PluginError",
    "PluginRegistry",
    "RecipeError",
    "TokenDistillationLoss",
    "TokenDistillationOutput",
    "TopKTeachers",
    "__version__",
    "discover_plugins",
    "hookimpl",
]


def __getattr__(name: str) -> object:
    # DistillationTrainer brings in transformers' Trainer (seconds to import): only when it is asked for
    if name == "DistillationTrainer":
        from kdkit.training.distillation_trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'kdkit' has no attribute {name!r}")

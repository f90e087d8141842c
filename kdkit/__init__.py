"""kdkit: ensemble knowledge distillation with pluggable weighting strategies."""

from kdkit.batch import IGNORE_INDEX, KDBatch
from kdkit.errors import KdkitError, PluginError, RecipeError
from kdkit.loss import DistillationLoss, DistillationOutput
from kdkit.manager import NoOptions, Plugin, PluginRegistry, discover_plugins, hookimpl

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "DistillationLoss",
    "DistillationOutput",
    "KDBatch",
    "KdkitError",
    "NoOptions",
    "Plugin",
    "PluginError",
    "PluginRegistry",
    "RecipeError",
    "__version__",
    "discover_plugins",
    "hookimpl",
]

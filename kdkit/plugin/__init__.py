"""The plugin contract: hook specifications (and how answers combine), the batch view hooks receive, the
``Plugin`` and ``Options`` base classes, and the registry that discovers installed plugins."""

from kdkit.plugin.base import NoOptions, Options, Plugin
from kdkit.plugin.batch import IGNORE_INDEX, REST, STREAMS, KDBatch, Stream
from kdkit.plugin.hookspecs import HOOK_NAMES, hookimpl
from kdkit.plugin.registry import (
    BLOCK_ENV_VAR,
    ENTRY_POINT_GROUP,
    PluginRecord,
    PluginRegistry,
    build_manager,
    check_ensembling_conflicts,
    discover_plugins,
)

__all__ = [
    "BLOCK_ENV_VAR",
    "ENTRY_POINT_GROUP",
    "HOOK_NAMES",
    "IGNORE_INDEX",
    "STREAMS",
    "KDBatch",
    "NoOptions",
    "Options",
    "Plugin",
    "PluginRecord",
    "PluginRegistry",
    "REST",
    "Stream",
    "build_manager",
    "check_ensembling_conflicts",
    "discover_plugins",
    "hookimpl",
]

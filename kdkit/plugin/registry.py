"""Plugin discovery and the per-run plugin manager.

Discovery (:func:`discover_plugins`) reads the ``kdkit`` entry-point group, loads each entry point on its own,
and records what happened to it: a plugin that fails to import, declares no name, misspells a hook or clashes
with another plugin's name is recorded as failed, and the others still work. Nothing is loaded at import time.

A run then builds a fresh :class:`pluggy.PluginManager` holding one instance of each *enabled* plugin
(:meth:`PluginRegistry.build_manager`), so that a hook call reaches only the plugins the recipe switched on.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from kdkit.errors import PluginError, did_you_mean
from kdkit.plugin import hookspecs
from kdkit.plugin.base import Plugin
from kdkit.plugin.batch import STREAMS

ENTRY_POINT_GROUP = "kdkit"
#: Comma-separated plugin names that are never loaded (checked before their module is imported).
BLOCK_ENV_VAR = "KDKIT_BLOCK_PLUGINS"
#: The key of a plugin's options that switches it off (recipes and ``DistillationLoss.from_plugins`` alike).
ENABLED_KEY = "enabled"

class KdkitPluginManager(pluggy.PluginManager):
    """A pluggy manager that treats every ``kdkit_``-prefixed method as a hook implementation.

    Marking with :data:`hookimpl` is still needed for options such as ``trylast``; treating unmarked
    ``kdkit_`` methods as implementations makes ``check_pending`` report a misspelled hook name instead of the
    method being silently ignored.
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("kdkit_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


@dataclass
class PluginRecord:
    """What discovery found under one plugin name."""

    name: str
    status: str  # "ok" | "failed" | "blocked"
    version: str = ""
    hooks: tuple[str, ...] = ()
    distribution: str = ""
    entry_point: str = ""
    error: str = ""
    #: the streams whose teacher weights it sets (:func:`declared_streams`); empty if it sets none
    streams: str = ""
    cls: type[Plugin] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "hooks": list(self.hooks),
            "streams": self.streams,
            "distribution": self.distribution,
            "entry_point": self.entry_point,
            "error": self.error,
        }


def _plugin_hooks(cls: type) -> tuple[str, ...]:
    return tuple(n for n in hookspecs.HOOK_NAMES if callable(getattr(cls, n, None)))


def _is_fallback(cls: type) -> bool:
    """Whether ``cls.kdkit_teacher_weights`` is marked ``@kdkit.hookimpl(trylast=True)``."""
    opts = getattr(getattr(cls, "kdkit_teacher_weights", None), f"{hookspecs.PROJECT}_impl", None) or {}
    return bool(opts.get("trylast"))


def declared_streams(cls: type[Plugin]) -> str:
    """How ``cls`` declares the streams whose teacher weights it sets, in words for ``kdkit plugins``:
    ``"labeled, unlabeled"`` (its ``ensembles``), ``"from options (default: labeled)"`` (it overrides
    ``ensembled_streams()``), ``"fallback"`` (``trylast``, claims none), or ``""`` (it sets no teacher weights)."""
    if not callable(getattr(cls, "kdkit_teacher_weights", None)):
        return ""
    if cls.ensembled_streams is not Plugin.ensembled_streams:
        try:
            default = ", ".join(cls(cls.Options()).ensembled_streams()) or "none"
        except Exception:  # options without defaults, or a constructor that needs more: say what we know
            return "from options"
        return f"from options (default: {default})"
    if cls.ensembles:
        return ", ".join(cls.ensembles)
    return "fallback" if _is_fallback(cls) else ""


def asked_for_teacher_weights(plugin: Plugin, stream: str) -> bool:
    """Whether kdkit asks ``plugin`` for the teacher weights of ``stream``: it claims the stream (its
    ``ensembled_streams()``), or it is a fallback (``trylast``), which answers only where no claimant did."""
    if not callable(getattr(plugin, "kdkit_teacher_weights", None)):
        return False
    return stream in plugin.ensembled_streams() or declared_streams(type(plugin)) == "fallback"


def _check_streams_declared(cls: type[Plugin]) -> None:
    """A plugin that sets teacher weights must say on which streams, or which plugin wins a stream would depend
    on the order plugins are loaded in (pluggy calls the last registered first)."""
    if callable(getattr(cls, "kdkit_teacher_weights", None)) and not declared_streams(cls):
        raise PluginError(
            f"plugin '{cls.name}' implements kdkit_teacher_weights but declares no streams, so whether it or "
            "another ensembling plugin wins would depend on load order. Declare them: `ensembles = (\"labeled\", "
            "\"unlabeled\")` (the streams it sets teacher weights on), or override `ensembled_streams(self)` to "
            "derive them from self.options; only a fallback marked @kdkit.hookimpl(trylast=True) may claim none"
        )


#: A plugin name is a recipe key (``[plugins.<name>]``, ``--set plugins.<name>.x=1``): no dots or spaces.
PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_plugin_class(cls: Any, expected_name: str | None = None) -> None:
    """Raise :class:`PluginError` when ``cls`` is not a usable kdkit plugin class.

    Checks what can be checked without options: the base class, the name (and that it matches the entry point),
    the options model, that every ``kdkit_`` method is a known hook, and that pluggy accepts the hook signatures
    (``check_pending`` on a throwaway manager).
    """
    where = expected_name or getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"{where}: the entry point must name a subclass of kdkit.Plugin, got {cls!r}")
    if not cls.name:
        raise PluginError(f"{where}: plugin class {cls.__qualname__} sets no `name`")
    if not PLUGIN_NAME.match(cls.name):
        raise PluginError(
            f"{where}: plugin name {cls.name!r} may hold only letters, digits, '-' and '_' (it is a recipe key)"
        )
    if expected_name is not None and cls.name != expected_name:
        raise PluginError(
            f"entry point '{expected_name}' names plugin class {cls.__qualname__} whose name is '{cls.name}'; "
            "the two must match"
        )
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel)):
        raise PluginError(f"plugin '{cls.name}': `Options` must be a pydantic model class")
    option_keys = {info.alias or key for key, info in cls.Options.model_fields.items()} | set(cls.Options.model_fields)
    if ENABLED_KEY in option_keys:
        raise PluginError(
            f"plugin '{cls.name}': an option may not be called '{ENABLED_KEY}' (recipes use it to switch off)"
        )
    if cls.Options.model_config.get("extra") != "forbid":
        raise PluginError(
            f"plugin '{cls.name}': its Options model {cls.Options.__qualname__} accepts unknown keys, so a misspelled "
            "option would be ignored; subclass kdkit.Options (or set model_config = ConfigDict(extra='forbid'))"
        )
    unknown = [n for n in dir(cls) if n.startswith("kdkit_") and n not in hookspecs.HOOK_NAMES]
    if unknown:
        hint = did_you_mean(unknown[0], hookspecs.HOOK_NAMES)
        raise PluginError(f"plugin '{cls.name}': unknown hook '{unknown[0]}'{hint}")
    if not _plugin_hooks(cls):
        raise PluginError(f"plugin '{cls.name}' implements none of the hooks {', '.join(hookspecs.HOOK_NAMES)}")
    bad = [s for s in cls.ensembles if s not in STREAMS]
    if bad:
        raise PluginError(f"plugin '{cls.name}': `ensembles` holds unknown stream {bad[0]!r}; use {STREAMS}")
    _check_streams_declared(cls)
    # pluggy checks each hook's arguments against the spec when a plugin is registered; do it now, on a bare
    # instance (no options, no __init__), so that a wrong signature shows in `kdkit plugins`, not mid-run.
    probe = cls.__new__(cls)
    pm = KdkitPluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(probe, name=cls.name)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{cls.name}': {exc}") from None


def blocked_from_env() -> set[str]:
    raw = os.environ.get(BLOCK_ENV_VAR, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


class PluginRegistry:
    """Every plugin discovery saw, by name. ``records`` includes failed and blocked ones."""

    def __init__(self, records: Iterable[PluginRecord] = ()) -> None:
        self.records: dict[str, PluginRecord] = {}
        for record in records:
            self.records[record.name] = record

    # ----------------------------------------------------------------- lookup
    def available(self) -> list[str]:
        return sorted(n for n, r in self.records.items() if r.status == "ok")

    def failures(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.status == "failed"]

    def with_blocked(self, names: Iterable[str]) -> PluginRegistry:
        """A copy in which the plugins ``names`` are blocked (a recipe's ``blocked_plugins``).

        Blocking here comes after loading; to keep a plugin's module from ever being imported, pass the names
        to :func:`discover_plugins` instead (the CLI and :meth:`kdkit.recipe.schema.Recipe.plugin_registry` do).
        """
        names = set(names)
        if not names & set(self.records):
            return self
        records = []
        for record in self.records.values():
            if record.name in names:
                record = PluginRecord(
                    name=record.name,
                    status="blocked",
                    version=record.version,
                    hooks=record.hooks,
                    distribution=record.distribution,
                    entry_point=record.entry_point,
                    error="blocked (blocked_plugins)",
                )
            records.append(record)
        return PluginRegistry(records)

    def get(self, name: str) -> type[Plugin]:
        """The plugin class registered as ``name``; :class:`PluginError` with a suggestion otherwise."""
        record = self.records.get(name)
        if record is None:
            hint = did_you_mean(name, self.records)
            available = ", ".join(self.available()) or "none"
            raise PluginError(f"unknown plugin '{name}'{hint}; installed plugins: {available}")
        if record.status == "blocked":
            how = f"${BLOCK_ENV_VAR}" if record.error.endswith(BLOCK_ENV_VAR) else "the recipe's `blocked_plugins`"
            raise PluginError(f"plugin '{name}' is blocked by {how}; unblock it or switch it off (enabled = false)")
        if record.status != "ok" or record.cls is None:
            raise PluginError(f"plugin '{name}' could not be loaded: {record.error}")
        return record.cls

    def validate_options(self, name: str, options: Mapping[str, Any] | BaseModel | None) -> BaseModel:
        """Validate ``options`` with the plugin's own model; errors are ``pydantic.ValidationError``."""
        cls = self.get(name)
        if isinstance(options, cls.Options):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump()
        return cls.Options.model_validate(dict(options or {}))

    # ----------------------------------------------------------------- per run
    def instantiate(self, enabled: Mapping[str, Mapping[str, Any] | BaseModel | None]) -> list[Plugin]:
        """One instance per enabled plugin, options validated; checks ensembling conflicts.

        ``enabled`` maps plugin names to their options, as a recipe's ``[plugins.<name>]`` tables do: a table
        with ``enabled = False`` switches its plugin off (its options are still checked when the plugin is
        installed, so that switching it back on cannot fail later). Errors name the key path
        (``plugins.aekd.C``) and suggest the option meant when one is misspelled.
        """
        instances = []
        for name, options in enabled.items():
            switched_on, options = _split_enabled(name, options)
            if not switched_on and name in self.records and self.records[name].status != "ok":
                continue  # a switched-off plugin that is installed but cannot load is fine, as in recipes
            cls = self.get(name)
            try:
                validated = self.validate_options(name, options)
            except ValidationError as exc:
                raise PluginError(option_errors(name, cls.Options, exc)) from None
            if switched_on:
                instances.append(cls(validated))
        check_ensembling_conflicts(instances)
        return instances

    def build_manager(self, enabled: Mapping[str, Mapping[str, Any] | BaseModel | None]) -> KdkitPluginManager:
        return build_manager(self.instantiate(enabled))


def _split_enabled(name: str, options: Mapping[str, Any] | BaseModel | None) -> tuple[bool, Any]:
    """``(switched on?, options without the enabled key)``."""
    if not isinstance(options, Mapping) or ENABLED_KEY not in options:
        return True, options
    switched_on = options[ENABLED_KEY]
    if not isinstance(switched_on, bool):
        raise PluginError(f"plugins.{name}.{ENABLED_KEY}: must be true or false (got {switched_on!r})")
    return switched_on, {k: v for k, v in options.items() if k != ENABLED_KEY}


def option_errors(name: str, model: type[BaseModel], exc: ValidationError) -> str:
    """Every error of ``exc`` (validating plugin ``name``'s options) as ``plugins.<name>.<key>: message`` lines,
    with a "did you mean" and the list of options for an unknown key."""
    keys = [info.alias or key for key, info in model.model_fields.items()]
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            same_but_case = [k for k in keys if k.lower() == key.lower()]
            hint = f" (did you mean '{same_but_case[0]}'?)" if same_but_case else did_you_mean(key, keys)
            message = f"unknown option '{key}'{hint}; options of {name}: {', '.join(keys) or 'none'}"
        else:
            message = str(err["msg"])
        lines.append(f"plugins.{name}.{loc}: {message}")
    return "\n".join(lines)


def check_ensembling_conflicts(instances: Iterable[Plugin]) -> None:
    """Two plugins may not both set teacher weights for one stream, nor two fallbacks be enabled together: which
    would win would depend on load order."""
    instances = list(instances)
    fallbacks = [p.name for p in instances if declared_streams(type(p)) == "fallback"]
    if len(fallbacks) > 1:
        raise PluginError(
            f"ensembling conflict: plugins '{fallbacks[0]}' and '{fallbacks[1]}' are both fallbacks for teacher "
            "weights (trylast); disable one of them (enabled = false)"
        )
    owner: dict[str, str] = {}
    for plugin in instances:
        for stream in plugin.ensembled_streams():
            if stream in owner:
                raise PluginError(
                    f"ensembling conflict: plugins '{owner[stream]}' and '{plugin.name}' both set teacher weights "
                    f"for {stream} samples; disable one of them (enabled = false)"
                )
            owner[stream] = plugin.name


def build_manager(instances: Iterable[Plugin]) -> KdkitPluginManager:
    """A fresh plugin manager holding exactly ``instances``, hook names checked."""
    pm = KdkitPluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in instances:
        try:
            pm.register(plugin, name=plugin.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin '{plugin.name}' cannot be registered: {exc}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{exc.plugin}': {exc}") from None
    return pm


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", "") or "<unknown distribution>"


class _Discovery:
    """Records collected during one :func:`discover_plugins` call; a second provider of a name is a clash."""

    def __init__(self, blocked: Iterable[str]) -> None:
        self.from_env = blocked_from_env()
        self.blocked = set(blocked) | self.from_env
        self.records: dict[str, PluginRecord] = {}
        self.clashes: dict[str, list[str]] = {}

    def why_blocked(self, name: str) -> str:
        return f"blocked by ${BLOCK_ENV_VAR}" if name in self.from_env else "blocked (blocked_plugins)"

    def add(self, record: PluginRecord) -> None:
        previous = self.records.get(record.name)
        if previous is not None and previous.status != "blocked":
            self.clashes.setdefault(record.name, [f"{previous.distribution} ({previous.entry_point})"]).append(
                f"{record.distribution} ({record.entry_point})"
            )
            return
        self.records[record.name] = record

    def add_entry_point(self, ep: metadata.EntryPoint) -> None:
        """Load one entry point on its own (unless blocked); whatever goes wrong is recorded, not raised."""
        record = PluginRecord(name=ep.name, status="ok", distribution=_dist_name(ep), entry_point=ep.value)
        if ep.name in self.blocked:
            record.status, record.error = "blocked", self.why_blocked(ep.name)
            self.add(record)
            return
        try:
            cls = ep.load()
            check_plugin_class(cls, expected_name=ep.name)
        except PluginError as exc:
            record.status, record.error = "failed", str(exc)
        except (Exception, SystemExit) as exc:  # a third-party import may raise anything; record it, go on
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            record.cls, record.version, record.hooks = cls, str(cls.version), _plugin_hooks(cls)
            record.streams = declared_streams(cls)
        self.add(record)

    def add_class(self, cls: type[Plugin]) -> None:
        """A plugin class registered in code (tests, notebooks), as if installed."""
        check_plugin_class(cls)
        module = sys.modules.get(cls.__module__)
        where = f"{getattr(module, '__name__', cls.__module__)}:{cls.__qualname__}"
        record = PluginRecord(name=cls.name, status="ok", distribution="<registered in code>", entry_point=where)
        if cls.name in self.blocked:
            record.status, record.error = "blocked", self.why_blocked(cls.name)
        else:
            record.version, record.hooks, record.cls = str(cls.version), _plugin_hooks(cls), cls
            record.streams = declared_streams(cls)
        self.add(record)

    def registry(self) -> PluginRegistry:
        for name, providers in self.clashes.items():
            record = self.records[name]
            record.status, record.cls = "failed", None
            record.error = f"plugin name '{name}' is provided more than once: " + " and ".join(providers)
        return PluginRegistry(self.records.values())


def discover_plugins(
    *,
    blocked: Iterable[str] = (),
    extra: Iterable[type[Plugin]] = (),
    load_entrypoints: bool = True,
    group: str = ENTRY_POINT_GROUP,
) -> PluginRegistry:
    """Find the installed plugins. Each entry point is loaded on its own; failures are recorded, not raised.

    :param blocked: plugin names not to load (added to those in ``$KDKIT_BLOCK_PLUGINS``). Blocking happens
        before the entry point is loaded, so a blocked plugin's module is never imported.
    :param extra: plugin classes to register directly (tests, notebooks), as if installed.
    :param load_entrypoints: ``False`` gives a registry with only ``extra`` (the test helpers use it).
    """
    found = _Discovery(blocked)
    if load_entrypoints:
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, _dist_name(e))):
            found.add_entry_point(ep)
    for cls in extra:
        found.add_class(cls)
    return found.registry()

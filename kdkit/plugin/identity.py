"""What identifies a plugin's behaviour, for keys of reused runs: its distribution, version and a fingerprint of
its code. A plugin author who changes the code (with or without bumping the version) gets a new key, so kdkit
trains the student again instead of handing back the old numbers."""

from __future__ import annotations

import hashlib
import inspect
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from kdkit.plugin.registry import PluginRegistry


class PluginIdentity(BaseModel):
    """One enabled plugin as a run records it."""

    distribution: str
    version: str
    code: str  #: sha256 (shortened) of the source files of the package that defines the plugin class


def _source_files(cls: type) -> list[Path]:
    """The ``.py`` files of the top-level package that defines ``cls`` (its module alone if that is no
    package): a change anywhere the plugin could import from its own package counts."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not file:
        return []
    top = sys.modules.get(cls.__module__.split(".")[0])
    search = getattr(top, "__path__", None)
    if search:
        return sorted(p for root in search for p in Path(root).rglob("*.py") if "__pycache__" not in p.parts)
    return [Path(file)]


@lru_cache(maxsize=256)
def _fingerprint(files: tuple[tuple[str, int, int], ...], fallback: str) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(name.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(Path(name).read_bytes() + b"\x00")
    if not files:
        digest.update(fallback.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def code_fingerprint(cls: type) -> str:
    """sha256 (16 hex digits) of the plugin's source files (cached by path, size and modification time); for a
    class defined where no file exists (a notebook), of its own source, or its qualified name at worst."""
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _source_files(cls))
    fallback = ""
    if not files:
        try:
            fallback = inspect.getsource(cls)
        except (OSError, TypeError):
            fallback = f"{cls.__module__}:{cls.__qualname__}"
    return _fingerprint(files, fallback)


def plugin_identities(registry: PluginRegistry, names: list[str]) -> dict[str, PluginIdentity]:
    """``{name: identity}`` of the plugins ``names`` (enabled and loaded)."""
    out = {}
    for name in names:
        record = registry.records[name]
        cls = registry.get(name)
        out[name] = PluginIdentity(distribution=record.distribution, version=record.version, code=code_fingerprint(cls))
    return out

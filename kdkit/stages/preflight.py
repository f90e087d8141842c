"""Stage 0, preflight: what can be refused before any data is read or any model loaded, so that a run never
fails minutes (or hours) in on something ``kdkit validate`` could have said.

Checked here, each problem reported with its recipe key: ``output_dir`` and ``cache_dir`` can be created and
written; every model reference resolves (a local folder that exists, an installed package, or a hub id the hub
or its local cache can serve) and a local checkpoint holds weights (unless a ``config`` table builds a fresh
model from it: then its config.json is enough); a GGUF reference names a file its package holds (converting it
waits for the run); ``data.max_length`` fits each model's position embeddings when its config can be read without
the network (a local folder, a package, the hub cache; the stages check the others when the model loads); a
global ``batch_size`` divides evenly over the processes and accumulation steps that will share it; weights sharded
by the Trainer (``trainer.fsdp``, ``trainer.deepspeed``) need several processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdkit.errors import KdkitError, RecipeError
from kdkit.modeling.loading import position_limit
from kdkit.modeling.refs import (
    HUB_UNREACHABLE,
    check_weights,
    describe,
    gguf_file,
    hub_config_file,
    is_local,
    resolve_model_ref,
)
from kdkit.recipe.schema import ModelRef, PackageModel, Recipe
from kdkit.runtime import world_size
from kdkit.training.arguments import asks_for_sharding, per_device_batch, sharding_problem


def preflight(recipe: Recipe, source: str = "<recipe>", *, hub_needed: str = "error", launched: bool = True) -> None:
    """:raises RecipeError: listing every problem found, each with its dotted key.

    :param hub_needed: what a hub id that is not in the local hub cache while the hub is switched off is:
        ``"error"`` (``kdkit run``: loading it would fail) or ``"skip"`` (``kdkit validate``: the recipe may be
        meant for a machine that reaches the hub).
    :param launched: this process is one of those that will train (``kdkit run``); ``False`` for ``kdkit
        validate``, which may check on one process a recipe meant for torchrun (weights sharded by the Trainer).
    """
    problems = _directory_problem("output_dir", recipe.output_dir) + _directory_problem("cache_dir", recipe.cache_dir)
    problems += _batch_problems(recipe, world_size())
    if launched:
        problems += _sharding_problems(recipe, world_size())
    for key, who, ref, weights in _model_refs(recipe):
        for place, message in _model_problems(key, who, ref, recipe.data.max_length, weights):
            if not (hub_needed == "skip" and HUB_UNREACHABLE in message):
                problems.append((place, message))
    if problems:
        raise RecipeError(source, problems)


def _model_refs(recipe: Recipe) -> list[tuple[str, str, ModelRef, bool]]:
    """``(recipe key, how messages name the model, reference, whether it must hold weights)`` of every model the
    recipe loads (a ``config`` table builds a fresh model: its reference gives the config and tokenizer only)."""
    student = recipe.student
    refs: list[tuple[str, str, ModelRef, bool]] = [("student.model", "student", student.model, not student.config)]
    if recipe.teachers.model is not None:
        refs.append(("teachers.model", "teachers.model", recipe.teachers.model, not recipe.teachers.config))
    for i, ref in enumerate(recipe.teachers.checkpoints or []):
        refs.append((f"teachers.checkpoints.{i}", f"teacher {i + 1} ({describe(ref)})", ref, True))
    return refs


def _batch_problems(recipe: Recipe, processes: int) -> list[tuple[str, str]]:
    """A global batch that cannot be split evenly: the student's over every process; the teachers' over their
    accumulation steps (a teacher trained alone) and, where some teacher will train with DDP (fewer teachers than
    processes, some left over after dealing them one per process, or weights the Trainer shards), over every
    process too. A teacher left over only because others are cached is checked when the teachers are scheduled,
    still before any trains."""
    checks = [("student", recipe.student, processes), ("teachers", recipe.teachers, 1)]
    count = recipe.teachers.count if recipe.teachers.checkpoints is None else 0
    if count and processes > 1 and (count % processes or asks_for_sharding(recipe.teachers)):
        checks.append(("teachers", recipe.teachers, processes))
    problems = []
    for where, cfg, parts in checks:
        try:
            per_device_batch(cfg, parts, where)
        except KdkitError as exc:
            problem = (f"{where}.batch_size", str(exc).removeprefix(f"{where}.batch_size = "))
            if problem not in problems:
                problems.append(problem)
    return problems


def _sharding_problems(recipe: Recipe, processes: int) -> list[tuple[str, str]]:
    """A ``trainer`` table that shards the weights (FSDP, DeepSpeed) of a model that one process trains."""
    trained_teachers = recipe.teachers.checkpoints is None
    found = [sharding_problem(recipe.student, processes, "student")]
    if trained_teachers:
        found.append(sharding_problem(recipe.teachers, processes, "teachers"))
    return [problem for problem in found if problem is not None]


def _directory_problem(key: str, value: str) -> list[tuple[str, str]]:
    """A folder kdkit must create and write: not a file, not under a file, writable where it will be made."""
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return [(key, f"'{value}' is a file, not a folder")]
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [(key, f"'{value}' cannot be created: {existing} is a file")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [(key, f"'{value}' cannot be written: no write permission on {existing}")]
    return []


def _model_problems(key: str, who: str, ref: ModelRef, max_length: int, weights: bool = True) -> list[tuple[str, str]]:
    try:
        if isinstance(ref, PackageModel) and ref.gguf is not None:
            gguf_file(ref)  # its position limit is checked once it is converted
            return []
        resolved = resolve_model_ref(ref)
        if weights:
            check_weights(resolved, who)
        elif is_local(resolved) and not (Path(resolved) / "config.json").is_file():
            return [(key, f"{resolved} has no config.json to build the model from")]
    except KdkitError as exc:
        return [(key, str(exc).removeprefix(f"{key}: "))]
    config_file = Path(resolved) / "config.json" if is_local(resolved) else hub_config_file(resolved)
    limit = _position_limit(config_file) if config_file is not None else None
    if limit is not None and max_length > limit:
        return [
            (
                "data.max_length",
                f"{max_length} is more than {key} has positions ({limit}, config.json); texts that long would not "
                f"fit: use data.max_length <= {limit}",
            )
        ]
    return []


def _position_limit(config_file: Path) -> int | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return position_limit(config) if isinstance(config, dict) else None

"""Loading recipes: TOML parsing with line-accurate syntax errors, ``--set`` overrides, and validation of the
whole recipe (structure, every plugin table with the plugin's own options model, then a dry run of the
enabled plugins) before any data or model is touched."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdkit.distill.loss import DistillationLoss, check_plugins_accept
from kdkit.errors import KdkitError, RecipeError
from kdkit.plugin.registry import PluginRegistry, discover_plugins
from kdkit.recipe.messages import got_text, problems_from
from kdkit.recipe.schema import ENABLED_KEY, Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOML_PLACE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def parse_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; every failure is a :class:`RecipeError` naming the file (and line for syntax)."""
    source = str(path)
    if not path.exists():
        raise RecipeError(source, [("", "file not found")])
    if path.is_dir():
        raise RecipeError(source, [("", "is a directory, not a recipe file")])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(source, [("", f"cannot be read: {exc.strerror or exc}")]) from None
    if not raw.strip():
        raise RecipeError(source, [("", "file is empty: a recipe needs at least `name`, [data], [teachers], [student]")])
    if b"\x00" in raw:
        raise RecipeError(source, [("", "contains NUL bytes: this is a binary file, not a TOML recipe")])
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (as some Windows editors write) is not part of the TOML
    except UnicodeDecodeError as exc:
        raise RecipeError(
            source, [("", f"is not UTF-8 text (bad byte at offset {exc.start}): a binary file, not a TOML recipe")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [("", _syntax_message(str(exc), text))]) from None
    except RecursionError:
        raise RecipeError(source, [("", f"arrays or tables are nested too deeply (at most {MAX_NESTING} levels)")]) from None
    problem = _nesting_problem(data)
    if problem:
        raise RecipeError(source, [problem])
    return data


#: How deeply arrays and tables may nest in a recipe. Real recipes use 3 or 4 levels; a limit keeps a
#: pathological file from exhausting Python's recursion limit in the parser, validation or hashing.
MAX_NESTING = 32


def _nesting_problem(data: Any) -> tuple[str, str] | None:
    """``(dotted path, message)`` of the first place nested more than :data:`MAX_NESTING` levels, or None."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_NESTING:
            return path, f"nested {depth} levels deep; at most {MAX_NESTING}"
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(node))
    return None


def _syntax_message(message: str, text: str) -> str:
    match = _TOML_PLACE.search(message)
    if match is None:
        return f"TOML syntax error: {message}"
    line, column = int(match.group(1)), int(match.group(2))
    reason = message[: match.start()]
    lines = text.splitlines()
    shown = lines[line - 1] if 0 < line <= len(lines) else ""
    gutter = f"{line} | "
    return (
        f"TOML syntax error at line {line}, column {column}: {reason}\n"
        f"    {gutter}{shown}\n"
        f"    {' ' * len(gutter)}{' ' * (column - 1)}^"
    )


def validate_recipe(data: Mapping[str, Any], source: str = "<recipe>", registry: PluginRegistry | None = None) -> Recipe:
    """Validate a recipe mapping as a whole: structure, every plugin table's options, then conflicts.

    Every problem is collected before anything is raised, so that one run of ``kdkit validate`` shows them all.
    A plugin table switched off (``enabled = false``) is still validated, so that switching it back on cannot
    fail later.

    :param registry: a :class:`kdkit.PluginRegistry`; by default the installed plugins. The recipe's
        ``blocked_plugins`` are blocked in either case (before loading, when kdkit discovers the plugins).
    :raises RecipeError: listing every problem found, each with its dotted key path.
    """
    problems: list[tuple[str, str]] = []
    recipe: Recipe | None = None
    try:
        # strict: TOML has real booleans and numbers, so "yes" for a boolean or "16" for an integer is a mistake
        recipe = Recipe.model_validate(dict(data), strict=True)
    except ValidationError as exc:
        problems.extend(problems_from(exc, Recipe))

    if recipe is not None:
        tables: Any = recipe.plugins
        blocked = list(recipe.blocked_plugins)
    else:  # the structure is broken somewhere; still check the plugin tables that can be checked
        tables = data.get("plugins")
        raw_blocked = data.get("blocked_plugins", [])
        blocked = [b for b in raw_blocked if isinstance(b, str)] if isinstance(raw_blocked, list) else []
    if isinstance(tables, Mapping) and tables:
        if registry is None:
            registry = discover_plugins(blocked=blocked)
        else:
            registry = registry.with_blocked(blocked)
        problems.extend(_plugin_problems(tables, registry))
    if recipe is not None:
        problems.extend(recipe.cross_problems())
    if problems:
        raise RecipeError(source, problems)
    assert recipe is not None
    if recipe.enabled_plugins():
        assert registry is not None
        try:
            instances = registry.instantiate(recipe.enabled_plugins())
        except KdkitError as exc:
            raise RecipeError(source, [("plugins", str(exc))]) from None
        problem = _dry_run(recipe, instances)
        if problem:
            raise RecipeError(source, [("plugins", problem)])
    return recipe


def _dry_run(recipe: Recipe, instances: list[Any]) -> str:
    """Call the enabled plugins once on a made-up batch with the recipe's number of teachers, so that a plugin
    refusing this ensemble (one teacher for disagreement, ``C * N < 1`` for AE-KD) is reported by
    ``kdkit validate`` rather than after the data is loaded."""
    teachers = recipe.teachers.count
    classes = len(recipe.data.label_names) if recipe.data.label_names else 2
    try:
        loss = DistillationLoss(instances, temperature=recipe.distill.temperature, on=recipe.distill.on)
        check_plugins_accept(loss, teachers, classes, unlabeled="unlabeled" in recipe.distill.on)
    except KdkitError as exc:
        return f"with {teachers} teacher{'s' if teachers != 1 else ''}: {exc}"
    except Exception as exc:  # a plugin bug: say which batch makes it fail instead of printing a traceback
        names = ", ".join(p.name for p in instances)
        return (
            f"the enabled plugins ({names}) fail on a test batch of {teachers} teachers and {classes} classes: "
            f"{type(exc).__name__}: {exc}"
        )
    return ""


def _plugin_problems(tables: Mapping[str, Any], registry: PluginRegistry) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            continue  # reported by the structural check ("must be a table")
        path = f"plugins.{name}"
        enabled = table.get(ENABLED_KEY, True)
        if not isinstance(enabled, bool):
            problems.append((f"{path}.{ENABLED_KEY}", f"must be true or false{got_text(enabled)}"))
            continue
        try:
            cls = registry.get(name)
        except KdkitError as exc:
            # A switched-off plugin that is installed but broken or blocked cannot be checked; that is fine.
            # An unknown name is reported either way: it is most likely a typo.
            if enabled or name not in registry.records:
                problems.append((path, str(exc)))
            continue
        options = {k: v for k, v in table.items() if k != ENABLED_KEY}
        try:
            cls.Options.model_validate(options)
        except ValidationError as exc:
            problems.extend(problems_from(exc, cls.Options, prefix=path + "."))
    return problems


def load_recipe(
    path: str | Path, registry: PluginRegistry | None = None, overrides: Mapping[str, Any] | None = None
) -> Recipe:
    """Read and validate a recipe file. ``overrides`` maps dotted keys to values (``--set``), applied before
    validation."""
    path = Path(path)
    data = parse_toml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return validate_recipe(data, source=str(path), registry=registry)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating tables as needed.

    An integer set where the recipe holds a float becomes that float (``lambda=5`` over ``lambda = 10.0`` sets
    ``5.0``): the same setting must make the same run, and student run folders are named by a hash of the
    settings' JSON, where ``5`` and ``5.0`` differ (plugin tables are kept as written, not coerced by a schema)."""
    parts = dotted.split(".")
    if not all(part.strip() for part in parts):
        raise RecipeError("--set", [(dotted, "empty part in the dotted key")])
    parts = [part.strip() for part in parts]
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError("--set", [(".".join(parts[: i + 1]), f"is a value ({child!r}), not a table")])
        node = child
    current = node.get(parts[-1])
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    node[parts[-1]] = value


def parse_override(expression: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``; ``value`` is read as a TOML value (``1e-5``, ``true``, ``"x"``,
    ``[1, 2]``, ``{a = 1}``) and, when it is not one, kept as a plain string (``bert-base-uncased``)."""
    key, sep, text = expression.partition("=")
    key = key.strip()
    if not sep:
        raise RecipeError("--set", [(key, f"expected KEY=VALUE, got {expression!r}")])
    if not key:
        raise RecipeError("--set", [("", f"no key before '=' in {expression!r}")])
    text = text.strip()
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    except RecursionError:
        raise RecipeError("--set", [(key, f"the value is nested too deeply (at most {MAX_NESTING} levels)")]) from None
    problem = _nesting_problem(value)
    if problem:
        raise RecipeError("--set", [(key, problem[1])])
    return key, value


def parse_overrides(expressions: Sequence[str]) -> dict[str, Any]:
    """``--set`` expressions -> ``{dotted key: value}``; a later expression for the same key wins (and is
    applied last)."""
    values: dict[str, Any] = {}
    for expression in expressions:
        key, value = parse_override(expression)
        values.pop(key, None)
        values[key] = value
    return values

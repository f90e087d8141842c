"""Recipes: validated as a whole, every error with its dotted path and a suggestion; `enabled = false`; --set;
the JSON Schema; and the reference in docs/RECIPES.md covering every key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import kdkit
from kdkit.errors import RecipeError
from kdkit.plugin.registry import discover_plugins
from kdkit.recipe.load import _syntax_message
from kdkit.recipe.messages import _is_model, _union_members, _unwrap
from kdkit.recipe import (
    Recipe,
    load_recipe,
    parse_override,
    parse_toml,
    recipe_json_schema,
    set_dotted,
    validate_recipe,
)
from kdkit.testing import plugin_registry

DOCS = Path(__file__).resolve().parent.parent / "docs" / "RECIPES.md"


def base(**extra) -> dict:
    recipe = {
        "name": "r",
        "data": {"dataset": "some/dataset", "text": ["sentence"]},
        "teachers": {"model": "some/model"},
        "student": {"model": "some/model"},
    }
    recipe.update(extra)
    return recipe


# ----------------------------------------------------------------- small plugins defined here
class Depth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    levels: int = Field(2, ge=1)


class ScaleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    factor: float = Field(2.0, gt=0)
    mode: Literal["plain", "squared"] = "plain"
    shift_: float = Field(0.0, alias="shift")
    depth: Depth = Field(default_factory=Depth)


class Scale(kdkit.Plugin):
    """Multiplies the sample weight of every sample by `factor` (or its square)."""

    name = "scale"
    version = "1.0"
    Options = ScaleOptions
    calls = 0

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batch):
        type(self).calls += 1
        factor = self.options.factor ** (2 if self.options.mode == "squared" else 1)
        return torch.full((batch.size,), factor)


class Claims(kdkit.Plugin):
    name = "claims"
    ensembles = ("labeled",)

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch):
        return None


class AlsoClaims(Claims):
    name = "also-claims"


REGISTRY = plugin_registry(Scale, Claims, AlsoClaims)


def problems(data, registry=REGISTRY) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, registry=registry)
    return info.value.problems


def only(data, registry=REGISTRY) -> tuple[str, str]:
    [problem] = problems(data, registry)
    return problem


# ----------------------------------------------------------------- structure
def test_a_minimal_recipe_gets_the_documented_defaults():
    recipe = validate_recipe(base(), registry=REGISTRY)
    assert recipe.seeds == [1]
    assert recipe.distill.on == ["labeled", "unlabeled"] and recipe.distill.temperature == 1.0
    assert recipe.teachers.seeds == [1, 2, 3] and recipe.teachers.count == 3
    assert recipe.plugins == {} and recipe.enabled_plugins() == {}


@pytest.mark.parametrize(
    ("data", "path", "suggestion"),
    [
        (base(nmae="x"), "nmae", "name"),
        (base(data={"dataset": "d", "text": ["t"], "lable": "y"}), "data.lable", "label"),
        (base(teachers={"model": "m", "lerning_rate": 1e-5}), "teachers.lerning_rate", "learning_rate"),
        (base(student={"model": "m", "batch_sise": 8}), "student.batch_sise", "batch_size"),
        (base(distill={"temprature": 2.0}), "distill.temprature", "temperature"),
        (base(student={"model": {"package": "p", "pth": "model"}}), "student.model.pth", "path"),
        (base(plugins={"scale": {"factr": 2}}), "plugins.scale.factr", "factor"),
        (base(plugins={"scale": {"shfit": 1.0}}), "plugins.scale.shfit", "shift"),  # an alias is the key
        (base(plugins={"scale": {"depth": {"levles": 3}}}), "plugins.scale.depth.levles", "levels"),
    ],
)
def test_misspelled_keys_at_every_level(data, path, suggestion):
    where, message = only(data)
    assert where == path
    assert message.startswith(f"unknown key '{path.rsplit('.', 1)[-1]}' (did you mean '{suggestion}'?); allowed: ")
    assert suggestion in message.split("allowed: ")[1].split(", ")


def test_a_key_far_from_any_allowed_one_lists_them_without_a_guess():
    where, message = only(base(distill={"xyzzy": 1}))
    assert (where, message) == ("distill.xyzzy", "unknown key 'xyzzy'; allowed: on, temperature")


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        (base(seeds=3), "seeds", "must be an array (got 3)"),
        (base(seeds=[]), "seeds", "must have at least 1 item after validation, not 0 (got [])"),
        (base(data="x.csv"), "data", "must be a table (got 'x.csv')"),
        (base(student={"model": "m", "batch_size": "big"}), "student.batch_size", "must be an integer (got 'big')"),
        (base(student={"model": "m", "batch_size": 1.5}), "student.batch_size", "must be an integer (got 1.5)"),
        (base(student={"model": "m", "learning_rate": 0}), "student.learning_rate", "must be greater than 0 (got 0)"),
        (base(student={"model": "m", "gradient_checkpointing": "yes"}), "student.gradient_checkpointing", "must be true or false (got 'yes')"),
        (base(student={"model": "m", "gradient_checkpointing": 1}), "student.gradient_checkpointing", "must be true or false (got 1)"),
        (base(student={"model": "m", "batch_size": "16"}), "student.batch_size", "must be an integer (got '16')"),
        (base(student={"model": 7}), "student.model", "must be a string or a table (got 7)"),
        (base(teachers={"checkpoints": ["a", 3]}), "teachers.checkpoints.1", "must be a string or a table (got 3)"),
        (base(student={"model": "m", "precision": "bf61"}), "student.precision", "must be one of 'auto', 'fp32', 'bf16', 'fp16' (got 'bf61') (did you mean 'bf16'?)"),
        (base(plugins={"scale": 3}), "plugins.scale", "must be a table (got 3)"),
        (base(plugins={"scale": {"mode": "sqared"}}), "plugins.scale.mode", "must be one of 'plain', 'squared' (got 'sqared') (did you mean 'squared'?)"),
        (base(plugins={"scale": {"factor": -1}}), "plugins.scale.factor", "must be greater than 0 (got -1)"),
        (base(plugins={"scale": {"depth": {"levels": 0}}}), "plugins.scale.depth.levels", "must be greater than or equal to 1 (got 0)"),
        (base(plugins={"scale": {"enabled": "no"}}), "plugins.scale.enabled", "must be true or false (got 'no')"),
    ],
)
def test_wrong_values_are_described_in_toml_words(data, path, message):
    assert only(data) == (path, message)


def test_missing_and_conflicting_tables():
    assert problems({"name": "r"}) == [
        ("data", "required key is missing"),
        ("teachers", "required key is missing"),
        ("student", "required key is missing"),
    ]
    where, message = only(base(teachers={"model": "m", "checkpoints": ["c"]}))
    assert where == "teachers" and "exactly one of `model`" in message


@pytest.mark.parametrize(
    ("on", "message"),
    [
        ([], "`on` is empty"),
        (["unlabled"], "unknown stream 'unlabled' (did you mean 'unlabeled'?)"),
        (["labeled", "labeled"], "lists a stream twice"),
    ],
)
def test_distill_on(on, message):
    where, text = only(base(distill={"on": on}))
    assert where == "distill.on" and message in text


def test_every_problem_is_collected_plugins_included():
    data = base(nmae="x", plugins={"scael": {}, "scale": {"factor": 0}})
    data["student"]["epochs"] = -1
    assert sorted(p for p, _ in problems(data)) == ["nmae", "plugins.scael", "plugins.scale.factor", "student.epochs"]


# ----------------------------------------------------------------- plugins in a recipe
def test_unknown_plugin_suggests_and_lists_the_available_ones():
    where, message = only(base(plugins={"scael": {}}))
    assert where == "plugins.scael"
    assert message == "unknown plugin 'scael' (did you mean 'scale'?); installed plugins: also-claims, claims, scale"


def test_an_unknown_plugin_is_reported_even_when_switched_off():
    assert only(base(plugins={"scael": {"enabled": False}}))[0] == "plugins.scael"


def test_ensembling_conflict_names_both_plugins():
    where, message = only(base(plugins={"claims": {}, "also-claims": {}}))
    assert where == "plugins"
    assert "ensembling conflict: plugins 'claims' and 'also-claims' both set teacher weights for labeled samples" in message
    # switching one off resolves it
    validate_recipe(base(plugins={"claims": {}, "also-claims": {"enabled": False}}), registry=REGISTRY)


def test_a_switched_off_plugin_keeps_its_options_and_they_are_still_validated():
    recipe = validate_recipe(base(plugins={"scale": {"enabled": False, "factor": 3.0}}), registry=REGISTRY)
    assert recipe.plugins["scale"] == {"enabled": False, "factor": 3.0}
    assert recipe.enabled_plugins() == {}
    assert only(base(plugins={"scale": {"enabled": False, "factor": -3.0}})) == (
        "plugins.scale.factor",
        "must be greater than 0 (got -3.0)",
    )
    assert only(base(plugins={"scale": {"enabled": False, "fator": 3.0}}))[0] == "plugins.scale.fator"


def test_the_loss_built_from_a_recipe_never_calls_a_switched_off_plugin():
    student = torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]])
    teachers = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
    labels = torch.tensor([0, -100, 1])

    on = validate_recipe(base(plugins={"scale": {"factor": 3.0}}), registry=REGISTRY)
    off = validate_recipe(base(plugins={"scale": {"factor": 3.0, "enabled": False}}), registry=REGISTRY)
    none = validate_recipe(base(), registry=REGISTRY)

    Scale.calls = 0
    with_scale = on.distillation_loss(REGISTRY)(student, teachers, labels)
    assert Scale.calls == 2  # once per stream: labeled and unlabeled
    Scale.calls = 0
    switched_off = off.distillation_loss(REGISTRY)(student, teachers, labels)
    assert Scale.calls == 0
    plain = none.distillation_loss(REGISTRY)(student, teachers, labels)

    assert torch.equal(switched_off.per_sample, plain.per_sample)
    assert torch.allclose(with_scale.per_sample, 3.0 * plain.per_sample)
    # the plain loss, by hand: average teacher, kd = CE(target, p_s), task = CE(p_s, y), s = k = 1
    probs_t = torch.softmax(teachers.double(), dim=-1).mean(dim=1)
    log_ps = torch.log_softmax(student.double(), dim=-1)
    kd = -(probs_t * log_ps).sum(-1)
    task = torch.tensor([-log_ps[0, 0], 0.0, -log_ps[2, 1]], dtype=torch.float64)
    assert plain.loss.item() == pytest.approx((kd + task).mean().item(), rel=1e-6)


def test_the_loss_follows_distill_on_and_temperature():
    recipe = validate_recipe(base(distill={"on": ["labeled"], "temperature": 2.0}), registry=REGISTRY)
    loss = recipe.distillation_loss(REGISTRY)
    assert loss.on == ("labeled",) and loss.temperature == 2.0


def test_blocked_plugins_in_the_recipe_apply_to_a_given_registry():
    assert "blocked" in only(base(blocked_plugins=["scale"], plugins={"scale": {}}))[1]
    validate_recipe(base(blocked_plugins=["scale"], plugins={"scale": {"enabled": False}}), registry=REGISTRY)


class NeedsPairs(kdkit.Plugin):
    name = "needs-pairs"

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batch):
        if batch.num_teachers < 2:
            raise kdkit.PluginError(f"needs-pairs needs 2 teachers, got {batch.num_teachers}")
        return None


class Buggy(kdkit.Plugin):
    name = "buggy"

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return torch.ones(batch.size) / 0 + [1]  # a TypeError, as a plugin bug would be


def test_plugins_are_tried_on_a_batch_shaped_like_the_recipe():
    registry = plugin_registry(NeedsPairs, Buggy)
    two = base(teachers={"model": "m", "seeds": [1, 2]}, plugins={"needs-pairs": {}})
    validate_recipe(two, registry=registry)
    one = base(teachers={"model": "m", "seeds": [1]}, plugins={"needs-pairs": {}})
    assert only(one, registry) == ("plugins", "with 1 teacher: needs-pairs needs 2 teachers, got 1")
    given = base(teachers={"checkpoints": ["a"]}, plugins={"needs-pairs": {}})  # N counts checkpoints too
    assert only(given, registry)[1].startswith("with 1 teacher:")
    where, message = only(base(plugins={"buggy": {}}), registry)
    assert where == "plugins"
    assert message.startswith("the enabled plugins (buggy) fail on a test batch of 3 teachers and 2 classes: TypeError")
    validate_recipe(base(plugins={"buggy": {"enabled": False}}), registry=registry)  # off: never called


def test_builtins_refusing_the_ensemble_are_reported_by_validate():
    one_teacher = base(teachers={"model": "m", "seeds": [1]}, plugins={"unikd-disagreement": {}})
    assert "unikd-disagreement needs at least 2 teachers" in only(one_teacher, discover_plugins())[1]
    small_cap = base(plugins={"aekd": {"C": 0.2}})  # three teachers: weights of at most 0.2 cannot sum to 1
    assert "infeasible" in only(small_cap, discover_plugins())[1]
    validate_recipe(base(plugins={"aekd": {"C": 0.34}}), registry=discover_plugins())


def test_builtin_plugin_options_are_validated_by_their_own_models():
    registry = discover_plugins()
    found = problems(
        base(
            plugins={
                "unikd-correctness": {"teacher_weighting": "inverse_loss"},
                "unikd-disagreement": {"lambda": -1.0},
                "aekd": {"C": 0, "enabled": False},
            }
        ),
        registry,
    )
    assert [p for p, _ in found] == [
        "plugins.unikd-correctness.teacher_weighting",
        "plugins.unikd-disagreement.lambda",
        "plugins.aekd.C",
    ]
    assert "(did you mean 'inverse-loss'?)" in found[0][1]


# ----------------------------------------------------------------- files
def test_toml_files(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[data]\ndataset = "d"\ntext = ["t"]\n[teachers]\nmodel = "m"\n[student]\nmodel = "m"\n')
    assert load_recipe(path, registry=REGISTRY).name == "r"

    cases = {
        "syntax": (b'name = "r"\nseeds = [1,\n  2\nx = 1\n', "TOML syntax error at line 4"),
        "empty": (b"", "file is empty"),
        "nul": (b"name = 1\x00", "binary file"),
        "latin-1": ('name = "caf\u00e9"\n'.encode("latin-1"), "is not UTF-8 text (bad byte at offset 11)"),
    }
    for label, (content, expected) in cases.items():
        bad = tmp_path / f"{label}.toml"
        bad.write_bytes(content)
        with pytest.raises(RecipeError) as info:
            parse_toml(bad)
        assert info.value.source == str(bad)
        assert expected in str(info.value), label
        assert str(info.value).startswith(f"{bad}: ")
    with pytest.raises(RecipeError, match="file not found"):
        parse_toml(tmp_path / "absent.toml")


def test_a_syntax_error_shows_the_line_and_column():
    message = _syntax_message("Invalid value (at line 2, column 5)", "a = 1\nb = \n")
    # the caret sits under column 5 of the quoted line: 8 characters of "    2 | ", then 4 of "b = "
    assert message == "TOML syntax error at line 2, column 5: Invalid value\n    2 | b = \n" + " " * 12 + "^"
    assert _syntax_message("Invalid value (at end of document)", "") == "TOML syntax error: Invalid value (at end of document)"


# ----------------------------------------------------------------- --set
@pytest.mark.parametrize(
    ("expression", "key", "value"),
    [
        ("a.b=1e-5", "a.b", 1e-5),
        ("a=true", "a", True),
        ("a=false", "a", False),
        ('a="x y"', "a", "x y"),
        ("a='x'", "a", "x"),
        ("a=[1, 2]", "a", [1, 2]),
        ("a={b = 1}", "a", {"b": 1}),
        ("a=7", "a", 7),
        ("a=bert-base-uncased", "a", "bert-base-uncased"),
        ("a=nyu-mll/glue", "a", "nyu-mll/glue"),
        ("a=x=y", "a", "x=y"),
        (" a.b = 2 ", "a.b", 2),
        ("a=", "a", ""),
    ],
)
def test_parse_override(expression, key, value):
    assert parse_override(expression) == (key, value)
    assert type(parse_override(expression)[1]) is type(value)


def test_set_dotted_creates_tables_and_refuses_to_descend_into_a_value():
    data = {"a": {"b": 1}, "c": 2}
    set_dotted(data, "a.d.e", 3)
    set_dotted(data, "plugins.unikd-disagreement.lambda", 15)
    assert data == {"a": {"b": 1, "d": {"e": 3}}, "c": 2, "plugins": {"unikd-disagreement": {"lambda": 15}}}
    with pytest.raises(RecipeError) as info:
        set_dotted(data, "c.x", 1)
    assert info.value.problems == [("c", "is a value (2), not a table")]
    with pytest.raises(RecipeError):
        parse_override("no-equals-sign")


def test_an_integer_set_over_a_float_is_that_float_so_the_same_setting_makes_the_same_run():
    # student run folders are named by a hash of the settings' JSON, where 5 and 5.0 differ: `kdkit run --set
    # lambda=5` over `lambda = 10.0` must be the run `kdkit sweep` makes for lambda 5 (found by the suite, whose
    # `kdkit run` steps trained the sweep's runs a second time)
    data = {"plugins": {"p": {"lam": 10.0, "n": 3, "flag": 1.0}}}
    set_dotted(data, "plugins.p.lam", 5)
    set_dotted(data, "plugins.p.n", 4)  # int over int: unchanged
    set_dotted(data, "plugins.p.flag", True)  # a bool is not a number here
    set_dotted(data, "plugins.p.new", 7)  # nothing to take the type from
    assert data == {"plugins": {"p": {"lam": 5.0, "n": 4, "flag": True, "new": 7}}}
    assert [type(data["plugins"]["p"][k]) for k in ("lam", "n", "flag", "new")] == [float, int, bool, int]
    set_dotted(data, "plugins.p.n", 2.5)  # a float over an int is kept as given (the schema decides)
    assert type(data["plugins"]["p"]["n"]) is float and data["plugins"]["p"]["n"] == 2.5


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[data]\ndataset = "d"\ntext = ["t"]\n[teachers]\nmodel = "m"\n[student]\nmodel = "m"\n')
    recipe = load_recipe(path, registry=REGISTRY, overrides={"student.learning_rate": 1e-5, "plugins.scale.factor": 4})
    assert recipe.student.learning_rate == 1e-5 and recipe.enabled_plugins() == {"scale": {"factor": 4}}
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry=REGISTRY, overrides={"plugins.scale.factor": 0})
    assert info.value.problems[0][0] == "plugins.scale.factor"


# ----------------------------------------------------------------- JSON Schema
def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_schema_includes_each_plugin_with_enabled_and_resolvable_refs():
    registry = discover_plugins(extra=[Scale], load_entrypoints=False)
    schema, skipped = recipe_json_schema(registry)
    assert skipped == []
    scale = schema["properties"]["plugins"]["properties"]["scale"]
    assert set(scale["properties"]) == {"factor", "mode", "shift", "depth", "enabled"}
    assert scale["properties"]["enabled"]["type"] == "boolean"
    assert scale["properties"]["mode"]["enum"] == ["plain", "squared"]
    assert scale["additionalProperties"] is False
    assert scale["description"].startswith("Multiplies the sample weight")
    for ref in _refs(schema):
        assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in schema["$defs"], ref
    assert "scale.Depth" in schema["$defs"]  # a plugin's own definitions cannot clash with kdkit's


def test_schema_skips_failed_and_blocked_plugins():
    registry = plugin_registry(Scale, Claims).with_blocked(["claims"])
    schema, skipped = recipe_json_schema(registry)
    assert [name for name, _ in skipped] == ["claims"]
    assert list(schema["properties"]["plugins"]["properties"]) == ["scale"]


# ----------------------------------------------------------------- the reference page
def _recipe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        keys.append(key)
        annotation = _unwrap(info.annotation)
        for member in _union_members(annotation) or [annotation]:
            if _is_model(_unwrap(member)):
                keys += _recipe_keys(_unwrap(member), key + ".")
    return keys


def test_every_recipe_key_is_documented():
    documented = set(re.findall(r"`([^`\s]+)`", DOCS.read_text()))
    keys = _recipe_keys(Recipe)
    assert {"data.text", "teachers.model.package", "student.learning_rate", "distill.on"} <= set(keys)
    missing = [key for key in keys if key not in documented]
    assert not missing, f"docs/RECIPES.md does not document: {missing}"


def test_every_option_of_the_builtin_plugins_is_documented():
    documented = set(re.findall(r"`([^`\s]+)`", DOCS.read_text()))
    registry = discover_plugins()
    builtins = [r for r in registry.records.values() if r.distribution == "kdkit"]
    assert {r.name for r in builtins} == {"average", "unikd-correctness", "unikd-disagreement", "aekd"}
    missing = []
    for record in builtins:
        assert record.cls is not None, record.error
        for name, info in record.cls.Options.model_fields.items():
            key = f"plugins.{record.name}.{info.alias or name}"
            if key not in documented:
                missing.append(key)
    assert not missing, f"docs/RECIPES.md does not document: {missing}"


def test_the_example_in_the_reference_is_valid():
    text = DOCS.read_text()
    example = text.split("## A complete example", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    recipe = validate_recipe(tomllib.loads(example), source="docs/RECIPES.md")
    assert set(recipe.enabled_plugins()) == {"unikd-correctness", "unikd-disagreement"}

"""Plugin discovery and the per-run plugin manager: each entry point loaded on its own, failures recorded,
duplicates named with both distributions, blocking before import, misspelled hooks rejected."""

from __future__ import annotations

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import kdkit
from kdkit.errors import PluginError
from kdkit.plugin.registry import (
    BLOCK_ENV_VAR,
    build_manager,
    check_ensembling_conflicts,
    check_plugin_class,
    discover_plugins,
)
from kdkit.recipe import validate_recipe
from kdkit.testing import fake_batch, plugin_registry, stream_view


class DoubleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(2.0, gt=0)


class Double(kdkit.Plugin):
    """Every unlabeled sample counts `factor` times."""

    name = "double"
    version = "3.1"
    Options = DoubleOptions

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batch):
        if batch.stream != "unlabeled":
            return None
        return torch.full((batch.size,), self.options.factor)


class Claims(kdkit.Plugin):
    name = "claims-labeled"
    ensembles = ("labeled",)

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch):
        return None


class AlsoClaims(Claims):
    name = "also-claims-labeled"


def _marker_module(marker_path, body: str = "") -> str:
    """Source of a module that leaves a trace on disk the moment it is imported, then runs ``body``."""
    return f"open({str(marker_path)!r}, 'a').write('imported\\n')\n" + body


GOOD_SOURCE = """
import torch
import kdkit

class Good(kdkit.Plugin):
    name = "good"
    version = "2.0"

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return torch.ones(batch.size)
"""


# --------------------------------------------------------------------------- discovery
def test_entry_point_plugin_is_found_with_its_distribution(fake_distribution):
    fake_distribution("good-dist", {"good": "kdkit_t_good:Good"}, {"kdkit_t_good": GOOD_SOURCE})
    record = discover_plugins().records["good"]
    assert record.status == "ok", record.error
    assert (record.version, record.distribution) == ("2.0", "good-dist")
    assert record.hooks == ("kdkit_kd_weights",)
    assert record.entry_point == "kdkit_t_good:Good"
    assert record.cls is not None and record.cls.__module__ == "kdkit_t_good"


def test_a_broken_plugin_is_recorded_and_the_others_still_load(fake_distribution):
    fake_distribution("good-dist", {"good": "kdkit_t_good2:Good"}, {"kdkit_t_good2": GOOD_SOURCE})
    fake_distribution(
        "broken-dist",
        {"broken": "kdkit_t_broken:Broken", "exits": "kdkit_t_exits:Exits"},
        {"kdkit_t_broken": "import kdkit_no_such_dependency\n", "kdkit_t_exits": "raise SystemExit(3)\n"},
    )
    registry = discover_plugins()
    broken = registry.records["broken"]
    assert broken.status == "failed"
    assert broken.distribution == "broken-dist"
    assert "ModuleNotFoundError" in broken.error and "kdkit_no_such_dependency" in broken.error
    assert registry.records["exits"].status == "failed"
    assert "SystemExit" in registry.records["exits"].error
    assert registry.records["good"].status == "ok"
    assert "good" in registry.available() and "broken" not in registry.available()
    assert {r.name for r in registry.failures()} >= {"broken", "exits"}
    with pytest.raises(PluginError, match="plugin 'broken' could not be loaded: ModuleNotFoundError"):
        registry.get("broken")


def test_two_distributions_with_one_plugin_name_is_an_error_naming_both(fake_distribution):
    fake_distribution("first-dist", {"good": "kdkit_t_dup1:Good"}, {"kdkit_t_dup1": GOOD_SOURCE})
    fake_distribution("second-dist", {"good": "kdkit_t_dup2:Good"}, {"kdkit_t_dup2": GOOD_SOURCE})
    registry = discover_plugins()
    record = registry.records["good"]
    assert record.status == "failed"
    assert "first-dist" in record.error and "second-dist" in record.error
    with pytest.raises(PluginError) as info:
        registry.get("good")
    assert "first-dist" in str(info.value) and "second-dist" in str(info.value)


def test_a_plugin_registered_in_code_clashing_with_an_installed_one_is_an_error(fake_distribution):
    fake_distribution("double-dist", {"double": f"{__name__}:Double"})
    record = discover_plugins(extra=[Double]).records["double"]
    assert record.status == "failed"
    assert "double-dist" in record.error and "<registered in code>" in record.error


@pytest.mark.parametrize("how", ["argument", "env", "recipe"])
def test_a_blocked_plugin_module_is_never_imported(fake_distribution, tmp_path, monkeypatch, how):
    marker = tmp_path / "imported.txt"
    source = _marker_module(marker, "raise RuntimeError('this plugin is broken')\n")
    fake_distribution("blocked-dist", {"trap": "kdkit_t_trap:Trap"}, {"kdkit_t_trap": source})
    if how == "argument":
        registry = discover_plugins(blocked=["trap"])
        assert (registry.records["trap"].status, registry.records["trap"].error) == ("blocked", "blocked (blocked_plugins)")
        with pytest.raises(PluginError, match="plugin 'trap' is blocked by the recipe's `blocked_plugins`"):
            registry.get("trap")
    elif how == "env":
        monkeypatch.setenv(BLOCK_ENV_VAR, " other , trap ")
        registry = discover_plugins()
        assert (registry.records["trap"].status, registry.records["trap"].error) == ("blocked", "blocked by $KDKIT_BLOCK_PLUGINS")
        with pytest.raises(PluginError, match=r"plugin 'trap' is blocked by \$KDKIT_BLOCK_PLUGINS"):
            registry.get("trap")
    else:
        # the recipe blocks it and keeps its (switched off) table: validation must not import it
        recipe = {
            "name": "r",
            "blocked_plugins": ["trap"],
            "data": {"dataset": "d", "text": ["t"]},
            "teachers": {"model": "m"},
            "student": {"model": "m"},
            "plugins": {"trap": {"enabled": False, "anything": 1}},
        }
        validate_recipe(recipe)
    assert not marker.exists()
    # and the check itself can fail: without blocking the module is imported (and fails)
    monkeypatch.delenv(BLOCK_ENV_VAR, raising=False)
    assert discover_plugins().records["trap"].status == "failed"
    assert marker.exists()


def test_a_recipe_enabling_a_blocked_plugin_is_an_error(fake_distribution):
    fake_distribution("double-dist", {"double": f"{__name__}:Double"})
    recipe = {
        "name": "r",
        "blocked_plugins": ["double"],
        "data": {"dataset": "d", "text": ["t"]},
        "teachers": {"model": "m"},
        "student": {"model": "m"},
        "plugins": {"double": {}},
    }
    with pytest.raises(kdkit.RecipeError) as info:
        validate_recipe(recipe)
    assert info.value.problems[0][0] == "plugins.double"
    assert "blocked" in info.value.problems[0][1]


# --------------------------------------------------------------------------- what makes a class a plugin
class Misspelled(kdkit.Plugin):
    name = "misspelled"

    @kdkit.hookimpl
    def kdkit_sample_weight(self, batch):  # the spec is kdkit_sample_weights
        return None


class WrongArgument(kdkit.Plugin):
    name = "wrong-argument"

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batches):
        return None


class NoHooks(kdkit.Plugin):
    name = "no-hooks"


class Dotted(Double):
    name = "my.plugin"


class EnabledOption(kdkit.Plugin):
    name = "enabled-option"

    class Options(BaseModel):
        enabled: bool = True

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return None


class NotAPlugin:
    name = "not-a-plugin"

    def kdkit_kd_weights(self, batch):
        return None


class UnknownStream(Claims):
    name = "unknown-stream"
    ensembles = ("labelled",)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Misspelled, "unknown hook 'kdkit_sample_weight' (did you mean 'kdkit_sample_weights'?)"),
        (WrongArgument, "batches"),
        (NoHooks, "implements none of the hooks"),
        (Dotted, "may hold only letters, digits"),
        (EnabledOption, "may not be called 'enabled'"),
        (NotAPlugin, "must name a subclass of kdkit.Plugin"),
        (UnknownStream, "unknown stream 'labelled'"),
    ],
)
def test_unusable_plugin_classes_are_rejected_with_a_reason(cls, expected):
    with pytest.raises(PluginError) as info:
        check_plugin_class(cls)
    assert expected in str(info.value)


def test_unusable_plugin_classes_installed_are_recorded_as_failed(fake_distribution):
    fake_distribution(
        "bad-dist",
        {
            "misspelled": f"{__name__}:Misspelled",
            "wrong-argument": f"{__name__}:WrongArgument",
            "renamed": f"{__name__}:Double",  # entry point name and class name differ
            "missing-attr": f"{__name__}:NoSuchClass",
        },
    )
    records = discover_plugins().records
    assert "did you mean 'kdkit_sample_weights'" in records["misspelled"].error
    assert "batches" in records["wrong-argument"].error
    assert "entry point 'renamed' names plugin class Double whose name is 'double'" in records["renamed"].error
    assert "AttributeError" in records["missing-attr"].error
    assert all(records[n].status == "failed" for n in ("misspelled", "wrong-argument", "renamed", "missing-attr"))


def test_check_pending_rejects_a_misspelled_hook_at_build_time():
    # even without discovery's checks, the run's plugin manager refuses a method pluggy does not know
    with pytest.raises(PluginError, match="kdkit_sample_weight"):
        build_manager([Misspelled()])


def test_build_manager_holds_only_the_given_instances_and_calls_them_by_keyword():
    pm = build_manager([Double(DoubleOptions(factor=3.0))])
    assert [p.name for p in pm.get_plugins()] == ["double"]
    view = stream_view(fake_batch(size=5, labeled=2), "unlabeled")
    answers = pm.hook.kdkit_sample_weights(batch=view)
    assert len(answers) == 1 and torch.equal(answers[0], torch.full((3,), 3.0))
    with pytest.raises(TypeError):
        pm.hook.kdkit_sample_weights(view)  # positional calls are refused by pluggy


# --------------------------------------------------------------------------- the registry
def test_unknown_name_suggests_and_lists_the_installed_plugins():
    registry = plugin_registry(Double, Claims)
    with pytest.raises(PluginError) as info:
        registry.get("doubel")
    message = str(info.value)
    assert "unknown plugin 'doubel' (did you mean 'double'?)" in message
    assert "installed plugins: claims-labeled, double" in message


def test_instantiate_validates_options_with_the_plugin_model_and_names_the_key():
    registry = plugin_registry(Double)
    [plugin] = registry.instantiate({"double": {"factor": 4}})
    assert plugin.options.factor == 4.0
    with pytest.raises(PluginError, match=r"plugins\.double\.factor: Input should be greater than 0"):
        registry.instantiate({"double": {"factor": -1}})


def test_ensembling_conflict_names_both_plugins_and_the_stream():
    with pytest.raises(PluginError) as info:
        check_ensembling_conflicts([Claims(), AlsoClaims()])
    assert "'claims-labeled' and 'also-claims-labeled'" in str(info.value)
    assert "labeled samples" in str(info.value)
    check_ensembling_conflicts([Claims(), Double()])  # a plugin that ensembles nothing never conflicts


def test_with_blocked_returns_a_copy():
    registry = plugin_registry(Double, Claims)
    blocked = registry.with_blocked(["double"])
    assert blocked.records["double"].status == "blocked" and blocked.records["double"].cls is None
    assert registry.records["double"].status == "ok"
    assert blocked.available() == ["claims-labeled"]


def test_records_serialise_for_the_cli():
    record = plugin_registry(Double).records["double"]
    assert record.as_dict() == {
        "name": "double",
        "version": "3.1",
        "status": "ok",
        "hooks": ["kdkit_sample_weights"],
        "streams": "",
        "distribution": "<registered in code>",
        "entry_point": f"{__name__}:Double",
        "error": "",
    }


class LaxOptions(kdkit.Plugin):
    name = "lax-options"

    class Options(BaseModel):  # accepts unknown keys: a misspelled option would be ignored
        power: float = 1.0

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return None


class StrictOptions(kdkit.Plugin):
    name = "strict-options"

    class Options(kdkit.Options):
        power: float = 1.0

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return None


def test_a_plugin_whose_options_accept_unknown_keys_is_refused():
    with pytest.raises(PluginError, match=r"plugin 'lax-options': its Options model .* accepts unknown keys.*kdkit\.Options"):
        check_plugin_class(LaxOptions)
    check_plugin_class(StrictOptions)  # kdkit.Options forbids them
    with pytest.raises(ValidationError):
        StrictOptions.Options(powr=2.0)

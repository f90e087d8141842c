"""Issue 11: the library is as careful as the CLI, and nothing depends on the order plugins are loaded in.

* ``DistillationLoss.from_plugins`` option errors carry the key path and a "did you mean", ``enabled`` switches a
  plugin off as in recipes, an empty batch or a non-finite teacher logit is an error naming the sample;
* a plugin that sets teacher weights declares its streams (``ensembles`` or ``ensembled_streams()`` from its
  options), or is a ``trylast`` fallback; otherwise it is rejected when it loads; ``kdkit plugins`` shows them;
* a stream's teacher weights come only from the plugin claiming it, whatever the registration order.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import kdkit
from kdkit.cli import app
from kdkit.plugin.registry import check_plugin_class, discover_plugins
from kdkit.testing import fake_logits, make_loss, plugin_registry
from kdkit_plugins.aekd import AEKDPlugin
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("plugins", "message"),
    [
        ({"aekd": {"c": 0.5}}, r"plugins\.aekd\.c: unknown option 'c' \(did you mean 'C'\?\); options of aekd: C, "),
        ({"unikd-disagreement": {"lamda": 5}}, r"plugins\.unikd-disagreement\.lamda: .*did you mean 'lambda'"),
        ({"unikd-correctness": {"teacher_weightng": "as-printed"}}, r"did you mean 'teacher_weighting'"),
        ({"aekd": {"C": -1}}, r"plugins\.aekd\.C: Input should be greater than 0"),
        ({"aekd": {"C": -1, "tol": 2}}, r"plugins\.aekd\.C: .*\nplugins\.aekd\.tol: Input should be less than 1"),
        ({"aekd": {"enabled": "no"}}, r"plugins\.aekd\.enabled: must be true or false \(got 'no'\)"),
        ({"aekd": {"enabled": False, "C": -1}}, r"plugins\.aekd\.C: Input should be greater than 0"),
    ],
)
def test_from_plugins_errors_carry_the_key_path_and_a_suggestion(plugins, message):
    with pytest.raises(kdkit.PluginError, match=message):
        kdkit.DistillationLoss.from_plugins(plugins)


def test_enabled_false_switches_a_plugin_off_as_in_recipes():
    student, teacher, y = fake_logits(size=6, teachers=3, classes=3, labeled=3, seed=0)
    off = kdkit.DistillationLoss.from_plugins({"aekd": {"enabled": False, "C": 0.9}})
    assert off.plugins == []
    on = kdkit.DistillationLoss.from_plugins({"aekd": {"enabled": True, "C": 0.9}})
    assert [p.name for p in on.plugins] == ["aekd"] and on.plugins[0].options.C == 0.9
    torch.testing.assert_close(off(student, teacher, y).teacher_weights, torch.full((6, 3), 1 / 3))
    # with it switched off, another plugin may claim its streams: no conflict
    both = kdkit.DistillationLoss.from_plugins({"aekd": {"enabled": False}, "unikd-correctness": {}})
    assert [p.name for p in both.plugins] == ["unikd-correctness"]


def test_a_switched_off_plugin_that_is_not_installed_is_still_a_typo():
    with pytest.raises(kdkit.PluginError, match=r"unknown plugin 'aekdd' \(did you mean 'aekd'\?\)"):
        kdkit.DistillationLoss.from_plugins({"aekdd": {"enabled": False}})


def test_an_empty_batch_is_an_error_not_a_nan_loss():
    with pytest.raises(kdkit.DataError, match=r"empty batch"):
        make_loss({})(torch.zeros(0, 3), torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_teacher_logit_names_the_sample_and_the_teacher(bad):
    student, teacher, y = fake_logits(size=5, teachers=3, classes=4, labeled=2, seed=1)
    teacher[3, 1, 2] = bad
    with pytest.raises(kdkit.DataError, match=rf"not finite: sample 3, teacher 2, class 2 holds {bad}"):
        make_loss({CorrectnessPlugin: {}})(student, teacher, y)


# ----------------------------------------------------------------------------------------------- declaring streams
class NoStreams(kdkit.Plugin):
    name, version = "no-streams", "1"

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch):
        return batch.uniform_weights


class Fallback(NoStreams):
    name = "other-fallback"

    @kdkit.hookimpl(trylast=True)
    def kdkit_teacher_weights(self, batch):
        return batch.uniform_weights


class FromOptionsOptions(kdkit.Options):
    stream: str = "unlabeled"


class FromOptions(NoStreams):
    """Claims the stream its options name, and answers on every stream (to show who is asked)."""

    name = "from-options"
    Options = FromOptionsOptions

    def ensembled_streams(self):
        return (self.options.stream,)

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch):
        first = torch.zeros(batch.size, batch.num_teachers)
        first[:, 0] = 1.0
        return first


class LastTeacher(kdkit.Plugin):
    """Claims the labeled stream only, but answers on every stream."""

    name, version, ensembles = "last-teacher", "1", ("labeled",)

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch):
        last = torch.zeros(batch.size, batch.num_teachers)
        last[:, -1] = 1.0
        return last


def test_a_plugin_that_sets_teacher_weights_without_streams_is_rejected_when_it_loads(fake_distribution):
    with pytest.raises(kdkit.PluginError, match=r"'no-streams' implements kdkit_teacher_weights but declares no "
                       r"streams.*ensembles = \(\"labeled\", \"unlabeled\"\).*ensembled_streams\(self\)"):
        check_plugin_class(NoStreams)
    fake_distribution("no-streams-dist", {"no-streams": f"{__name__}:NoStreams"})
    registry = discover_plugins()
    assert registry.records["no-streams"].status == "failed"
    assert "declares no streams" in registry.records["no-streams"].error
    with pytest.raises(kdkit.PluginError, match="declares no streams"):
        kdkit.DistillationLoss.from_plugins({"no-streams": {}}, registry=registry)


def test_streams_from_options_and_fallbacks_are_declarations():
    registry = plugin_registry(Fallback, FromOptions, LastTeacher, AveragePlugin, AEKDPlugin, CorrectnessPlugin)
    streams = {name: record.streams for name, record in registry.records.items()}
    assert streams == {
        "other-fallback": "fallback",
        "from-options": "from options (default: unlabeled)",
        "last-teacher": "labeled",
        "average": "fallback",
        "aekd": "labeled, unlabeled",
        "unikd-correctness": "from options (default: labeled)",
    }


def test_kdkit_plugins_shows_the_streams(fake_distribution):
    fake_distribution(
        "streams-dist", {"from-options": f"{__name__}:FromOptions", "no-streams": f"{__name__}:NoStreams"}
    )
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["from-options"]["streams"] == "from options (default: unlabeled)"
    assert records["aekd"]["streams"] == "labeled, unlabeled"
    assert records["average"]["streams"] == "fallback"
    assert records["unikd-disagreement"]["streams"] == ""
    assert records["no-streams"]["status"] == "failed"
    table = CliRunner().invoke(app, ["plugins"])
    assert "streams" in table.stdout and "from options (default: unlabeled)" in table.stdout


@pytest.mark.parametrize("order", [(FromOptions, LastTeacher), (LastTeacher, FromOptions)])
def test_a_stream_is_answered_by_its_claimant_whatever_the_load_order(order):
    # last-teacher claims labeled, from-options claims unlabeled; both answer on every stream. pluggy would ask
    # the last registered first; kdkit asks only the claimant of each stream.
    student, teacher, y = fake_logits(size=6, teachers=3, classes=2, labeled=3, seed=2)
    loss_fn = make_loss({cls: {} for cls in order})
    w = loss_fn(student, teacher, y).teacher_weights
    assert w[:3].tolist() == [[0.0, 0.0, 1.0]] * 3  # labeled: last-teacher
    assert w[3:].tolist() == [[1.0, 0.0, 0.0]] * 3  # unlabeled: from-options


def test_a_plugin_claiming_no_stream_through_its_options_is_not_asked():
    student, teacher, y = fake_logits(size=4, teachers=2, classes=2, labeled=2, seed=3)
    out = make_loss({FromOptions: {"stream": "labeled"}})(student, teacher, y)
    assert out.teacher_weights[:2].tolist() == [[1.0, 0.0]] * 2
    assert out.teacher_weights[2:].tolist() == [[0.5, 0.5]] * 2  # unlabeled: not claimed, the plain average


def test_two_fallbacks_conflict():
    with pytest.raises(kdkit.PluginError, match=r"'average' and 'other-fallback' are both fallbacks"):
        make_loss({AveragePlugin: {}, Fallback: {}})

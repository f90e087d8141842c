"""The built-in plugins as plugins: registration, options, per-stream behaviour, public-API-only imports.

Their numbers are tested in test_equations.py and test_properties.py.
"""

from __future__ import annotations

import ast
import inspect
import timeit
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

import kdkit
import kdkit_plugins
from kdkit.testing import fake_batch, fake_logits, make_loss, run_hook, stream_view
from kdkit_plugins import aekd as aekd_module
from kdkit_plugins import average as average_module
from kdkit_plugins import unikd as unikd_module
from kdkit_plugins.aekd import AEKDPlugin, min_norm_capped_simplex
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

BUILTINS = {
    "average": (AveragePlugin, ("kdkit_teacher_weights",)),
    "unikd-correctness": (CorrectnessPlugin, ("kdkit_teacher_weights", "kdkit_kd_weights")),
    "unikd-disagreement": (DisagreementPlugin, ("kdkit_sample_weights",)),
    "aekd": (AEKDPlugin, ("kdkit_teacher_weights",)),
}


# ----------------------------------------------------------------------------------------------- registration
def test_builtins_are_registered_through_entry_points():
    registry = kdkit.discover_plugins()
    for name, (cls, hooks) in BUILTINS.items():
        record = registry.records[name]
        assert record.status == "ok", record.error
        assert record.cls is cls
        assert record.hooks == hooks
        assert record.version == kdkit.__version__
        assert record.distribution == "kdkit"
        assert record.entry_point.startswith("kdkit_plugins.")


def test_blocking_a_builtin():
    registry = kdkit.discover_plugins(blocked=["aekd"])
    assert registry.records["aekd"].status == "blocked"
    with pytest.raises(kdkit.PluginError, match="blocked"):
        kdkit.DistillationLoss.from_plugins({"aekd": {}}, registry=registry)


@pytest.mark.parametrize("module", [average_module, unikd_module, aekd_module, kdkit_plugins])
def test_plugins_use_only_the_public_api(module):
    """Built-ins are written as a third party would write them: `import kdkit` and its top-level names only."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module is not None and not node.module.startswith("kdkit"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name == "kdkit" or not alias.name.startswith("kdkit"), ast.unparse(node)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kdkit":
            assert node.attr in kdkit.__all__, f"kdkit.{node.attr} is not public API"


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name", list(BUILTINS))
def test_options_forbid_unknown_keys_and_document_every_field(name):
    cls = BUILTINS[name][0]
    options: type[BaseModel] = cls.Options
    assert options.model_config.get("extra") == "forbid"
    schema = options.model_json_schema()
    for field, spec in schema.get("properties", {}).items():
        assert spec.get("description"), f"{name}.{field} has no description"
    with pytest.raises(kdkit.PluginError, match=rf"plugins\.{name}\.colour: unknown option 'colour'; options of {name}"):
        kdkit.discover_plugins().instantiate({name: {"colour": 1}})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("unikd-correctness", {"teacher_weighting": "inverse"}, r"teacher_weighting: Input should be 'inverse-loss'"),
        ("unikd-correctness", {"eps": 0}, r"eps: Input should be greater than 0"),
        ("unikd-correctness", {"eps": float("inf")}, r"eps: Input should be a finite number"),
        ("unikd-correctness", {"ensembling": False, "loss_weighting": False}, r"loss_weighting: .*disable the plugin"),
        ("unikd-disagreement", {"lambda": -1}, r"lambda: Input should be greater than or equal to 0"),
        ("unikd-disagreement", {"lambda": float("nan")}, r"lambda: Input should be a finite number"),
        ("unikd-disagreement", {"apply_to": "labeled"}, r"apply_to: Input should be 'unlabeled' or 'all'"),
        ("aekd", {"C": 0}, r"C: Input should be greater than 0"),
        ("aekd", {"C": float("inf")}, r"C: Input should be a finite number"),
        ("aekd", {"gradient": "flat"}, r"gradient: Input should be 'batch-mean' or 'per-sample'"),
        ("aekd", {"max_iter": 0}, r"max_iter: Input should be greater than or equal to 1"),
    ],
)
def test_bad_options_name_the_key(name, options, message):
    with pytest.raises(kdkit.PluginError, match=rf"plugins\.{name}\.{message}"):
        kdkit.discover_plugins().instantiate({name: options})


def test_defaults():
    assert CorrectnessPlugin.Options().teacher_weighting == "inverse-loss"
    assert 0 < CorrectnessPlugin.Options().eps < 1e-3
    assert DisagreementPlugin.Options().lam == 10.0
    assert DisagreementPlugin.Options().apply_to == "unlabeled"
    assert AEKDPlugin.Options().C == 0.6


def test_lambda_is_spelled_lambda_in_recipes_and_schema():
    options = DisagreementPlugin.Options.model_validate({"lambda": 15})
    assert options.lam == 15.0
    assert DisagreementPlugin.Options(lam=15).lam == 15.0  # Python keyword
    assert options.model_dump(by_alias=True) == {"lambda": 15.0, "apply_to": "unlabeled"}
    # round trip through the field names (what model_dump() gives) still validates
    assert DisagreementPlugin.Options.model_validate(options.model_dump()).lam == 15.0
    assert "lambda" in DisagreementPlugin.Options.model_json_schema()["properties"]


# ----------------------------------------------------------------------------------------------- streams
def test_each_plugin_answers_only_on_its_streams():
    batch = fake_batch(size=6, teachers=3, classes=2, labeled=3, seed=0)
    labeled, unlabeled = stream_view(batch, "labeled"), stream_view(batch, "unlabeled")
    correctness = CorrectnessPlugin()
    assert run_hook(correctness, "kdkit_teacher_weights", labeled).shape == (3, 3)
    assert run_hook(correctness, "kdkit_kd_weights", labeled).shape == (3,)
    assert run_hook(correctness, "kdkit_teacher_weights", unlabeled) is None
    assert run_hook(correctness, "kdkit_kd_weights", unlabeled) is None
    disagreement = DisagreementPlugin()
    assert run_hook(disagreement, "kdkit_sample_weights", labeled) is None
    assert run_hook(disagreement, "kdkit_sample_weights", unlabeled).shape == (3,)
    everywhere = DisagreementPlugin(DisagreementPlugin.Options(apply_to="all"))
    assert run_hook(everywhere, "kdkit_sample_weights", labeled).shape == (3,)
    for view in (labeled, unlabeled):
        assert run_hook(AEKDPlugin(), "kdkit_teacher_weights", view).shape == (3, 3)
        assert torch.equal(run_hook(AveragePlugin(), "kdkit_teacher_weights", view), torch.full((3, 3), 1 / 3))


def test_claimed_streams():
    assert CorrectnessPlugin().ensembled_streams() == ("labeled",)
    assert CorrectnessPlugin(CorrectnessPlugin.Options(ensembling=False)).ensembled_streams() == ()
    assert AEKDPlugin().ensembled_streams() == ("labeled", "unlabeled")
    assert AveragePlugin().ensembled_streams() == ()
    assert DisagreementPlugin().ensembled_streams() == ()


def test_average_answers_last():
    # enabled beside unikd-correctness, the average only fills in where correctness has no opinion
    student, teacher, y = fake_logits(size=6, teachers=3, classes=2, labeled=3, seed=1)
    both = make_loss({AveragePlugin: {}, CorrectnessPlugin: {}})(student, teacher, y)
    alone = make_loss({CorrectnessPlugin: {}})(student, teacher, y)
    torch.testing.assert_close(both.teacher_weights, alone.teacher_weights)
    assert not torch.allclose(both.teacher_weights[:3], torch.full((3, 3), 1 / 3))
    torch.testing.assert_close(both.teacher_weights[3:], torch.full((3, 3), 1 / 3))


def test_correctness_without_ensembling_beside_aekd():
    student, teacher, y = fake_logits(size=6, teachers=3, classes=2, labeled=3, seed=2)
    out = make_loss({CorrectnessPlugin: {"ensembling": False}, AEKDPlugin: {}})(student, teacher, y)
    aekd_only = make_loss({AEKDPlugin: {}})(student, teacher, y)
    correctness_only = make_loss({CorrectnessPlugin: {}})(student, teacher, y)
    torch.testing.assert_close(out.teacher_weights, aekd_only.teacher_weights)
    torch.testing.assert_close(out.kd_weights, correctness_only.kd_weights)


def test_aekd_empty_view_and_determinism():
    batch = fake_batch(size=4, teachers=3, classes=3, seed=3)
    empty = batch.select(torch.empty(0, dtype=torch.long), "unlabeled")
    assert run_hook(AEKDPlugin(), "kdkit_teacher_weights", empty).shape == (0, 3)
    view = batch.select(None, "labeled")
    first = run_hook(AEKDPlugin(), "kdkit_teacher_weights", view)
    assert torch.equal(first, run_hook(AEKDPlugin(), "kdkit_teacher_weights", batch.select(None, "labeled")))
    assert first.dtype == torch.float32 and first.device == batch.device


def test_aekd_identical_teachers_and_student():
    # every g_i = 0: every feasible point is optimal; kdkit returns the average rather than anything arbitrary
    student = torch.randn(3, 4)
    teacher = student.unsqueeze(1).repeat(1, 5, 1)
    view = kdkit.KDBatch(student, teacher, torch.zeros(3, dtype=torch.long), 1.0).select(None, "labeled")
    torch.testing.assert_close(run_hook(AEKDPlugin(), "kdkit_teacher_weights", view), torch.full((3, 5), 0.2))


def test_aekd_solver_is_fast_for_sixteen_teachers():
    """Target: well under a millisecond for N <= 16 on typical (few-class) tasks. The bound asserted here is
    loose (a shared 2-core machine); AEKDPlugin's docstring gives measured numbers."""
    student, teacher, y = fake_logits(size=32, teachers=16, classes=3, seed=4)
    view = kdkit.KDBatch(student, teacher, y, 1.0).select(None, "labeled")
    gram = aekd_module.gradient_gram(view.student_probs, view.teacher_probs).tolist()
    per_call = min(timeit.repeat(lambda: min_norm_capped_simplex(gram, 0.6), number=20, repeat=3)) / 20
    assert per_call < 0.01

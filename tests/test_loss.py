"""The DistillationLoss contract: shapes, detached weights, the gradient, and the errors it raises."""

from __future__ import annotations

import math

import pytest
import torch

import kdkit
from kdkit.testing import fake_logits, make_loss
from kdkit_plugins.aekd import AEKDPlugin
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

UNIKD = {CorrectnessPlugin: {}, DisagreementPlugin: {"lambda": 10}}


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("labeled", [0, 3, 6])
def test_output_shapes(labeled):
    student, teacher, y = fake_logits(size=6, teachers=4, classes=3, labeled=labeled, seed=1)
    out = make_loss(UNIKD)(student.requires_grad_(), teacher, y)
    assert out.loss.shape == ()
    for name in ("per_sample", "kd", "task", "kd_weights", "sample_weights"):
        assert getattr(out, name).shape == (6,), name
    assert out.teacher_weights.shape == (6, 4)
    torch.testing.assert_close(out.loss, out.per_sample.mean())
    assert out.loss.requires_grad


def test_from_plugins_uses_installed_entry_points():
    student, teacher, y = fake_logits(size=5, teachers=3, classes=2, labeled=2, seed=2)
    loss_fn = kdkit.DistillationLoss.from_plugins({"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10}})
    assert [p.name for p in loss_fn.plugins] == ["unikd-correctness", "unikd-disagreement"]
    expected = make_loss(UNIKD)(student, teacher, y)
    torch.testing.assert_close(loss_fn(student, teacher, y).loss, expected.loss)
    assert "unikd-correctness" in repr(loss_fn)


# ----------------------------------------------------------------------------------------------- detached weights
@pytest.mark.parametrize(
    "plugins", [UNIKD, {AEKDPlugin: {}}, {AveragePlugin: {}}, {DisagreementPlugin: {"apply_to": "all"}}]
)
def test_weights_are_detached_and_teachers_get_no_gradient(plugins):
    student, teacher, y = fake_logits(size=6, teachers=3, classes=3, labeled=3, seed=4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = make_loss(plugins, temperature=2.0)(student, teacher, y)
    for weights in (out.teacher_weights, out.kd_weights, out.sample_weights):
        assert not weights.requires_grad and weights.grad_fn is None
    out.loss.backward()
    assert teacher.grad is None  # the soft targets are constants
    assert student.grad is not None and torch.isfinite(student.grad).all()


class GradientHungry(kdkit.Plugin):
    """Returns weights that still carry a graph: kdkit must cut it."""

    name, version = "gradient-hungry", "1"

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch):
        return torch.ones(batch.size, requires_grad=True) * 2.0


def test_weights_with_a_graph_are_detached():
    student, teacher, y = fake_logits(size=4, teachers=2, classes=2, seed=5)
    out = make_loss({GradientHungry: {}})(student.requires_grad_(), teacher, y)
    assert not out.kd_weights.requires_grad
    torch.testing.assert_close(out.kd_weights, torch.full((4,), 2.0))


# ----------------------------------------------------------------------------------------------- the gradient
def expected_gradient(student, teacher, y, out, temperature, on):
    """d loss / d z_s without autograd, in float64, given the (constant) weights kdkit reported.

    loss = 1/B sum_b s_b (k_b kd_b + task_b) with
      kd_b   = -T^2 sum_c target_c log softmax(z_s/T)_c   ->  d/dz = T (softmax(z_s/T) sum(target) - target)
      task_b = -log softmax(z_s)_y                        ->  d/dz = softmax(z_s) - onehot(y)

    (sum(target) is 1 up to the float32 rounding of the reported weights; it is kept so that float64 is exact.)
    """
    b, n, c = teacher.shape
    grads = []
    for i in range(b):
        z = student[i].tolist()
        labeled = int(y[i]) != -100
        p_t = [math.exp(x / temperature) for x in z]
        p_t = [x / sum(p_t) for x in p_t]
        p_1 = [math.exp(x) for x in z]
        p_1 = [x / sum(p_1) for x in p_1]
        probs = []
        for j in range(n):
            row = [math.exp(x / temperature) for x in teacher[i, j].tolist()]
            probs.append([x / sum(row) for x in row])
        w = out.teacher_weights[i].double().tolist()
        target = [sum(w[j] * probs[j][k] for j in range(n)) for k in range(c)]
        gets_kd = ("labeled" if labeled else "unlabeled") in on
        k, s = float(out.kd_weights[i]), float(out.sample_weights[i])
        row = []
        for cls in range(c):
            g = k * temperature * (p_t[cls] * sum(target) - target[cls]) if gets_kd else 0.0
            if labeled:
                g += p_1[cls] - (1.0 if cls == int(y[i]) else 0.0)
            row.append(s * g / b)
        grads.append(row)
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("on", [("labeled", "unlabeled"), ("labeled",), ("unlabeled",)])
def test_gradient_matches_formula(temperature, on):
    student, teacher, y = fake_logits(size=7, teachers=3, classes=4, labeled=4, seed=6)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        z = student.detach().to(dtype).clone().requires_grad_(True)
        out = make_loss(UNIKD, temperature=temperature, on=on)(z, teacher.to(dtype), y)
        out.loss.backward()
        expected = expected_gradient(student.double(), teacher.double(), y, out, temperature, on)
        torch.testing.assert_close(z.grad.double(), expected, rtol=tol, atol=tol)


def test_int32_labels_are_accepted():
    student, teacher, y = fake_logits(size=4, teachers=2, classes=3, labeled=2, seed=7)
    loss_fn = make_loss(UNIKD)
    torch.testing.assert_close(loss_fn(student, teacher, y.int()).loss, loss_fn(student, teacher, y).loss)


# ----------------------------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "labels", "message"),
    [
        ((4,), (4, 2, 3), [0, 1, 2, 0], r"student_logits must be \[B, C\], got shape \(4,\)"),
        ((4, 3), (4, 3), [0, 1, 2, 0], r"teacher_logits must be \[B, N, C\], got shape \(4, 3\)"),
        ((4, 3), (5, 2, 3), [0, 1, 2, 0], r"teacher_logits \(5, 2, 3\) does not match student_logits \(4, 3\)"),
        ((4, 3), (4, 2, 2), [0, 1, 1, 0], r"teacher_logits \(4, 2, 2\) does not match student_logits \(4, 3\)"),
        ((4, 3), (4, 0, 3), [0, 1, 2, 0], r"no teacher"),
        ((4, 3), (4, 2, 3), [0, 1, 2], r"labels must be \[B\] = \[4\], got shape \(3,\)"),
        ((4, 3), (4, 2, 3), [0, 1, 3, 0], r"class ids in \[0, 3\) or -100 .*sample 2 has label 3"),
        ((4, 3), (4, 2, 3), [0, -1, 2, 0], r"sample 1 has label -1"),
    ],
)
def test_shape_errors_are_clear_value_errors(student_shape, teacher_shape, labels, message):
    with pytest.raises(ValueError, match=message):
        make_loss({})(torch.zeros(student_shape), torch.zeros(teacher_shape), torch.tensor(labels))


def test_float_labels_are_rejected():
    with pytest.raises(ValueError, match=r"labels must be integer class ids .*float32"):
        make_loss({})(torch.zeros(2, 2), torch.zeros(2, 2, 2), torch.tensor([0.0, 1.0]))


def test_bad_settings_are_user_errors():
    with pytest.raises(kdkit.KdkitError, match="temperature must be > 0"):
        make_loss({}, temperature=0.0)
    with pytest.raises(kdkit.KdkitError, match="non-empty subset"):
        make_loss({}, on=[])
    with pytest.raises(kdkit.KdkitError, match="non-empty subset"):
        make_loss({}, on=["labelled"])


# ----------------------------------------------------------------------------------------------- plugin errors
def answering(hook_name, make_answer, stream="labeled"):
    """A plugin whose ``hook_name`` answers ``make_answer(batch)`` on ``stream``."""

    def hook(self, batch):
        return make_answer(batch) if batch.stream == stream else None

    ensembles = (stream,) if hook_name == "kdkit_teacher_weights" else ()
    return type("Answering", (kdkit.Plugin,), {"name": "answering", "version": "1", "ensembles": ensembles,
                                               hook_name: kdkit.hookimpl(hook)})


@pytest.mark.parametrize(
    ("hook_name", "make_answer", "message"),
    [
        ("kdkit_teacher_weights", lambda b: torch.ones(b.size, 3), r"shape \(3, 3\), expected \(3, 2\)"),
        ("kdkit_teacher_weights", lambda b: torch.ones(b.size), r"shape \(3,\), expected \(3, 2\)"),
        ("kdkit_kd_weights", lambda b: torch.ones(b.size + 1), r"shape \(4,\), expected \(3,\)"),
        ("kdkit_kd_weights", lambda b: torch.ones(b.size, 1), r"shape \(3, 1\), expected \(3,\)"),
        ("kdkit_sample_weights", lambda b: [1.0] * b.size, r"list, expected a tensor"),
    ],
)
def test_wrong_answers_are_plugin_errors(hook_name, make_answer, message):
    student, teacher, y = fake_logits(size=5, teachers=2, classes=2, labeled=3, seed=8)
    loss_fn = make_loss({answering(hook_name, make_answer): {}})
    with pytest.raises(kdkit.PluginError, match=rf"{hook_name} on the labeled stream returned {message}"):
        loss_fn(student, teacher, y)


def test_ensembling_conflict_names_both_plugins():
    with pytest.raises(kdkit.PluginError, match=r"plugins 'unikd-correctness' and 'aekd' both set teacher weights"):
        make_loss({CorrectnessPlugin: {}, AEKDPlugin: {}})
    with pytest.raises(kdkit.PluginError, match=r"'unikd-correctness' and 'aekd'.*labeled"):
        kdkit.DistillationLoss.from_plugins({"unikd-correctness": {}, "aekd": {}})
    # without its ensembling part, unikd-correctness claims no stream and AE-KD may set the weights
    make_loss({CorrectnessPlugin: {"ensembling": False}, AEKDPlugin: {}})


def test_plugin_errors_propagate_unchanged():
    student, teacher, y = fake_logits(size=4, teachers=1, classes=2, labeled=2, seed=9)
    with pytest.raises(kdkit.PluginError, match="unikd-disagreement needs at least 2 teachers"):
        make_loss({DisagreementPlugin: {}})(student, teacher, y)


def test_unlabeled_samples_outside_on_do_not_reach_the_plugins():
    # With on = ["labeled"], an unlabeled sample has kd = 0 and task = 0: its loss is 0 whatever the weights, so
    # kdkit does not ask the plugins about it (a plugin that fails on the unlabeled stream is never called there).
    class Fails(kdkit.Plugin):
        name, version = "fails-on-unlabeled", "1"

        @kdkit.hookimpl
        def kdkit_sample_weights(self, batch):
            if batch.stream == "unlabeled":
                raise AssertionError("called on the unlabeled stream")
            return torch.full((batch.size,), 2.0)

    student, teacher, labels = fake_logits(size=6, teachers=2, classes=3, labeled=3, seed=4)
    out = make_loss({Fails: {}}, on=["labeled"])(student, teacher, labels)
    assert out.sample_weights.tolist() == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]
    assert out.per_sample[3:].abs().max().item() == 0.0
    assert out.teacher_weights[3:].eq(0.5).all()

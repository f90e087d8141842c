"""Properties of the built-in weighting plugins that must hold for every batch (hypothesis).

Batches mix ordinary logits with huge finite ones (+-1e30, +-3e38: certain, one-hot teachers and students, and
values that overflow once divided by a temperature below 1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kdkit
from kdkit.testing import make_loss, run_hook
from kdkit_plugins.aekd import AEKDPlugin, gradient_gram
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin, correctness_teacher_weights

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WEIGHTINGS = ["inverse-loss", "softmax-neg-loss", "as-printed"]

moderate = st.floats(-20, 20, width=32)
extreme = st.sampled_from([1e30, -1e30, 3e38, -3e38, 1e4, -1e4, 0.0])
any_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)  # up to +-3.4e38
logit = st.one_of(moderate, moderate, extreme, any_finite)


@st.composite
def batches(draw, *, teachers=(2, 5), classes=(2, 4), size=(1, 5), values=logit):
    b = draw(st.integers(*size))
    n = draw(st.integers(*teachers))
    c = draw(st.integers(*classes))
    student = draw(st.lists(st.lists(values, min_size=c, max_size=c), min_size=b, max_size=b))
    teacher = draw(
        st.lists(st.lists(st.lists(values, min_size=c, max_size=c), min_size=n, max_size=n), min_size=b, max_size=b)
    )
    y = draw(st.lists(st.one_of(st.just(-100), st.integers(0, c - 1)), min_size=b, max_size=b))
    return torch.tensor(student), torch.tensor(teacher), torch.tensor(y, dtype=torch.long)


def plugin_sets(n_teachers):
    """Every combination a recipe can enable (AE-KD excludes correctness ensembling on labeled samples)."""
    sets = [{AveragePlugin: {}}]
    for weighting in WEIGHTINGS:
        sets.append({CorrectnessPlugin: {"teacher_weighting": weighting}, DisagreementPlugin: {"apply_to": "all"}})
    cap = max(0.6, 1.0 / n_teachers)
    sets.append({AEKDPlugin: {"C": cap}, DisagreementPlugin: {}})
    sets.append({AEKDPlugin: {"C": 1.0 / n_teachers}, CorrectnessPlugin: {"ensembling": False}})
    return sets


# ----------------------------------------------------------------------------------------------- distributions
@SETTINGS
@given(data=batches(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_weights_are_distributions_and_everything_is_finite(data, temperature):
    student, teacher, y = data
    for plugins in plugin_sets(teacher.shape[1]):
        logits = student.clone().requires_grad_(True)
        out = make_loss(plugins, temperature=temperature)(logits, teacher, y)
        w = out.teacher_weights
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones(len(y)), atol=1e-5, rtol=0)
        for tensor in (out.kd_weights, out.sample_weights, out.per_sample, out.kd, out.task, out.loss):
            assert torch.isfinite(tensor).all(), plugins
        assert (out.kd_weights > 0).all() and (out.kd_weights <= 1).all()
        assert (out.sample_weights >= 1).all()
        out.loss.backward()
        assert torch.isfinite(logits.grad).all(), plugins
        assert not any(t.requires_grad for t in (w, out.kd_weights, out.sample_weights))


@SETTINGS
@given(data=batches(values=moderate), cap=st.sampled_from([None, 0.4, 0.6, 1.0, 3.0]))
def test_aekd_weights_are_feasible_and_no_worse_than_any_vertex(data, cap):
    student, teacher, y = data
    n = teacher.shape[1]
    cap = 1.0 / n if cap is None else max(cap, 1.0 / n)
    batch = kdkit.KDBatch(student, teacher, y, 1.0).select(None, "unlabeled")
    a = run_hook(AEKDPlugin(AEKDPlugin.Options(C=cap)), "kdkit_teacher_weights", batch)[0].double()
    assert (a >= 0).all() and (a <= cap + 1e-6).all() and abs(a.sum().item() - 1) < 1e-6
    gram = gradient_gram(batch.student_probs, batch.teacher_probs)
    value = a @ gram @ a
    tol = 1e-6 * gram.diagonal().max() + 1e-12
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert value <= uniform @ gram @ uniform + tol
    # every "fill the caps in some order" vertex of the feasible set, for a few orders
    for order in (range(n), reversed(range(n)), gram.diagonal().argsort().tolist()):
        vertex, mass = torch.zeros(n, dtype=torch.float64), 1.0
        for i in order:
            take = min(cap, mass)
            vertex[i], mass = take, mass - take
        assert value <= vertex @ gram @ vertex + tol


# ----------------------------------------------------------------------------------------------- symmetry
@SETTINGS
@given(data=batches(), permutation_seed=st.integers(0, 2**16), weighting=st.sampled_from(WEIGHTINGS))
def test_permuting_teachers_permutes_weights(data, permutation_seed, weighting):
    student, teacher, y = data
    n = teacher.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(permutation_seed))
    loss_fn = make_loss({CorrectnessPlugin: {"teacher_weighting": weighting}, DisagreementPlugin: {"apply_to": "all"}})
    out, permuted = loss_fn(student, teacher, y), loss_fn(student, teacher[:, perm], y)
    torch.testing.assert_close(permuted.teacher_weights, out.teacher_weights[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.kd_weights, out.kd_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.sample_weights, out.sample_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.loss, out.loss, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(data=batches(values=moderate), permutation_seed=st.integers(0, 2**16))
def test_aekd_objective_is_permutation_invariant(data, permutation_seed):
    # the minimiser need not be unique (G is singular), but the minimum is
    student, teacher, y = data
    n = teacher.shape[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(permutation_seed))
    plugin = AEKDPlugin(AEKDPlugin.Options(C=max(0.6, 1.0 / n)))
    values = []
    for t in (teacher, teacher[:, perm]):
        batch = kdkit.KDBatch(student, t, y, 1.0).select(None, "labeled")
        a = run_hook(plugin, "kdkit_teacher_weights", batch)[0].double()
        gram = gradient_gram(batch.student_probs, batch.teacher_probs)
        values.append((a @ gram @ a).item())
    assert abs(values[0] - values[1]) <= 1e-6 * gram.diagonal().max().item() + 1e-12


# ----------------------------------------------------------------------------------------------- monotonicity
@SETTINGS
@given(
    losses=st.lists(st.floats(0, 50), min_size=2, max_size=6),
    data=st.data(),
    weighting=st.sampled_from(["inverse-loss", "softmax-neg-loss"]),
)
def test_weight_falls_as_the_teachers_loss_grows(losses, data, weighting):
    i = data.draw(st.integers(0, len(losses) - 1))
    delta = data.draw(st.floats(1e-3, 50))
    before = torch.tensor([losses], dtype=torch.float64)
    after = before.clone()
    after[0, i] += delta
    w0, w1 = (correctness_teacher_weights(x, weighting, 1e-6)[0] for x in (before, after))
    assert w1[i] <= w0[i]
    # strictly smaller wherever float64 can tell: softmax(-[0, 38]) is exactly 1.0 in float64 (e^-38 < eps/2)
    if 1e-12 < w0[i] < 1 - 1e-12:
        assert w1[i] < w0[i]
    others = [j for j in range(len(losses)) if j != i]
    assert (w1[others] >= w0[others]).all()


@SETTINGS
@given(data=batches(size=(1, 3)), drop=st.floats(0.5, 30, width=32), weighting=st.sampled_from(WEIGHTINGS))
def test_lowering_the_gold_logit_never_raises_the_weight(data, drop, weighting):
    # Through kdkit: lowering teacher 0's gold-class logit raises its loss L_0. Its weight must not rise under
    # inverse-loss and softmax-neg-loss; under Eq. 1 as printed it must not fall (that is the contradiction).
    student, teacher, y = data
    y = y.clamp_min(0)  # all labeled
    lowered = teacher.clone()
    lowered[torch.arange(len(y)), 0, y] -= drop
    assume(torch.isfinite(lowered).all())
    plugin = CorrectnessPlugin(CorrectnessPlugin.Options(teacher_weighting=weighting))
    w0, w1 = (
        run_hook(plugin, "kdkit_teacher_weights", kdkit.KDBatch(student, t, y, 1.0, "labeled"))[:, 0]
        for t in (teacher, lowered)
    )
    k0, k1 = (
        run_hook(plugin, "kdkit_kd_weights", kdkit.KDBatch(student, t, y, 1.0, "labeled")) for t in (teacher, lowered)
    )
    slack = 1e-6
    if weighting == "as-printed":
        assert (w1 >= w0 - slack).all()
    else:
        assert (w1 <= w0 + slack).all()
    assert (k1 <= k0 + slack).all()  # Eq. 3: worse teachers, smaller kd weight


# ----------------------------------------------------------------------------------------------- disagreement
@SETTINGS
@given(data=batches(), lam=st.floats(0, 100))
def test_no_disagreement_when_all_teachers_agree(data, lam):
    student, teacher, y = data
    same = teacher[:, :1].expand_as(teacher).contiguous()
    batch = kdkit.KDBatch(student, same, y, 1.0, "unlabeled")
    s = run_hook(DisagreementPlugin(DisagreementPlugin.Options(lam=lam)), "kdkit_sample_weights", batch)
    torch.testing.assert_close(s, torch.ones(len(y)), atol=1e-6, rtol=0)


@SETTINGS
@given(data=batches(values=moderate), shifts=st.lists(st.floats(-10, 10, width=32), min_size=5, max_size=5))
def test_no_disagreement_when_teachers_differ_by_a_constant(data, shifts):
    # softmax is shift-invariant: logits z and z + c give the same prediction
    student, teacher, y = data
    n = teacher.shape[1]
    same = teacher[:, :1] + torch.tensor(shifts[:n]).view(1, n, 1)
    batch = kdkit.KDBatch(student, same, y, 2.0, "unlabeled")
    s = run_hook(DisagreementPlugin(DisagreementPlugin.Options()), "kdkit_sample_weights", batch)
    torch.testing.assert_close(s, torch.ones(len(y)), atol=1e-4, rtol=0)


@SETTINGS
@given(data=batches(values=moderate))
def test_disagreement_is_positive_when_teachers_differ(data):
    student, teacher, y = data
    probs = torch.softmax(teacher.double(), dim=-1)
    spread = (probs - probs[:, :1]).abs().amax(dim=(1, 2))  # how far any teacher is from teacher 0
    batch = kdkit.KDBatch(student, teacher, y, 1.0, "unlabeled")
    s = run_hook(DisagreementPlugin(DisagreementPlugin.Options()), "kdkit_sample_weights", batch)
    assert (s >= 1).all()
    assert (s[spread > 1e-2] > 1).all()


@pytest.mark.parametrize("n", [2, 3, 6])
def test_disagreement_of_one_hot_teachers(n):
    # Certain teachers on different classes: KL(P_i || P_j) = -log P_j(c_i) = 1e4 (the floor); pairs on the
    # same class contribute 0. Classes [0, 1, 0, 1, ...]: the number of ordered pairs that differ is
    # 2 * ceil(n/2) * floor(n/2), so L_p = 1e4 * 2 * ceil(n/2) * floor(n/2) / (n (n - 1)).
    teacher = torch.tensor([[[1e30, -1e30] if i % 2 == 0 else [-1e30, 1e30] for i in range(n)]])
    batch = kdkit.KDBatch(torch.zeros(1, 2), teacher, torch.tensor([-100]), 1.0, "unlabeled")
    s = run_hook(DisagreementPlugin(DisagreementPlugin.Options(lam=1.0)), "kdkit_sample_weights", batch)
    pairs = 2 * ((n + 1) // 2) * (n // 2)
    torch.testing.assert_close(s, torch.tensor([1 + 1e4 * pairs / (n * (n - 1))]))
    assert np.isfinite(s.numpy()).all()

"""The built-in plugins and DistillationLoss against the equations of DESIGN.md section 1.

Every expected number here is worked out by hand (the arithmetic is in the comments) or by a float64
reference written independently of kdkit: explicit Python loops over samples and teacher pairs with
``math.log`` / ``math.exp`` (``reference_loss``), and, for AE-KD, a brute-force solution of the quadratic
programme (every split of the teachers into at-zero / at-cap / free), an exact formula for binary tasks and
scipy's SLSQP.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import kdkit
from kdkit.testing import fake_logits, make_loss, run_hook, stream_view
from kdkit_plugins.aekd import AEKDPlugin, gradient_gram, min_norm_capped_simplex
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

LOG3, LOG2 = math.log(3.0), math.log(2.0)
EPS = 1e-6  # the correctness plugin's default eps; passed explicitly where it matters
LOG_FLOOR = -1.0e4  # documented floor of log-probabilities (docs/METHOD.md, "Numerical safety")

# Two teachers, two classes, used throughout: softmax([log 3, 0]) = (3/4, 1/4), softmax([0, log 3]) = (1/4, 3/4).
TEACHERS_T1 = [[LOG3, 0.0], [0.0, LOG3]]


def tensor(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def labels(*ys):
    return torch.tensor(ys, dtype=torch.long)


def correctness(**options):
    return CorrectnessPlugin(CorrectnessPlugin.Options(**options))


def disagreement(**options):
    return DisagreementPlugin(DisagreementPlugin.Options(**options))


def aekd(**options):
    return AEKDPlugin(AEKDPlugin.Options(**options))


def loss_of(plugins, student, teacher, y, **kwargs):
    return kdkit.DistillationLoss(plugins, **kwargs)(tensor(student), tensor(teacher), labels(*y))


# =============================================================================================== correctness
# Sample: label 0, teachers TEACHERS_T1. Task losses at T = 1:
#   L1 = -log(3/4) = log(4/3) ~ 0.287682,   L2 = -log(1/4) = log 4 ~ 1.386294.
L1, L2 = math.log(4 / 3), math.log(4.0)


def test_inverse_loss_weights_by_hand():
    # w1 = (1/(L1+eps)) / (1/(L1+eps) + 1/(L2+eps)) = (L2+eps) / (L1+L2+2 eps)
    #    ~ log 4 / log(16/3) ~ 1.386294 / 1.673976 ~ 0.828144
    w1 = (L2 + EPS) / (L1 + L2 + 2 * EPS)
    out = loss_of([correctness(teacher_weighting="inverse-loss", eps=EPS)], [[0.0, 0.0]], [TEACHERS_T1], [0])
    torch.testing.assert_close(out.teacher_weights, tensor([[w1, 1 - w1]]))
    assert abs(w1 - 0.828144) < 1e-5  # the hand value in the comment


def test_softmax_neg_loss_weights_by_hand():
    # softmax(-L)_i = exp(-L_i) / sum_j exp(-L_j) = p_i(y) / sum_j p_j(y) = (3/4) / (3/4 + 1/4) = 3/4
    out = loss_of([correctness(teacher_weighting="softmax-neg-loss")], [[0.0, 0.0]], [TEACHERS_T1], [0])
    torch.testing.assert_close(out.teacher_weights, tensor([[0.75, 0.25]]))


def test_as_printed_weights_by_hand():
    # Eq. 1 as printed: w1 = (L1+eps) / (L1+L2+2 eps) ~ 0.171856: the worse teacher (teacher 2) gets more
    w1 = (L1 + EPS) / (L1 + L2 + 2 * EPS)
    out = loss_of([correctness(teacher_weighting="as-printed", eps=EPS)], [[0.0, 0.0]], [TEACHERS_T1], [0])
    torch.testing.assert_close(out.teacher_weights, tensor([[w1, 1 - w1]]))
    assert out.teacher_weights[0, 1] > out.teacher_weights[0, 0]


def test_label_decides_which_teacher_is_right():
    # label 1: L1 = log 4, L2 = log(4/3), so the weights swap
    w1 = (L1 + EPS) / (L1 + L2 + 2 * EPS)  # inverse-loss weight of teacher 1 is now (L2'+eps)/(...) = this
    out = loss_of([correctness(eps=EPS)], [[0.0, 0.0]], [TEACHERS_T1], [1])
    torch.testing.assert_close(out.teacher_weights, tensor([[w1, 1 - w1]]))


def test_kd_weight_eq3_by_hand():
    # k = 1 / (1 + (L1 + L2)/2) = 1 / (1 + log(16/3)/2) ~ 1 / 1.836988 ~ 0.544369
    out = loss_of([correctness()], [[0.0, 0.0]], [TEACHERS_T1], [0])
    torch.testing.assert_close(out.kd_weights, tensor([1 / (1 + (L1 + L2) / 2)]))
    assert abs(out.kd_weights.item() - 0.544369) < 1e-5


def test_zero_losses_are_finite():
    # Both teachers certain and right: L = log(1 + e^-1e4) = 0 exactly in float32.
    certain = [[1e4, 0.0], [1e4, 0.0]]
    # inverse-loss: both 1/eps -> 1/2 each; as-printed: eps/(2 eps) = 1/2; softmax-neg-loss: e^0/(2 e^0) = 1/2
    for weighting in ("inverse-loss", "as-printed", "softmax-neg-loss"):
        out = loss_of([correctness(teacher_weighting=weighting)], [[0.0, 0.0]], [certain], [0])
        torch.testing.assert_close(out.teacher_weights, tensor([[0.5, 0.5]]))
        torch.testing.assert_close(out.kd_weights, tensor([1.0]))  # k = 1/(1 + 0)
    # One certain-and-right teacher (L1 = 0) beside L2 = log 4: inverse-loss gives w1 = (L2+eps)/(L2+2 eps).
    out = loss_of([correctness(eps=EPS)], [[0.0, 0.0]], [[[1e4, 0.0], [0.0, LOG3]]], [0])
    w1 = (L2 + EPS) / (L2 + 2 * EPS)
    torch.testing.assert_close(out.teacher_weights, tensor([[w1, 1 - w1]]))


def test_certain_wrong_teacher_loss_is_floored():
    # Teacher 1 certain of the wrong class: log p(y) = -1e5 is floored at -1e4, so L1 = 1e4 (finite),
    # teacher 2 = log 4. k = 1 / (1 + (1e4 + log 4)/2).
    out = loss_of([correctness(eps=EPS)], [[0.0, 0.0]], [[[0.0, 1e5], [0.0, LOG3]]], [0])
    w1 = (1 / (1e4 + EPS)) / (1 / (1e4 + EPS) + 1 / (L2 + EPS))
    torch.testing.assert_close(out.teacher_weights, tensor([[w1, 1 - w1]]))
    torch.testing.assert_close(out.kd_weights, tensor([1 / (1 + (1e4 + L2) / 2)]))


def test_teacher_losses_use_temperature_one():
    # T = 2 with teacher logits 2 log 3: the soft targets are (3/4, 1/4) but the task losses are taken at T = 1,
    # softmax([2 log 3, 0]) = (9/10, 1/10): softmax-neg-loss weights (9/10, 1/10) / 1.
    teachers = [[2 * LOG3, 0.0], [0.0, 2 * LOG3]]
    out = loss_of([correctness(teacher_weighting="softmax-neg-loss")], [[0.0, 0.0]], [teachers], [0], temperature=2)
    torch.testing.assert_close(out.teacher_weights, tensor([[0.9, 0.1]]))
    # k = 1 / (1 + (log(10/9) + log 10)/2)
    torch.testing.assert_close(out.kd_weights, tensor([1 / (1 + (math.log(10 / 9) + math.log(10)) / 2)]))


def test_correctness_ignores_unlabeled_and_ablation_switches():
    batch = kdkit.KDBatch(tensor([[0.0, 0.0]]), tensor([TEACHERS_T1]), labels(-100), 1.0, "unlabeled")
    assert run_hook(correctness(), "kdkit_teacher_weights", batch) is None
    assert run_hook(correctness(), "kdkit_kd_weights", batch) is None
    labeled = kdkit.KDBatch(tensor([[0.0, 0.0]]), tensor([TEACHERS_T1]), labels(0), 1.0, "labeled")
    assert run_hook(correctness(ensembling=False), "kdkit_teacher_weights", labeled) is None
    assert run_hook(correctness(loss_weighting=False), "kdkit_kd_weights", labeled) is None
    torch.testing.assert_close(
        run_hook(correctness(ensembling=False), "kdkit_kd_weights", labeled), tensor([1 / (1 + (L1 + L2) / 2)])
    )


# =============================================================================================== disagreement
def test_pairwise_kl_two_teachers_by_hand():
    # KL(P1||P2) = 3/4 log((3/4)/(1/4)) + 1/4 log((1/4)/(3/4)) = 3/4 log 3 - 1/4 log 3 = 1/2 log 3 = KL(P2||P1)
    # L_p = (1/2 log 3 + 1/2 log 3) / (2 * 1) = 1/2 log 3 ~ 0.549306;  s = 1 + 10 * L_p ~ 6.493061
    out = loss_of([disagreement()], [[0.0, 0.0]], [TEACHERS_T1], [-100])
    torch.testing.assert_close(out.sample_weights, tensor([1 + 10 * 0.5 * LOG3]))
    assert abs(out.sample_weights.item() - 6.493061) < 1e-5


def test_pairwise_kl_three_teachers_by_hand():
    # P3 = softmax([0, 0]) = (1/2, 1/2).
    # KL(P1||P3) = 3/4 log(3/2) + 1/4 log(1/2) = 3/4 log 3 - log 2 = KL(P2||P3)
    # KL(P3||P1) = 1/2 log(2/3) + 1/2 log 2 = log 2 - 1/2 log 3 = KL(P3||P2)
    # sum over the 6 ordered pairs = log 3 + 2 (3/4 log 3 - log 2) + 2 (log 2 - 1/2 log 3) = 3/2 log 3
    # L_p = (3/2 log 3) / (3 * 2) = 1/4 log 3;  lambda = 15: s = 1 + 15/4 log 3
    teachers = [*TEACHERS_T1, [0.0, 0.0]]
    out = loss_of([disagreement(**{"lambda": 15})], [[0.0, 0.0]], [teachers], [-100])
    torch.testing.assert_close(out.sample_weights, tensor([1 + 15 / 4 * LOG3]))


def test_pairwise_kl_uses_temperature():
    # teacher logits 2 log 3 at T = 2 are log 3: the same P as TEACHERS_T1, so L_p = 1/2 log 3 again
    teachers = [[2 * LOG3, 0.0], [0.0, 2 * LOG3]]
    out = loss_of([disagreement(**{"lambda": 2})], [[0.0, 0.0]], [teachers], [-100], temperature=2)
    torch.testing.assert_close(out.sample_weights, tensor([1 + 2 * 0.5 * LOG3]))


def test_disagreement_streams():
    lab = kdkit.KDBatch(tensor([[0.0, 0.0]]), tensor([TEACHERS_T1]), labels(1), 1.0, "labeled")
    assert run_hook(disagreement(), "kdkit_sample_weights", lab) is None
    torch.testing.assert_close(
        run_hook(disagreement(apply_to="all"), "kdkit_sample_weights", lab), tensor([1 + 10 * 0.5 * LOG3])
    )
    # lambda = 0 switches the weighting off: s = 1
    unl = kdkit.KDBatch(tensor([[0.0, 0.0]]), tensor([TEACHERS_T1]), labels(-100), 1.0, "unlabeled")
    torch.testing.assert_close(run_hook(disagreement(lam=0), "kdkit_sample_weights", unl), tensor([1.0]))


def test_disagreement_needs_two_teachers():
    unl = kdkit.KDBatch(tensor([[0.0, 0.0]]), tensor([[[LOG3, 0.0]]]), labels(-100), 1.0, "unlabeled")
    with pytest.raises(kdkit.PluginError, match=r"at least 2 teachers.*N = 1"):
        run_hook(disagreement(), "kdkit_sample_weights", unl)


# =============================================================================================== full loss
# Batch of two samples, teachers TEACHERS_T1 for both, plugins correctness (softmax-neg-loss) + disagreement.
#   sample 0: labeled y=0, student [0, 0] -> p_s = (1/2, 1/2)
#     w = (3/4, 1/4); target = 3/4 (3/4, 1/4) + 1/4 (1/4, 3/4) = (10/16, 6/16) = (5/8, 3/8)
#     kd = -(5/8 log 1/2 + 3/8 log 1/2) = log 2;  task = -log 1/2 = log 2
#     k = 1/(1 + (log(4/3) + log 4)/2);  s = 1;  loss_0 = k log 2 + log 2
#   sample 1: unlabeled, student [log 3, 0] -> p_s = (3/4, 1/4)
#     w = (1/2, 1/2); target = (1/2, 1/2);  kd = -(1/2 log 3/4 + 1/2 log 1/4) = 1/2 log(16/3);  task = 0
#     k = 1;  s = 1 + 10 * 1/2 log 3;  loss_1 = (1 + 5 log 3) * 1/2 log(16/3)
K0 = 1 / (1 + (L1 + L2) / 2)
KD0, TASK0 = LOG2, LOG2
KD1 = 0.5 * math.log(16 / 3)
S1 = 1 + 5 * LOG3
MIXED_T1 = ([[0.0, 0.0], [LOG3, 0.0]], [TEACHERS_T1, TEACHERS_T1], [0, -100])


def unikd(weighting="softmax-neg-loss"):
    return [correctness(teacher_weighting=weighting), disagreement()]


def test_full_loss_mixed_batch_t1():
    out = loss_of(unikd(), *MIXED_T1)
    loss0, loss1 = K0 * KD0 + TASK0, S1 * KD1
    torch.testing.assert_close(out.kd, tensor([KD0, KD1]))
    torch.testing.assert_close(out.task, tensor([TASK0, 0.0]))
    torch.testing.assert_close(out.teacher_weights, tensor([[0.75, 0.25], [0.5, 0.5]]))
    torch.testing.assert_close(out.kd_weights, tensor([K0, 1.0]))
    torch.testing.assert_close(out.sample_weights, tensor([1.0, S1]))
    torch.testing.assert_close(out.per_sample, tensor([loss0, loss1]))
    torch.testing.assert_close(out.loss, tensor((loss0 + loss1) / 2))


def test_full_loss_labeled_only_and_unlabeled_only_t1():
    student, teacher, y = MIXED_T1
    only_labeled = loss_of(unikd(), student[:1], teacher[:1], y[:1])
    torch.testing.assert_close(only_labeled.loss, tensor(K0 * KD0 + TASK0))
    only_unlabeled = loss_of(unikd(), student[1:], teacher[1:], y[1:])
    torch.testing.assert_close(only_unlabeled.loss, tensor(S1 * KD1))


def test_full_loss_on_option_t1():
    # on = ["labeled"]: sample 1 gets no kd term and has no task term: loss_1 = s * (1 * 0 + 0) = 0
    out = loss_of(unikd(), *MIXED_T1, on=["labeled"])
    torch.testing.assert_close(out.kd, tensor([KD0, 0.0]))
    torch.testing.assert_close(out.loss, tensor((K0 * KD0 + TASK0 + 0.0) / 2))
    # on = ["unlabeled"]: sample 0 keeps only its task term: loss_0 = 1 * (k * 0 + log 2)
    out = loss_of(unikd(), *MIXED_T1, on=["unlabeled"])
    torch.testing.assert_close(out.kd, tensor([0.0, KD1]))
    torch.testing.assert_close(out.loss, tensor((TASK0 + S1 * KD1) / 2))


# Same at T = 2, teacher logits 2 log 3 (soft targets (3/4, 1/4) at T = 2, (9/10, 1/10) at T = 1).
#   sample 0: labeled y=0, student [2 log 2, 0] -> p_s at T=2: (2/3, 1/3); at T=1: (4/5, 1/5)
#     w = (9/10, 1/10) (softmax-neg-loss of the T = 1 losses); target = 0.9 (3/4,1/4) + 0.1 (1/4,3/4) = (0.7, 0.3)
#     kd = -T^2 (0.7 log 2/3 + 0.3 log 1/3);  task = -log 4/5 = log(5/4)
#     k = 1/(1 + (log(10/9) + log 10)/2);  loss_0 = k kd + task
#   sample 1: unlabeled, student [0, 0] -> p_s = (1/2, 1/2); target = (1/2, 1/2); kd = 4 log 2
#     L_p = 1/2 log 3 (P at T = 2 equal TEACHERS_T1's); s = 1 + 5 log 3;  loss_1 = s * 4 log 2
def test_full_loss_mixed_batch_t2():
    teachers = [[2 * LOG3, 0.0], [0.0, 2 * LOG3]]
    out = loss_of(unikd(), [[2 * LOG2, 0.0], [0.0, 0.0]], [teachers, teachers], [0, -100], temperature=2)
    kd0 = -4 * (0.7 * math.log(2 / 3) + 0.3 * math.log(1 / 3))
    task0 = math.log(5 / 4)
    k0 = 1 / (1 + (math.log(10 / 9) + math.log(10)) / 2)
    kd1, s1 = 4 * LOG2, 1 + 5 * LOG3
    torch.testing.assert_close(out.kd, tensor([kd0, kd1]))
    torch.testing.assert_close(out.task, tensor([task0, 0.0]))
    torch.testing.assert_close(out.per_sample, tensor([k0 * kd0 + task0, s1 * kd1]))
    torch.testing.assert_close(out.loss, tensor((k0 * kd0 + task0 + s1 * kd1) / 2))
    out = loss_of(unikd(), [[2 * LOG2, 0.0], [0.0, 0.0]], [teachers, teachers], [0, -100], temperature=2,
                  on=["unlabeled"])
    torch.testing.assert_close(out.loss, tensor((task0 + s1 * kd1) / 2))


def test_average_plugin_by_hand():
    # average: target = (1/2, 1/2) for sample 0 too: kd = log 2, task = log 2, k = s = 1
    out = loss_of([AveragePlugin()], *MIXED_T1)
    torch.testing.assert_close(out.teacher_weights, torch.full((2, 2), 0.5))
    torch.testing.assert_close(out.per_sample, tensor([LOG2 + LOG2, KD1]))
    # no plugin at all is the same objective
    torch.testing.assert_close(loss_of([], *MIXED_T1).loss, out.loss)


# =============================================================================================== float64 reference
def ref_log_softmax(row, temperature):
    z = [x / temperature for x in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(x - top) for x in z))
    return [max(x - lse, LOG_FLOOR) for x in z]


def reference_loss(student, teacher, y, *, temperature=1.0, on=("labeled", "unlabeled"), weighting=None,
                   eps=EPS, kd_weighting=False, lam=None, apply_to="unlabeled"):
    """Loops over samples, teachers and teacher pairs; returns (loss, per_sample, w, k, s) as Python floats."""
    per_sample, all_w, all_k, all_s = [], [], [], []
    for b in range(len(student)):
        n, labeled = len(teacher[b]), y[b] != -100
        log_p = [ref_log_softmax(teacher[b][i], temperature) for i in range(n)]
        p = [[math.exp(v) for v in row] for row in log_p]
        losses = [-ref_log_softmax(teacher[b][i], 1.0)[y[b]] for i in range(n)] if labeled else None
        w = [1.0 / n] * n
        if labeled and weighting is not None:
            if weighting == "inverse-loss":
                raw = [1.0 / (loss + eps) for loss in losses]
            elif weighting == "softmax-neg-loss":
                raw = [math.exp(-loss) for loss in losses]
            else:
                raw = [loss + eps for loss in losses]
            w = [r / sum(raw) for r in raw]
        k = 1.0 / (1.0 + sum(losses) / n) if (labeled and kd_weighting) else 1.0
        s = 1.0
        # an unlabeled sample outside `on` has no loss at all; kdkit reports neutral weights for it
        asked = labeled or "unlabeled" in on
        if lam is not None and asked and (not labeled or apply_to == "all"):
            total = 0.0
            for i in range(n):
                for j in range(n):
                    if i != j:
                        total += sum(p[i][c] * (log_p[i][c] - log_p[j][c]) for c in range(len(p[i])))
            s = 1.0 + lam * total / (n * (n - 1))
        student_log_p = ref_log_softmax(student[b], temperature)
        target = [sum(w[i] * p[i][c] for i in range(n)) for c in range(len(student_log_p))]
        stream = "labeled" if labeled else "unlabeled"
        kd = -sum(t * lp for t, lp in zip(target, student_log_p)) * temperature**2 if stream in on else 0.0
        task = -ref_log_softmax(student[b], 1.0)[y[b]] if labeled else 0.0
        per_sample.append(s * (k * kd + task))
        all_w.append(w), all_k.append(k), all_s.append(s)
    return sum(per_sample) / len(per_sample), per_sample, all_w, all_k, all_s


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("weighting", ["inverse-loss", "softmax-neg-loss", "as-printed"])
@pytest.mark.parametrize("on", [("labeled", "unlabeled"), ("labeled",), ("unlabeled",)])
def test_against_float64_reference(temperature, weighting, on):
    for seed in range(3):
        student, teacher, y = fake_logits(size=7, teachers=3, classes=3, labeled=4, seed=seed, scale=3.0)
        plugins = [correctness(teacher_weighting=weighting, eps=EPS), disagreement(**{"lambda": 10})]
        out = kdkit.DistillationLoss(plugins, temperature=temperature, on=on)(student, teacher, y)
        ref, per_sample, w, k, s = reference_loss(
            student.double().tolist(), teacher.double().tolist(), y.tolist(), temperature=temperature, on=on,
            weighting=weighting, kd_weighting=True, lam=10.0,
        )
        f64 = dict(dtype=torch.float64)
        torch.testing.assert_close(out.teacher_weights.double(), torch.tensor(w, **f64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.kd_weights.double(), torch.tensor(k, **f64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.sample_weights.double(), torch.tensor(s, **f64), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.per_sample.double(), torch.tensor(per_sample, **f64), rtol=1e-5, atol=1e-5)
        assert abs(out.loss.item() - ref) <= 1e-5 * max(1.0, abs(ref))


def test_reference_all_samples_disagreement_and_float64_inputs():
    student, teacher, y = fake_logits(size=6, teachers=4, classes=5, labeled=3, seed=11, scale=2.0)
    plugins = [correctness(teacher_weighting="inverse-loss", eps=EPS), disagreement(lam=3.0, apply_to="all")]
    out = kdkit.DistillationLoss(plugins, temperature=1.5)(student.double(), teacher.double(), y)
    ref, per_sample, *_ = reference_loss(
        student.double().tolist(), teacher.double().tolist(), y.tolist(), temperature=1.5,
        weighting="inverse-loss", kd_weighting=True, lam=3.0, apply_to="all",
    )
    assert out.loss.dtype == torch.float64
    # the weights pass through float32 (kdkit's contract), so agreement is at float32 precision
    torch.testing.assert_close(out.per_sample, torch.tensor(per_sample, dtype=torch.float64), rtol=1e-6, atol=1e-6)


# =============================================================================================== AE-KD
def reference_gram(student, teacher):
    """G_ij = g_i . g_j, g_i = mean over samples of softmax(z_s) - softmax(z_t[:, i]) (loops, float64)."""
    n, size = len(teacher[0]), len(student)
    g = []
    for i in range(n):
        acc = None
        for b in range(size):
            ps = [math.exp(v) for v in ref_log_softmax(student[b], 1.0)]
            pt = [math.exp(v) for v in ref_log_softmax(teacher[b][i], 1.0)]
            diff = [a - c for a, c in zip(ps, pt)]
            acc = diff if acc is None else [a + d for a, d in zip(acc, diff)]
        g.append([a / size for a in acc])
    return np.array([[sum(a * c for a, c in zip(gi, gj)) for gj in g] for gi in g]), np.array(g)


def brute_force(gram, cap):
    """min a^T G a over {sum a = 1, 0 <= a <= cap} by enumerating every split of the teachers into at-zero,
    at-cap and free, solving the equality-constrained problem on the free ones (KKT system) and keeping the best
    feasible point. With G positive definite the optimum's own split returns it, so this finds the argmin."""
    n = len(gram)
    best, best_a = math.inf, None
    for split in itertools.product((0, 1, 2), repeat=n):  # 0: a_i = 0, 1: a_i = cap, 2: free
        a = np.zeros(n)
        upper = [i for i in range(n) if split[i] == 1]
        free = [i for i in range(n) if split[i] == 2]
        a[upper] = cap
        mass = 1.0 - cap * len(upper)
        if free:
            m = len(free)
            kkt = np.zeros((m + 1, m + 1))
            kkt[:m, :m] = 2 * gram[np.ix_(free, free)]
            kkt[:m, m] = kkt[m, :m] = 1.0
            rhs = np.zeros(m + 1)
            rhs[:m] = -2 * gram[np.ix_(free, upper)] @ a[upper] if upper else 0.0
            rhs[m] = mass
            try:
                a[free] = np.linalg.solve(kkt, rhs)[:m]
            except np.linalg.LinAlgError:
                continue
        elif abs(mass) > 1e-12:
            continue
        if a.min() < -1e-12 or a.max() > cap + 1e-12:
            continue
        value = a @ gram @ a
        if value < best:
            best, best_a = value, a
    return best, best_a


def binary_exact(d, cap):
    """Two classes: g_i = (d_i, -d_i), so a^T G a = 2 (sum a_i d_i)^2. sum a_i d_i ranges over [lo, hi], each end
    reached by filling the caps greedily (fractional knapsack); the minimum is 0 if the range holds 0."""

    def fill(values):
        total, mass = 0.0, 1.0
        for v in values:
            take = min(cap, mass)
            total, mass = total + take * v, mass - take
        return total

    lo, hi = fill(sorted(d)), fill(sorted(d, reverse=True))
    return 0.0 if lo <= 0.0 <= hi else 2 * min(lo * lo, hi * hi)


def slsqp(gram, cap):
    n = len(gram)
    starts = [np.full(n, 1.0 / n)] + [np.eye(n)[i] * min(cap, 1.0) + (1 - min(cap, 1.0)) / max(n - 1, 1) * (
        1 - np.eye(n)[i]) for i in range(n)]
    best = math.inf
    for x0 in starts:
        res = minimize(lambda a: a @ gram @ a, x0, jac=lambda a: 2 * gram @ a, method="SLSQP",
                       bounds=[(0.0, cap)] * n, constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
                       options={"ftol": 1e-15, "maxiter": 500})
        if res.success:
            best = min(best, float(res.fun))
    return best


def aekd_weights(student, teacher, y=None, **options):
    y = labels(*([0] * len(student))) if y is None else y
    batch = kdkit.KDBatch(tensor(student), tensor(teacher), y, 1.0)
    return run_hook(aekd(**options), "kdkit_teacher_weights", batch.select(None, "labeled"))


def test_aekd_two_teachers_by_hand():
    # student [0, 0]: p_s = (1/2, 1/2). teacher 1 [log 3, 0]: P1 = (3/4, 1/4), g1 = (-1/4, 1/4);
    # teacher 2 [0, log 2]: P2 = (1/3, 2/3), g2 = (1/6, -1/6). a1 g1 + a2 g2 = 0 when -a1/4 + (1 - a1)/6 = 0,
    # i.e. a1 = 2/5, a2 = 3/5: objective 0, a unique minimiser for N = 2.
    teacher = [[[LOG3, 0.0], [0.0, LOG2]]]
    torch.testing.assert_close(aekd_weights([[0.0, 0.0]], teacher, C=0.6), tensor([[0.4, 0.6]]))
    torch.testing.assert_close(aekd_weights([[0.0, 0.0]], teacher, C=1.0), tensor([[0.4, 0.6]]))
    # C = 0.55: a2 <= 0.55; the objective 2 (a1/4 - (1-a1)/6)^2 is convex in a1 with its minimum at 2/5 < 0.45,
    # so the cap binds: a = (0.45, 0.55)
    torch.testing.assert_close(aekd_weights([[0.0, 0.0]], teacher, C=0.55), tensor([[0.45, 0.55]]))
    # and the full loss: target = 0.4 (3/4, 1/4) + 0.6 (1/3, 2/3) = (1/2, 1/2) = p_s: kd = log 2, task = log 2
    out = loss_of([aekd()], [[0.0, 0.0]], teacher, [0])
    torch.testing.assert_close(out.loss, tensor(2 * LOG2))


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_aekd_cap_one_over_n_is_exactly_the_average(n):
    student, teacher, y = fake_logits(size=5, teachers=n, classes=3, seed=n)
    batch = kdkit.KDBatch(student, teacher, y, 1.0).select(None, "labeled")
    weights = run_hook(aekd(C=1.0 / n), "kdkit_teacher_weights", batch)
    assert torch.equal(weights, torch.full((5, n), 1.0 / n))


def test_aekd_infeasible_cap_is_an_error():
    student, teacher, y = fake_logits(size=3, teachers=4, classes=2, seed=0)
    batch = kdkit.KDBatch(student, teacher, y, 1.0).select(None, "labeled")
    with pytest.raises(kdkit.PluginError, match=r"C = 0\.2 .*N = 4 teachers.*1/N = 0\.25"):
        run_hook(aekd(C=0.2), "kdkit_teacher_weights", batch)
    one = kdkit.KDBatch(student, teacher[:, :1], y, 1.0).select(None, "labeled")
    with pytest.raises(kdkit.PluginError, match=r"N = 1"):
        run_hook(aekd(), "kdkit_teacher_weights", one)  # default C = 0.6 < 1/1
    torch.testing.assert_close(run_hook(aekd(C=1.0), "kdkit_teacher_weights", one), torch.ones(3, 1))


def test_aekd_cap_binds():
    # Teacher 0 predicts exactly what the student predicts: g_0 = 0, so without a cap (C >= 1) the min-norm
    # point is a = e_0 (objective 0, unique since g_1, g_2 are linearly independent). With C = 0.6, a_0 = 0.6
    # (putting more on the others only scales their combination up) and the remaining 0.4 goes to the point of
    # least norm on the segment [g_1, g_2]: a_1 = 0.4 t, a_2 = 0.4 (1 - t), t = g_2.(g_2 - g_1) / |g_1 - g_2|^2.
    student = [[0.0, 0.5, -1.0, 2.0]]
    teacher = [[[0.0, 0.5, -1.0, 2.0], [1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 1.5, -0.5]]]
    gram, g = reference_gram(student, teacher)
    assert np.abs(g[0]).max() == 0.0
    for cap in (1.0, 5.0):
        torch.testing.assert_close(aekd_weights(student, teacher, C=cap), tensor([[1.0, 0.0, 0.0]]))
    t = g[2] @ (g[2] - g[1]) / ((g[1] - g[2]) @ (g[1] - g[2]))
    assert 0.0 < t < 1.0
    expected = [0.6, 0.4 * t, 0.4 * (1 - t)]
    torch.testing.assert_close(aekd_weights(student, teacher, C=0.6), tensor([expected]), atol=1e-6, rtol=0)
    _, a = brute_force(gram, 0.6)
    np.testing.assert_allclose(a, expected, atol=1e-9)


@pytest.mark.parametrize("cap", [0.26, 0.4, 0.6, 1.0, 2.0])
def test_aekd_positive_definite_argmin_matches_brute_force(cap):
    # 4 teachers, 6 classes: the g_i (in the 5-dim space of zero-sum vectors) are linearly independent, so G is
    # positive definite and the minimiser unique.
    for seed in range(4):
        student, teacher, y = fake_logits(size=5, teachers=4, classes=6, seed=100 + seed, scale=1.5)
        gram, _ = reference_gram(student.double().tolist(), teacher.double().tolist())
        assert np.linalg.eigvalsh(gram).min() > 1e-10
        best, a = brute_force(gram, cap)
        weights = aekd_weights(student.tolist(), teacher.tolist(), C=cap)
        assert torch.equal(weights, weights[:1].expand_as(weights))  # every sample gets the same vector
        np.testing.assert_allclose(weights[0].double().numpy(), a, atol=2e-6)
        # the float64 solver itself, on the reference G
        exact = np.array(min_norm_capped_simplex(gram.tolist(), cap))
        np.testing.assert_allclose(exact, a, atol=1e-9)
        assert exact @ gram @ exact <= best + 1e-12 * gram.diagonal().max()


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("cap", [0.6, 1.0, "1/N+"])
def test_aekd_binary_objective_matches_exact_value(n, cap):
    # Two classes: G has rank 1 and the minimiser is usually not unique; compare objective values.
    cap = 1.0 / n + 0.05 if cap == "1/N+" else cap
    if cap * n < 1:
        pytest.skip("infeasible")
    for seed in range(5):
        student, teacher, y = fake_logits(size=6, teachers=n, classes=2, seed=seed, scale=2.0)
        gram, g = reference_gram(student.double().tolist(), teacher.double().tolist())
        optimum = binary_exact(list(g[:, 0]), cap)
        a = aekd_weights(student.tolist(), teacher.tolist(), C=cap)[0].double().numpy()
        assert a.min() >= 0 and a.max() <= cap + 1e-6 and abs(a.sum() - 1) < 1e-6
        assert a @ gram @ a <= optimum + 1e-6 * gram.diagonal().max()
        exact = np.array(min_norm_capped_simplex(gram.tolist(), cap))
        assert abs(exact @ gram @ exact - optimum) <= 1e-12 * gram.diagonal().max()


def test_aekd_singular_objective_matches_scipy():
    # 6 teachers, 3 classes: G has rank 2.
    for seed in range(4):
        for cap in (0.2, 0.35, 0.6, 1.0):
            student, teacher, y = fake_logits(size=4, teachers=6, classes=3, seed=seed, scale=2.0)
            gram, _ = reference_gram(student.double().tolist(), teacher.double().tolist())
            a = np.array(min_norm_capped_simplex(gram.tolist(), cap))
            assert a.min() >= 0 and a.max() <= cap and abs(a.sum() - 1) < 1e-12
            assert a @ gram @ a <= slsqp(gram, cap) + 1e-10 * gram.diagonal().max()


def test_aekd_solver_does_not_stop_short_after_dropping_a_vertex():
    # Found by hypothesis (test_properties): 3 teachers, 3 classes, one sample, G of rank 2. The solver drops a
    # vertex of its corral, and the inverse it had kept up to date since then put the next vertex inside the
    # corral's affine hull: it stopped 9e-6 above the minimum in one teacher order and not in the other.
    # G as the plugin builds it (from float32 probabilities): the solver's path depends on its last bits
    batch = kdkit.KDBatch(
        tensor([[0.0, 0.0, 0.0]]), tensor([[[0.0, 8.0, 0.0], [-3.0, 0.0, 0.0], [-3.0, -1.0, 0.0]]]), tensor([-100]), 1.0
    ).select(None, "labeled")
    gram = gradient_gram(batch.student_probs, batch.teacher_probs).numpy()
    best, _ = brute_force(gram, 0.6)
    assert abs(best - slsqp(gram, 0.6)) <= 1e-9
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        permuted = gram[np.ix_(order, order)]
        a = np.array(min_norm_capped_simplex(permuted.tolist(), 0.6))
        assert a @ permuted @ a <= best + 1e-12 * gram.diagonal().max()


def test_aekd_gram_per_stream_and_gradient_modes():
    student, teacher, y = fake_logits(size=8, teachers=3, classes=4, labeled=5, seed=3)
    batch = kdkit.KDBatch(student, teacher, y, 1.0)
    for stream, rows in (("labeled", slice(0, 5)), ("unlabeled", slice(5, 8))):
        view = stream_view(batch, stream)
        gram, _ = reference_gram(student[rows].double().tolist(), teacher[rows].double().tolist())
        got = gradient_gram(view.student_probs, view.teacher_probs).numpy()
        np.testing.assert_allclose(got, gram, rtol=1e-5, atol=1e-7)
    # per-sample: G_ij = mean_b (p_s[b] - P_i[b]) . (p_s[b] - P_j[b])
    expected = np.zeros((3, 3))
    for b in range(8):
        ps = np.exp(ref_log_softmax(student[b].double().tolist(), 1.0))
        diffs = [ps - np.exp(ref_log_softmax(teacher[b, i].double().tolist(), 1.0)) for i in range(3)]
        expected += np.array([[di @ dj for dj in diffs] for di in diffs]) / 8
    got = gradient_gram(batch.student_probs, batch.teacher_probs, "per-sample").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_aekd_one_vector_per_stream_in_a_mixed_batch():
    student, teacher, y = fake_logits(size=8, teachers=3, classes=4, labeled=5, seed=3)
    out = make_loss({AEKDPlugin: {"C": 0.5}})(student, teacher, y)
    for stream, rows in (("labeled", slice(0, 5)), ("unlabeled", slice(5, 8))):
        gram, _ = reference_gram(student[rows].double().tolist(), teacher[rows].double().tolist())
        _, a = brute_force(gram, 0.5)
        expected = torch.tensor(a, dtype=torch.float32).expand(rows.stop - rows.start, 3)
        torch.testing.assert_close(out.teacher_weights[rows], expected, atol=2e-6, rtol=0)
    assert not torch.allclose(out.teacher_weights[0], out.teacher_weights[5])

"""Issue 13: the token-level objective against the equations.

* with k = V (dense teachers, or a top-k holding every token) it equals a float64 reference written independently
  (tests/helpers_lm.py: loops over positions, every plugin's equation from the dense logits of tiny causal LMs),
  for every built-in plugin, each stream mix and each divergence, and so do its gradients;
* the support combination and the missing mass, worked out by hand, and against a set-based reference for k < V;
* the student's distribution on the support (a custom autograd function over chunks) passes gradcheck;
* AE-KD on tokens takes its batch mean in vocabulary space (slots of different positions aligned by token id).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kdkit
from helpers_lm import (
    VOCAB,
    lm_batch,
    lm_logits,
    reference_support,
    reference_tokens,
    tiny_lm,
)
from kdkit.distill.chunked import SupportLogProbs
from test_equations import brute_force
from kdkit.testing import make_token_loss
from kdkit_plugins.aekd import AEKDPlugin
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

#: Agreement with the float64 reference: 1e-6, absolute or relative. kdkit's weights are float32 (the hooks'
#: contract), so a loss of 100 (lambda = 15 on strongly disagreeing random teachers) carries ~1e-5 of rounding.
TOL = 1e-6
PLUGIN_SETS = {
    "average": {AveragePlugin: {}},
    "unikd": {CorrectnessPlugin: {}, DisagreementPlugin: {"lambda": 10.0}},
    "unikd-all": {CorrectnessPlugin: {}, DisagreementPlugin: {"lambda": 15.0, "apply_to": "all"}},
    "aekd": {AEKDPlugin: {"C": 0.6}},
    "aekd-min-norm": {AEKDPlugin: {"C": 1.0}, CorrectnessPlugin: {"ensembling": False}},
}
MIXES = ["labeled", "unlabeled", "mixed"]


def by_name(plugins):
    return {cls.name: dict(options) for cls, options in plugins.items()}


@pytest.fixture(scope="module")
def models():
    return tiny_lm(0), [tiny_lm(seed) for seed in (1, 2, 3)]


def logits_of(models, mix, seed=0):
    student, teachers = models
    batch = lm_batch(mix, seed=seed)
    return lm_logits(student, batch.input_ids), lm_logits(teachers, batch.input_ids), batch


def assert_matches_reference(out, ref, student_grad, ref_grad):
    assert [tuple(p) for p in out.positions.tolist()] == ref["positions"]
    torch.testing.assert_close(out.loss.detach(), ref["loss"].detach(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(out.per_position, ref["per_position"], atol=TOL, rtol=TOL)
    for name in ("teacher_weights", "kd_weights", "sample_weights"):
        torch.testing.assert_close(getattr(out, name).double(), ref[name], atol=TOL, rtol=TOL, msg=name)
    torch.testing.assert_close(student_grad, ref_grad, atol=TOL, rtol=TOL)


# ----------------------------------------------------------------------------------------------- k = V
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("name", list(PLUGIN_SETS))
def test_dense_teachers_match_the_float64_reference(models, name, mix, temperature):
    zs, zt, batch = logits_of(models, mix)
    plugins = PLUGIN_SETS[name]
    student = zs.clone().requires_grad_(True)
    out = make_token_loss(plugins, temperature=temperature)(student, zt, batch.labels, batch.generated)
    out.loss.backward()
    reference_student = zs.clone().requires_grad_(True)
    ref = reference_tokens(reference_student, zt, batch.labels, batch.generated, plugins=by_name(plugins),
                           temperature=temperature)
    ref["loss"].backward()
    assert_matches_reference(out, ref, student.grad, reference_student.grad)
    assert out.labeled.tolist() == [not bool(batch.generated[b, t]) for b, t in ref["positions"]]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("name", ["average", "unikd", "aekd"])
def test_a_top_k_of_every_token_is_the_dense_computation(models, name, mix):
    zs, zt, batch = logits_of(models, mix, seed=1)
    plugins = PLUGIN_SETS[name]
    loss_fn = make_token_loss(plugins, temperature=2.0)
    teacher_labels = torch.where(batch.generated, -100, batch.labels)
    for k_is_v in (kdkit.TopKTeachers.from_logits(zt, teacher_labels, temperature=2.0),
                   kdkit.TopKTeachers.from_logits(zt, teacher_labels, k=VOCAB, temperature=2.0)):
        student = zs.clone().requires_grad_(True)
        out = loss_fn(student, k_is_v, batch.labels, batch.generated)
        out.loss.backward()
        reference_student = zs.clone().requires_grad_(True)
        ref = reference_tokens(reference_student, zt, batch.labels, batch.generated, plugins=by_name(plugins),
                               temperature=2.0)
        ref["loss"].backward()
        assert_matches_reference(out, ref, student.grad, reference_student.grad)


@pytest.mark.parametrize("divergence", ["reverse-kl", "jsd"])
@pytest.mark.parametrize("name", ["average", "unikd"])
def test_other_divergences_match_the_reference(models, name, divergence):
    zs, zt, batch = logits_of(models, "mixed", seed=2)
    plugins = PLUGIN_SETS[name]
    student = zs.clone().requires_grad_(True)
    out = make_token_loss(plugins, temperature=2.0, divergence=divergence, beta=0.3)(
        student, zt, batch.labels, batch.generated
    )
    out.loss.backward()
    reference_student = zs.clone().requires_grad_(True)
    ref = reference_tokens(reference_student, zt, batch.labels, batch.generated, plugins=by_name(plugins),
                           temperature=2.0, divergence=divergence, beta=0.3)
    ref["loss"].backward()
    assert_matches_reference(out, ref, student.grad, reference_student.grad)


@pytest.mark.parametrize("on", [("labeled",), ("unlabeled",)])
def test_on_one_stream(models, on):
    zs, zt, batch = logits_of(models, "mixed", seed=3)
    plugins = PLUGIN_SETS["unikd"]
    student = zs.clone().requires_grad_(True)
    out = make_token_loss(plugins, on=on)(student, zt, batch.labels, batch.generated)
    out.loss.backward()
    reference_student = zs.clone().requires_grad_(True)
    ref = reference_tokens(reference_student, zt, batch.labels, batch.generated, plugins=by_name(plugins), on=on)
    ref["loss"].backward()
    assert_matches_reference(out, ref, student.grad, reference_student.grad)
    if on == ("labeled",):  # generated positions carry no term: they are not in play
        assert bool(out.labeled.all())


def test_a_third_party_classification_plugin_weights_each_token_by_its_equation(models, monkeypatch):
    # tests/example_plugin's confidence-weighting, written for classification: s = (max_c mean_i P_i[c]) ** power
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent / "example_plugin"))
    from kdkit_example_plugin import ConfidenceWeighting

    zs, zt, batch = logits_of(models, "mixed", seed=4)
    for k in (None, 8):
        teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=k, temperature=2.0)
        out = make_token_loss({ConfidenceWeighting: {"power": 2.0, "apply_to": "all"}}, temperature=2.0)(
            zs, teachers, batch.labels, batch.generated
        )
        seq, pos = out.positions.T
        if k is None:  # on the full vocabulary: the equation from the dense logits
            probs = torch.softmax(zt[seq, pos] / 2.0, dim=-1)
            expected = probs.mean(dim=1).amax(dim=-1) ** 2
        else:  # on each position's support and tail, built by the set-based reference
            expected = torch.tensor([
                max(sum(d[c] for d in dists) / len(dists) for c in range(len(dists[0]))) ** 2
                for dists in (reference_support(zs[b, t], zt[b, t], k, 2.0)[1] for b, t in out.positions.tolist())
            ], dtype=torch.float64)
        torch.testing.assert_close(out.sample_weights.double(), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- sparse supports
def hand_batch():
    """Two positions of one sequence, V = 6, N = 2 teachers, k = 2 (every number below is worked by hand).

    Position 0 (labeled, gold token 4):
      teacher 1 top-2 {0: 0.5, 1: 0.3}: missing m1 = 0.2, spread over V - k = 4 tokens: 0.05 each;
      teacher 2 top-2 {1: 0.6, 2: 0.2}: m2 = 0.2, 0.05 each.
      S = {0, 1, 2}, tail = {3, 4, 5} (3 tokens): P1 = (0.5, 0.3, 0.05, 3 x 0.05 = 0.15),
      P2 = (0.05, 0.6, 0.2, 0.15). The teachers' exact gold probabilities: p1(4) = 0.07, p2(4) = 0.01.
      Student q = (0.1, 0.2, 0.3, 0.1, 0.2, 0.1): on the support (0.1, 0.2, 0.3, tail 0.4).
    Position 1 (generated):
      teacher 1 {5: 0.9, 0: 0.05}: m1 = 0.05, 0.0125 each; teacher 2 {5: 0.8, 0: 0.1}: m2 = 0.1, 0.025 each.
      S = {0, 5} (one slot padded), tail = {1, 2, 3, 4} (4 tokens): P1 = (0.05, 0.9, 0.05), P2 = (0.1, 0.8, 0.1).
      Student uniform: (1/6, 1/6, tail 4/6).
    """
    ids = torch.tensor([[[[0, 1], [1, 2]], [[5, 0], [5, 0]]]])
    probs = torch.tensor([[[[0.5, 0.3], [0.6, 0.2]], [[0.9, 0.05], [0.8, 0.1]]]], dtype=torch.float64)
    gold = torch.log(torch.tensor([[[0.07, 0.01], [1.0, 1.0]]], dtype=torch.float64))
    teachers = kdkit.TopKTeachers(ids, probs.log(), gold, 1.0, 6)
    student = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.1, 0.2, 0.1], [1 / 6] * 6]], dtype=torch.float64))
    labels = torch.tensor([[4, -100]])
    generated = torch.tensor([[False, True]])
    return student, teachers, labels, generated


def test_support_and_missing_mass_by_hand():
    student, teachers, labels, generated = hand_batch()
    out = make_token_loss({AveragePlugin: {}})(student, teachers, labels, generated)
    # position 0: target = mean(P1, P2) = (0.275, 0.45, 0.125, 0.15)
    #   kd = -(0.275 ln 0.1 + 0.45 ln 0.2 + 0.125 ln 0.3 + 0.15 ln 0.4) = 0.633211 + 0.724247 + 0.150497 + 0.137444
    #      = 1.645398; task = -ln q(4) = -ln 0.2 = 1.609438; loss_0 = 3.254836
    # position 1: target = (0.075, 0.85, 0.075): kd = 0.925 ln 6 - 0.075 ln(2/3) = 1.657377 + 0.030410 = 1.687787
    assert out.kd.tolist() == pytest.approx([1.645398, 1.687787], abs=1e-6)
    assert out.task.tolist() == pytest.approx([1.609438, 0.0], abs=1e-6)
    assert out.per_position.tolist() == pytest.approx([3.254836, 1.687787], abs=1e-6)
    assert float(out.loss) == pytest.approx((3.254836 + 1.687787) / 2, abs=1e-6)


def test_correctness_uses_the_exact_gold_probability_outside_the_top_k():
    student, teachers, labels, generated = hand_batch()
    out = make_token_loss({CorrectnessPlugin: {}})(student, teachers, labels, generated)
    # gold 4 lies in the tail of both teachers, but L_i is the stored exact value, not the spread 0.05:
    # L1 = -ln 0.07 = 2.659260, L2 = -ln 0.01 = 4.605170; w1 = (1/L1) / (1/L1 + 1/L2) = L2 / (L1 + L2) = 0.633934
    # k = 1 / (1 + (L1 + L2) / 2) = 1 / 4.632215 = 0.215879
    assert out.teacher_weights[0].tolist() == pytest.approx([0.633934, 0.366066], abs=1e-6)
    assert float(out.kd_weights[0]) == pytest.approx(0.215879, abs=1e-6)
    assert out.teacher_weights[1].tolist() == [0.5, 0.5]  # generated: no opinion, the average


def test_disagreement_on_the_support_by_hand():
    student, teachers, labels, generated = hand_batch()
    out = make_token_loss({DisagreementPlugin: {"lambda": 10.0}})(student, teachers, labels, generated)
    # position 1: P1 = (0.05, 0.9, 0.05), P2 = (0.1, 0.8, 0.1) on (token 0, token 5, tail)
    # KL(P1||P2) = 2 x 0.05 ln 0.5 + 0.9 ln(9/8) = -0.069315 + 0.106005 = 0.036690
    # KL(P2||P1) = 2 x 0.1 ln 2 + 0.8 ln(8/9)   =  0.138629 - 0.094226 = 0.044403
    # L_p = (0.036690 + 0.044403) / 2 = 0.040547; s = 1 + 10 L_p = 1.405465
    assert float(out.sample_weights[1]) == pytest.approx(1.405465, abs=1e-6)
    assert float(out.sample_weights[0]) == 1.0  # labeled


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_matches_the_set_based_reference(models, k, temperature):
    zs, zt, batch = logits_of(models, "mixed", seed=5)
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=k, temperature=temperature)
    out = make_token_loss({AveragePlugin: {}, DisagreementPlugin: {"apply_to": "all"}}, temperature=temperature)(
        zs, teachers, batch.labels, batch.generated
    )
    for row, (b, t) in enumerate(out.positions.tolist()):
        support, dists, q = reference_support(zs[b, t], zt[b, t], k, temperature)
        n = len(dists)
        target = [sum(d[c] for d in dists) / n for c in range(len(q))]
        kd = -sum(p * math.log(x) for p, x in zip(target, q)) * temperature**2
        task = -math.log(torch.softmax(zs[b, t], -1)[int(batch.labels[b, t])]) if out.labeled[row] else 0.0
        pairs = [sum(pi * math.log(pi / pj) for pi, pj in zip(dists[i], dists[j]))
                 for i in range(n) for j in range(n) if i != j]
        s = 1 + 10.0 * sum(pairs) / (n * (n - 1))
        assert float(out.sample_weights[row]) == pytest.approx(s, rel=TOL, abs=TOL)
        assert float(out.per_position[row]) == pytest.approx(s * (kd + task), rel=TOL, abs=TOL)


# ----------------------------------------------------------------------------------------------- AE-KD on tokens
def test_aekd_aligns_support_slots_by_token_id(models):
    """g_i = mean over positions of (q_p - P_ip) in vocabulary space: each slot added to the token it stands for,
    the tail bucket spread evenly over the tokens outside the support (as the support spreads missing mass). The
    reference builds g_i token by token with Python lists."""
    zs, zt, batch = logits_of(models, "labeled", seed=6)
    k, temperature = 4, 1.0
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=k, temperature=temperature)
    out = make_token_loss({AEKDPlugin: {"C": 0.6}})(zs, teachers, batch.labels, batch.generated)
    n = zt.shape[2]
    g = np.zeros((n, VOCAB))
    for b, t in out.positions.tolist():
        support, dists, q = reference_support(zs[b, t], zt[b, t], k, temperature)
        outside = [token for token in range(VOCAB) if token not in support]
        for i in range(n):
            for slot, token in enumerate(support):
                g[i, token] += q[slot] - dists[i][slot]
            for token in outside:
                g[i, token] += (q[-1] - dists[i][-1]) / len(outside)
    g /= len(out.positions)
    expected = brute_force(g @ g.T, 0.6)[1]
    torch.testing.assert_close(out.teacher_weights[0].double(), torch.tensor(expected), atol=1e-6, rtol=0)
    # slot by slot (without the alignment) the weights would differ here: positions have different supports
    assert len({tuple(reference_support(zs[b, t], zt[b, t], k, temperature)[0]) for b, t in out.positions.tolist()}) > 1


def test_mean_over_ranks_by_class_by_hand():
    # two samples over V = 5 classes; slots: three listed classes and the rest (REST = -2); sample 1 has a padded
    # slot (-1). Sample 0 lists {2, 0, 3}: its REST value 4 is spread over {1, 4}, 2 each. Sample 1 lists {1, 2}:
    # 40 over {0, 3, 4}, 40/3 each; its padded 30 is dropped.
    rest = kdkit.plugin.REST
    batch = kdkit.KDBatch.from_log_probs(
        torch.zeros(2, 4), torch.zeros(2, 1, 4), torch.tensor([-100, -100]), 1.0,
        class_ids=torch.tensor([[2, 0, 3, rest], [1, 2, -1, rest]]), num_class_ids=5,
    )
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    # class 0: 2 + 40/3; class 1: 2 + 10; class 2: 1 + 20; class 3: 3 + 40/3; class 4: 2 + 40/3; halved
    expected = [(2 + 40 / 3) / 2, 6.0, 10.5, (3 + 40 / 3) / 2, (2 + 40 / 3) / 2]
    assert batch.mean_over_ranks(values, by_class=True).tolist() == pytest.approx(expected, abs=1e-12)
    assert batch.mean_over_ranks(values).tolist() == [5.5, 11.0, 16.5, 22.0]
    empty = batch.select(torch.empty(0, dtype=torch.long), "unlabeled")
    assert empty.mean_over_ranks(values[:0], by_class=True).tolist() == [0.0] * 5


# ----------------------------------------------------------------------------------------------- the custom backward
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_support_log_probs_pass_gradcheck(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(2, 3, 11, generator=gen, dtype=torch.float64)).requires_grad_(True)
    seq, pos = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 2, 0, 1, 2])
    support = torch.tensor([[1, 3, 7, 1], [0, 2, 5, 9], [4, 4, 4, 4], [1, 2, 3, 4], [6, 8, 6, 6]])
    gold = torch.tensor([1, -1, 10, 3, 0])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)

    def outputs(z):
        on_support, tail, gold_lp = SupportLogProbs.apply(z, seq, pos, support, gold, temperature, 2)
        return on_support * valid, tail, gold_lp

    assert torch.autograd.gradcheck(outputs, (logits,))
    on_support, tail, gold_lp = outputs(logits)
    log_q = torch.log_softmax(logits / temperature, dim=-1)[seq, pos]
    torch.testing.assert_close(on_support, log_q.gather(1, support) * valid)
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, support, False)
    torch.testing.assert_close(tail, torch.logsumexp(log_q.masked_fill(~outside, -math.inf), dim=1))
    log_p1 = torch.log_softmax(logits, dim=-1)[seq, pos].gather(1, gold.clamp_min(0).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(gold_lp, torch.where(gold >= 0, log_p1, 0.0))


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunking_changes_nothing(models, chunk_size):
    zs, zt, batch = logits_of(models, "mixed", seed=7)
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=5, temperature=2.0)
    results = []
    for size in (chunk_size, None):
        student = zs.clone().requires_grad_(True)
        out = make_token_loss(PLUGIN_SETS["unikd"], temperature=2.0, chunk_size=size)(
            student, teachers, batch.labels, batch.generated
        )
        out.loss.backward()
        results.append((out.loss.detach(), student.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-12, rtol=0)


def test_the_backward_pass_keeps_no_position_by_vocabulary_block():
    # V = 4096, N = 3, k = 4: a [P, V] tensor saved for the backward pass would hold P * 4096 elements; the
    # supports hold at most N * k + 1 = 13 slots per position, per teacher.
    gen = torch.Generator().manual_seed(1)
    b, t, n, v, k = 2, 16, 3, 4096, 4
    student = torch.randn(b, t, v, generator=gen).requires_grad_(True)
    gold = torch.zeros(b, t, dtype=torch.long)
    teachers = kdkit.TopKTeachers.from_logits(torch.randn(b, t, n, v, generator=gen), gold, k=k)
    saved = []

    def pack(tensor):
        if tensor.data_ptr() != student.data_ptr():
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = make_token_loss(PLUGIN_SETS["aekd"])(student, teachers, torch.randint(0, v, (b, t), generator=gen))
    out.loss.backward()
    positions = b * t
    assert max(saved) <= positions * n * (n * k + 1), max(saved)
    assert student.grad.shape == (b, t, v) and torch.isfinite(student.grad).all()


def test_bfloat16_logits(models):
    zs, zt, batch = logits_of(models, "mixed", seed=8)
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=6, temperature=2.0)
    low = zs.to(torch.bfloat16).requires_grad_(True)
    out = make_token_loss(PLUGIN_SETS["unikd"], temperature=2.0)(low, teachers, batch.labels, batch.generated)
    out.loss.backward()
    assert low.grad.dtype == torch.bfloat16 and torch.isfinite(low.grad.float()).all()
    exact = make_token_loss(PLUGIN_SETS["unikd"], temperature=2.0)(
        low.detach().double(), teachers, batch.labels, batch.generated
    )
    assert float(out.loss.detach()) == pytest.approx(float(exact.loss), rel=1e-5)


def test_output_means():
    student, teachers, labels, generated = hand_batch()
    out = make_token_loss({AveragePlugin: {}})(student, teachers, labels, generated)
    assert out.per_sequence().tolist() == pytest.approx([(3.254836 + 1.687787) / 2], abs=1e-6)
    means = out.batch_means()
    assert float(means["task"]) == pytest.approx(1.609438 / 2, abs=1e-6)
    assert means["teacher_weights"].tolist() == [0.5, 0.5]
    assert not any(t.requires_grad for t in (out.per_position, out.kd, out.task, out.teacher_weights))


def test_the_readme_example_runs():
    """README.md's "Token-level distillation" example, executed as written."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Token-level distillation"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own documentation
    out = namespace["out"]
    assert out.teacher_weights.shape == (len(out.positions), 3)
    # 2 sequences of 11 positions, the first 3 of each a prompt: 16 positions in play, 8 of them generated
    assert len(out.positions) == 16 and int((~out.labeled).sum()) == 8
    assert namespace["student"].model.embed_tokens.weight.grad is not None


def test_sliced_logits_give_the_same_loss_and_gradient(models):
    # the usual alignment: logits[:, :-1] of a longer sequence, a view that is not contiguous
    zs, zt, batch = logits_of(models, "mixed", seed=9)
    longer = torch.cat([zs, zs[:, :1]], dim=1)
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=5, temperature=2.0)
    loss_fn = make_token_loss(PLUGIN_SETS["unikd"], temperature=2.0)
    sliced = longer.clone().requires_grad_(True)
    view = sliced[:, :-1]
    assert not view.is_contiguous()
    out = loss_fn(view, teachers, batch.labels, batch.generated)
    out.loss.backward()
    whole = zs.clone().requires_grad_(True)
    expected = loss_fn(whole, teachers, batch.labels, batch.generated)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(sliced.grad[:, :-1], whole.grad, atol=1e-12, rtol=0)
    assert sliced.grad[:, -1].abs().max() == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_vocabulary_logits(models, temperature):
    # -inf logits (tokens a model may never emit) give a finite loss and a finite gradient, 0 at those tokens
    zs, zt, batch = logits_of(models, "mixed", seed=10)
    teachers = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=VOCAB, temperature=temperature)
    masked = zs.clone()
    banned = torch.ones(VOCAB, dtype=torch.bool)
    banned[torch.unique(torch.cat([batch.labels.flatten(), teachers.ids.flatten()]).clamp_min(0))] = False
    banned[:8] = True  # some tokens in every support too
    masked[..., banned] = -math.inf
    student = masked.requires_grad_(True)
    sparse = kdkit.TopKTeachers.from_logits(zt, batch.labels, k=6, temperature=temperature)
    for teachers_ in (teachers, sparse):
        student.grad = None
        out = make_token_loss(PLUGIN_SETS["average"], temperature=temperature)(student, teachers_, batch.labels,
                                                                               batch.generated)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all()
        assert student.grad[..., banned].abs().max() == 0


@pytest.mark.parametrize("name", ["aekd", "aekd-min-norm", "unikd"])
def test_permuting_the_teachers_permutes_their_weights_on_real_predictions(models, name):
    zs, zt, batch = logits_of(models, "mixed", seed=11)
    order = torch.tensor([2, 0, 1])
    loss_fn = make_token_loss(PLUGIN_SETS[name], temperature=2.0)
    first = loss_fn(zs, kdkit.TopKTeachers.from_logits(zt, batch.labels, k=7, temperature=2.0), batch.labels,
                    batch.generated)
    second = loss_fn(zs, kdkit.TopKTeachers.from_logits(zt[:, :, order], batch.labels, k=7, temperature=2.0),
                     batch.labels, batch.generated)
    torch.testing.assert_close(second.teacher_weights, first.teacher_weights[:, order], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(second.loss, first.loss, atol=1e-6, rtol=1e-6)

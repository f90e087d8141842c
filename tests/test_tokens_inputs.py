"""Issue 13: bad input to the token objective is a clear kdkit error naming what and where (sequence, position,
teacher), never a silent NaN; and properties that must hold for every batch (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kdkit
from kdkit.testing import make_token_loss
from kdkit_plugins.aekd import AEKDPlugin
from kdkit_plugins.average import AveragePlugin
from kdkit_plugins.unikd import CorrectnessPlugin, DisagreementPlugin

B, T, N, V = 2, 5, 3, 10


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=gen)
    teachers = torch.randn(B, T, N, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[1, 3:] = -100  # padding
    return student, teachers, labels


def topk(teachers, labels, k=3, temperature=1.0):
    return kdkit.TopKTeachers.from_logits(teachers, labels, k=k, temperature=temperature)


def replaced(batch: kdkit.TopKTeachers, **fields) -> kdkit.TopKTeachers:
    names = ("ids", "log_probs", "gold_log_probs", "temperature", "vocab_size")
    values = {name: getattr(batch, name) for name in names}
    values.update(fields)
    return kdkit.TopKTeachers(**values)


def fails(message, student, teachers, labels, generated=None, **options):
    with pytest.raises(kdkit.DataError, match=message):
        make_token_loss({CorrectnessPlugin: {}}, **options)(student, teachers, labels, generated)


# ----------------------------------------------------------------------------------------------- bad input
def test_vocabulary_mismatch():
    student, teachers, labels = inputs()
    fails(r"vocabulary size mismatch: the student's logits have V = 10 tokens, the teachers' logits have V = 12",
          student, torch.randn(B, T, N, 12), labels)
    fails(r"the teachers' top-k batch says V = 12", student, replaced(topk(teachers, labels), vocab_size=12), labels)


def test_k_larger_than_the_vocabulary():
    student, teachers, labels = inputs()
    batch = topk(teachers, labels)
    wide = replaced(batch, ids=torch.arange(11).expand(B, T, N, 11), log_probs=torch.full((B, T, N, 11), -5.0))
    fails(r"k = 11 top tokens per teacher, but the vocabulary holds only V = 10", student, wide, labels)
    with pytest.raises(kdkit.DataError, match=r"k must be in \[1, V = 10\], got 11"):
        topk(teachers, labels, k=11)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_dense_teacher_logits_name_sequence_position_and_teacher(bad):
    student, teachers, labels = inputs()
    teachers[1, 2, 1, 7] = bad
    fails(rf"teacher logits are not finite: sequence 1, position 2, teacher 2, token 7 holds {bad}",
          student, teachers, labels)
    # at an ignored position (padding) the value is never read
    teachers[1, 2, 1, 7] = 0.0
    teachers[1, 4, 0, 0] = bad
    make_token_loss({CorrectnessPlugin: {}})(student, teachers, labels)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_top_k_values(bad):
    student, teachers, labels = inputs()
    batch = topk(teachers, labels)
    log_probs = batch.log_probs.clone()
    log_probs[0, 3, 2, 1] = bad
    fails(rf"top-k teacher log-probabilities are not finite: sequence 0, position 3, teacher 3 holds {bad}",
          student, replaced(batch, log_probs=log_probs), labels)
    gold = batch.gold_log_probs.clone()
    gold[1, 1, 0] = bad
    fails(rf"gold log-probability is not finite: sequence 1, position 1, teacher 1 holds {bad}",
          student, replaced(batch, gold_log_probs=gold), labels)
    # a generated position has no gold token: its stored value is not read
    generated = torch.zeros(B, T, dtype=torch.bool)
    generated[1, 1] = True
    make_token_loss({CorrectnessPlugin: {}})(student, replaced(batch, gold_log_probs=gold), labels, generated)


def test_a_top_k_probability_of_zero_is_fine():
    student, teachers, labels = inputs()
    batch = topk(teachers, labels)
    log_probs = batch.log_probs.clone()
    log_probs[0, 0, 0, 2] = -float("inf")
    out = make_token_loss({CorrectnessPlugin: {}})(student, replaced(batch, log_probs=log_probs), labels)
    assert torch.isfinite(out.per_position).all()


@pytest.mark.parametrize(("value", "extra"), [(10, r" \(>= V: a tokenizer"), (-1, ""), (-101, "")])
def test_gold_token_out_of_range(value, extra):
    student, teachers, labels = inputs()
    labels[0, 3] = value
    fails(rf"labels must be token ids in \[0, V = 10\) or -100; sequence 0, position 3 holds {value}{extra}",
          student, teachers, labels)


def test_temperature_mismatch():
    student, teachers, labels = inputs()
    fails(r"stored at temperature 1.0, the objective's is 2.0: probabilities at another temperature cannot be "
          r"recovered", student, topk(teachers, labels), labels, temperature=2.0)
    make_token_loss({}, temperature=2.0)(student, topk(teachers, labels, temperature=2.0), labels)


def test_bad_top_k_ids():
    student, teachers, labels = inputs()
    batch = topk(teachers, labels)
    ids = batch.ids.clone()
    ids[1, 0, 2, 1] = 10
    fails(r"top-k token id 10 is outside \[0, V = 10\): sequence 1, position 0, teacher 3", student,
          replaced(batch, ids=ids), labels)
    ids = batch.ids.clone()
    ids[0, 1, 1, 2] = ids[0, 1, 1, 0]
    fails(rf"teacher 2 lists token {int(ids[0, 1, 1, 0])} twice in its top-k at sequence 0, position 1", student,
          replaced(batch, ids=ids), labels)


def test_logits_passed_as_log_probabilities():
    student, teachers, labels = inputs()
    batch = topk(teachers, labels)
    raw = teachers.topk(3, dim=-1).values + 3.0
    fails(r"top-k teacher probabilities sum to [0-9.]+ > 1 at sequence 0, position 0, teacher 1: "
          r"TopKTeachers.log_probs must be log-probabilities", student, replaced(batch, log_probs=raw), labels)


def test_shapes_and_streams():
    student, teachers, labels = inputs()
    fails(r"student_logits must be \[B, T, V\]", student[0], teachers, labels)
    fails(r"labels must be \[B, T\] = \[2, 5\]", student, teachers, labels[:, :4])
    fails(r"labels must be integer token ids", student, teachers, labels.float())
    fails(r"generated must be a bool tensor \[B, T\]", student, teachers, labels, labels)
    fails(r"dense teacher logits must be \[B, T, N, V\]", student, teachers[:, :4], labels)
    fails(r"no position in play: every label is -100", student, teachers, torch.full((B, T), -100))
    fails(r"generated positions are left out: `on` is \['labeled'\]", student, teachers, torch.full((B, T), -100),
          torch.ones(B, T, dtype=torch.bool), on=["labeled"])


def test_bad_options():
    with pytest.raises(kdkit.KdkitError, match=r"one of .*got 'reverse_kl' \(did you mean 'reverse-kl'\?\)"):
        kdkit.TokenDistillationLoss(divergence="reverse_kl")
    with pytest.raises(kdkit.KdkitError, match=r"beta must be in \(0, 1\), got 1.0"):
        kdkit.TokenDistillationLoss(divergence="jsd", beta=1.0)
    with pytest.raises(kdkit.PluginError, match=r"plugins\.aekd\.c: unknown option 'c' \(did you mean 'C'\?\)"):
        kdkit.TokenDistillationLoss.from_plugins({"aekd": {"c": 1}})
    assert kdkit.TokenDistillationLoss.from_plugins({"aekd": {"enabled": False}}).plugins == []


# ----------------------------------------------------------------------------------------------- properties
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
logit = st.one_of(st.floats(-20, 20, width=32), st.sampled_from([1e30, -1e30, 3e38, -3e38, 0.0]),
                  st.floats(allow_nan=False, allow_infinity=False, width=32))


@st.composite
def token_batches(draw, teachers=(2, 4)):
    b, t, n, v = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(*teachers)), draw(st.integers(2, 8))
    values = st.lists(logit, min_size=v, max_size=v)
    student = torch.tensor(draw(st.lists(st.lists(values, min_size=t, max_size=t), min_size=b, max_size=b)))
    teachers_ = torch.tensor(draw(st.lists(st.lists(st.lists(values, min_size=n, max_size=n), min_size=t, max_size=t),
                                           min_size=b, max_size=b)))
    labels = torch.tensor(draw(st.lists(st.lists(st.one_of(st.just(-100), st.integers(0, v - 1)), min_size=t,
                                                 max_size=t), min_size=b, max_size=b)))
    generated = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    assume(bool(((labels != -100) | generated).any()))
    k = draw(st.integers(1, v))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return student, teachers_, labels, generated, k, temperature


def plugin_sets(n):
    return [
        {AveragePlugin: {}, DisagreementPlugin: {"apply_to": "all"}},
        {CorrectnessPlugin: {}, DisagreementPlugin: {}},
        {AEKDPlugin: {"C": max(0.6, 1 / n)}, CorrectnessPlugin: {"ensembling": False}},
        {AEKDPlugin: {"C": 1.0, "gradient": "per-sample"}},
    ]


@SETTINGS
@given(data=token_batches(), divergence=st.sampled_from(["forward-kl", "reverse-kl", "jsd"]))
def test_weights_are_distributions_and_everything_is_finite(data, divergence):
    student, teachers, labels, generated, k, temperature = data
    batch = kdkit.TopKTeachers.from_logits(teachers, torch.where(generated, -100, labels), k=k, temperature=temperature)
    for plugins in plugin_sets(teachers.shape[2]):
        logits = student.clone().requires_grad_(True)
        out = make_token_loss(plugins, temperature=temperature, divergence=divergence)(logits, batch, labels, generated)
        w = out.teacher_weights
        assert torch.isfinite(w).all() and (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones(len(w)), atol=1e-5, rtol=0)
        for tensor in (out.kd_weights, out.sample_weights, out.per_position, out.kd, out.task, out.loss):
            assert torch.isfinite(tensor).all(), plugins
        out.loss.backward()
        assert torch.isfinite(logits.grad).all(), plugins


@SETTINGS
@given(data=token_batches())
def test_equal_teachers_do_not_disagree(data):
    student, teachers, labels, generated, k, temperature = data
    same = teachers[:, :, :1].expand_as(teachers).contiguous()
    batch = kdkit.TopKTeachers.from_logits(same, torch.where(generated, -100, labels), k=k, temperature=temperature)
    out = make_token_loss({DisagreementPlugin: {"apply_to": "all", "lambda": 15.0}}, temperature=temperature)(
        student, batch, labels, generated
    )
    torch.testing.assert_close(out.sample_weights, torch.ones_like(out.sample_weights), atol=1e-5, rtol=0)


@SETTINGS
@given(data=token_batches(), seed=st.integers(0, 2**16))
def test_permuting_the_teachers_permutes_their_weights(data, seed):
    student, teachers, labels, generated, k, temperature = data
    n = teachers.shape[2]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    gold = torch.where(generated, -100, labels)
    # AE-KD is left out here: on degenerate batches (two classes, equal or one-hot teachers) its min-norm point is
    # not unique, so permuted teachers may get another minimiser; test_tokens checks it on a regular batch.
    for plugins in plugin_sets(n)[:2]:
        loss_fn = make_token_loss(plugins, temperature=temperature)
        first = loss_fn(student, kdkit.TopKTeachers.from_logits(teachers, gold, k=k, temperature=temperature),
                        labels, generated)
        second = loss_fn(student, kdkit.TopKTeachers.from_logits(teachers[:, :, order], gold, k=k,
                                                                 temperature=temperature), labels, generated)
        torch.testing.assert_close(second.teacher_weights, first.teacher_weights[:, order], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second.per_position, first.per_position, atol=1e-4, rtol=1e-5)
        assert math.isclose(float(second.loss), float(first.loss), rel_tol=1e-5, abs_tol=1e-4)

"""Tests of the confidence-weighting plugin, written with kdkit's plugin-author helpers (kdkit.testing)."""

import math

import pytest
import torch
from pydantic import ValidationError

from kdkit import KDBatch
from kdkit.testing import fake_batch, make_loss, plugin_registry, run_hook, stream_view
from kdkit_example_plugin import ConfidenceWeighting


def test_the_plugin_is_valid():
    # plugin_registry runs the checks `kdkit plugins` runs: name, Options model, hook names and signatures
    registry = plugin_registry(ConfidenceWeighting)
    assert registry.available() == ["confidence-weighting"]
    assert registry.records["confidence-weighting"].hooks == ("kdkit_sample_weights",)


def test_weight_worked_out_by_hand():
    # two teachers, two classes: P_1 = (1/2, 1/2), P_2 = (3/4, 1/4); their mean is (5/8, 3/8)
    teachers = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    batch = KDBatch(torch.zeros(1, 2), teachers, torch.tensor([-100]))
    plugin = ConfidenceWeighting(ConfidenceWeighting.Options(power=2.0))
    weights = run_hook(plugin, "kdkit_sample_weights", stream_view(batch, "unlabeled"))
    assert weights.tolist() == pytest.approx([(5 / 8) ** 2])


def test_no_opinion_on_labeled_samples_by_default():
    batch = fake_batch(size=6, teachers=3, labeled=4)  # samples 0-3 labeled, 4-5 unlabeled
    assert run_hook(ConfidenceWeighting(), "kdkit_sample_weights", stream_view(batch, "labeled")) is None
    everywhere = ConfidenceWeighting(ConfidenceWeighting.Options(apply_to="all"))
    assert run_hook(everywhere, "kdkit_sample_weights", stream_view(batch, "labeled")).shape == (4,)


def test_the_loss_of_each_unlabeled_sample_is_scaled_by_its_weight():
    batch = fake_batch(size=8, teachers=3, classes=4, labeled=3, seed=1)
    student, teachers, labels = batch.student_logits, batch.teacher_logits, batch.labels
    plain = make_loss({})(student, teachers, labels)
    weighted = make_loss({ConfidenceWeighting: {"power": 1.0}})(student, teachers, labels)
    # reference in float64, written out: softmax, mean over teachers, top class; 1 for labeled samples
    probs = torch.exp(teachers.double()) / torch.exp(teachers.double()).sum(-1, keepdim=True)
    expected = probs.mean(1).max(-1).values
    expected[:3] = 1.0
    assert torch.allclose(weighted.per_sample.double(), expected * plain.per_sample.double(), rtol=1e-5)


def test_options_are_checked():
    with pytest.raises(ValidationError):
        ConfidenceWeighting.Options(power=-1)
    with pytest.raises(ValidationError):
        ConfidenceWeighting.Options(aply_to="all")  # a misspelled option is an error, not ignored

"""What a trainer minimises: an objective turns a model and one collated batch into a loss.

The Trainer subclass (:class:`kdkit.training.trainer.KDTrainer`) knows nothing of the task: it calls its
objective. The two objectives of sequence classification live here (a task for causal LMs brings its own):

* :class:`LabelObjective`: cross-entropy with the labels (teacher fine-tuning, the labels-only student);
* :class:`LogitDistillation`: :class:`kdkit.DistillationLoss` over cached teacher logits, looked up by each
  sample's ``kd_index``.

Both compute the task term the same way, so that the two kinds of run differ only in the kd term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kdkit.distill.loss import DistillationLoss
from kdkit.errors import KdkitError
from kdkit.plugin.batch import IGNORE_INDEX


@dataclass
class ObjectiveOutput:
    """The loss of one batch, the model's outputs, and per-sample figures to average into the training log."""

    loss: torch.Tensor
    outputs: Any
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput: ...

    def evaluate(self, model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
        """``(loss, predictions, labels)`` of one batch of the tune split (early stopping); no gradient."""
        ...


def task_loss_evaluation(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
    """Evaluation of a classifier on labeled rows: cross-entropy with the labels, the logits, the labels. The
    tune split has no teacher rows to distil from, and the task loss is what both kinds of student share."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("kd_index", None)
    with torch.no_grad():
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return loss.detach(), logits.detach(), labels


class LabelObjective:
    """Cross-entropy of the model's logits with ``labels`` (``-100`` rows take no part)."""

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("kd_index", None)
        outputs = model(**inputs)
        logits = outputs.logits.float()
        labeled = labels != IGNORE_INDEX
        if not bool(labeled.any()):
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        return ObjectiveOutput(loss, outputs)

    evaluate = staticmethod(task_loss_evaluation)


class LogitDistillation:
    """``loss_fn(student logits, teacher_logits[kd_index], labels)`` for each batch.

    :param teacher_logits: ``[rows, N, C]``; sample ``b`` of a batch uses row ``kd_index[b]``. Moved to the
        model's device (as float32) once, on first use.
    """

    def __init__(self, teacher_logits: torch.Tensor, loss_fn: DistillationLoss) -> None:
        self.teacher_logits = teacher_logits
        self.loss_fn = loss_fn
        self._on_device: torch.Tensor | None = None

    def teacher_rows(self, kd_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self._on_device is None or self._on_device.device != device:
            self._on_device = self.teacher_logits.to(device=device, dtype=torch.float32)
        return self._on_device.index_select(0, kd_index.to(device))

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        kd_index = inputs.pop("kd_index", None)
        if kd_index is None:
            raise KdkitError("a distillation batch has no kd_index column: build it with EncodedDataset")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        out = self.loss_fn(logits, self.teacher_rows(kd_index, logits.device), labels)
        return ObjectiveOutput(out.loss, outputs, {"kd_weight": out.kd_weights, "sample_weight": out.sample_weights})

    evaluate = staticmethod(task_loss_evaluation)

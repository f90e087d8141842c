"""``kdkit.DistillationTrainer``: distill into a model from your own dataset, whose rows carry teacher logits.

For people who have their datasets and teacher logits already and want the Trainer they know: each training row
holds the model inputs (``input_ids``, ``attention_mask``, ...), ``label`` or ``labels`` (a class id, ``-100``
for an unlabeled row) and a teacher-logit column (``[N, C]`` numbers: N teachers, C classes). The loss is
:class:`kdkit.DistillationLoss`, plugins and all.

The pitfall it removes: the Trainer drops every dataset column that the model's ``forward`` does not take
(``remove_unused_columns``, on by default), teacher logits included, so a hand-written distillation Trainer
silently trains on labels alone or fails on a missing key. This one keeps the teacher column whatever that
setting says, and its collator pads the inputs and stacks the teacher logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kdkit.distill.loss import DistillationLoss
from kdkit.errors import KdkitError
from kdkit.training.objectives import ObjectiveOutput
from kdkit.training.trainer import KDTrainer

TEACHER_COLUMN = "teacher_logits"


class TeacherLogitsCollator:
    """Pads the model inputs of a batch (the tokenizer's ``model_input_names``) to its longest row; stacks the
    teacher logits into ``[B, N, C]`` and the labels into ``[B]``; drops any other column."""

    def __init__(self, tokenizer: Any, teacher_column: str = TEACHER_COLUMN, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.teacher_column = teacher_column
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        # the model's inputs only: other columns (the raw text, ids) may still be there when the Trainer's
        # remove_unused_columns is off
        names = set(self.tokenizer.model_input_names)
        inputs = [{k: v for k, v in f.items() if k in names} for f in features]
        batch = dict(
            self.tokenizer.pad(inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        )
        if self.teacher_column not in features[0]:
            raise KdkitError(
                f"a training row has no '{self.teacher_column}' column: each row needs the teachers' logits "
                f"([N teachers, C classes]); columns: {', '.join(features[0])}"
            )
        batch[self.teacher_column] = torch.stack(
            [torch.as_tensor(f[self.teacher_column], dtype=torch.float32) for f in features]
        )
        label_key = "labels" if "labels" in features[0] else "label"
        batch["labels"] = torch.tensor([int(f[label_key]) for f in features], dtype=torch.long)
        return batch


class ColumnDistillation:
    """The objective: ``loss_fn(model(inputs).logits, batch[teacher_column], labels)``."""

    def __init__(self, loss_fn: DistillationLoss, teacher_column: str = TEACHER_COLUMN) -> None:
        self.loss_fn = loss_fn
        self.teacher_column = teacher_column

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        teacher_logits = inputs.pop(self.teacher_column)
        outputs = model(**inputs)
        logits = outputs.logits.float()
        out = self.loss_fn(logits, teacher_logits.to(logits.device, torch.float32), labels)
        return ObjectiveOutput(out.loss, outputs, {"kd_weight": out.kd_weights, "sample_weight": out.sample_weights})


class DistillationTrainer(KDTrainer):
    """A ``transformers.Trainer`` whose loss is ``loss_fn`` (a :class:`kdkit.DistillationLoss`) over the teacher
    logits in each row of ``train_dataset``.

    >>> trainer = kdkit.DistillationTrainer(model=student, args=TrainingArguments("out"), train_dataset=ds,
    ...                                     processing_class=tokenizer, loss_fn=DistillationLoss.from_plugins({}))
    >>> trainer.train()

    :param loss_fn: the distillation loss (its plugins, temperature and ``on``).
    :param teacher_column: the dataset column holding each row's ``[N, C]`` teacher logits.
    Every other argument is the Trainer's; ``data_collator`` defaults to :class:`TeacherLogitsCollator` over
    ``processing_class``.
    """

    def __init__(
        self, *args: Any, loss_fn: DistillationLoss, teacher_column: str = TEACHER_COLUMN, **kwargs: Any
    ) -> None:
        if kwargs.get("data_collator") is None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise KdkitError("DistillationTrainer needs processing_class= (the tokenizer) or a data_collator")
            kwargs["data_collator"] = TeacherLogitsCollator(tokenizer, teacher_column)
        self.teacher_column = teacher_column
        super().__init__(*args, objective=ColumnDistillation(loss_fn, teacher_column), **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # the Trainer keeps only the columns the model's forward takes; the teacher logits must survive too
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.teacher_column not in self._signature_columns:
            self._signature_columns.append(self.teacher_column)

"""The task seam: everything that depends on the kind of model goes through one :class:`Task` object.

The stages (data, teachers, teacher outputs, students, evaluation) call the task to load and split the data,
build the distillation loss, load a model, turn a split into training samples, compute and keep the teachers'
outputs, build the student's training sets and the trainer's objective, score a model on the eval split and
compute metrics; the plugins and the objectives never see the task. Two tasks implement this protocol:
sequence classification (:mod:`kdkit.tasks.classification`) and causal LMs distilled token by token
(:mod:`kdkit.tasks.causal_lm`); :func:`kdkit.tasks.task_for` picks a recipe's (its ``task`` key).

What a task's objects are is its own business; the stages only hand them on. A split's teacher outputs
(``outputs_by_split[split]``) are ``[rows, N, C]`` logits for classification and the tokenized sequences with
every teacher's top-k store for causal LMs; a model's eval scores (what :meth:`Task.metrics` reads) are
``[rows, C]`` logits, or ``[target positions, 2]`` (the gold token's log-probability and whether it is the model's
first choice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kdkit.data.splits import Splits
from kdkit.distill.loss import DistillationLoss
from kdkit.plugin.registry import PluginRegistry
from kdkit.recipe.schema import DataConfig, Recipe
from kdkit.training.objectives import Objective


@dataclass
class TeacherRef:
    """A teacher as the later stages need it: a name for messages, its cache key (which identifies its weights)
    and where to load it from (see :class:`kdkit.stages.teachers.Teacher`)."""

    name: str
    key: str
    path: str
    trust_remote_code: bool = False


@dataclass
class StudentSets:
    """The student's training sets, as its task builds them: labeled (and unlabeled) samples for distillation,
    with what the distillation objective reads for them; the labeled samples alone for the labels-only student;
    the tune split when early stopping evaluates on it."""

    distill: Any
    distill_outputs: Any  #: the teachers' outputs of ``distill`` (what :meth:`Task.objective` takes)
    baseline: Any
    tune: Any = None
    eval_tokens: Any = None  #: the eval split's model inputs, when tokenized already (classification)


class Task(Protocol):
    """What the stages need from a task."""

    name: str

    # ----------------------------------------------------------------- stage 1: data
    def load_splits(self, cfg: DataConfig, need_unlabeled: bool) -> Splits:
        """The labeled / unlabeled / tune / eval parts of the recipe's data, checked."""

    def distillation_loss(self, recipe: Recipe, registry: PluginRegistry) -> Any:
        """The recipe's distillation loss (its plugins, temperature and streams)."""

    def check_plugins(self, loss_fn: Any, num_teachers: int, splits: Splits, *, unlabeled: bool) -> None:
        """Run the loss once on a made-up batch, so that plugins refusing this ensemble fail before any model."""

    def data_settings(self) -> dict[str, Any]:
        """Settings besides the rows that change what a model learns from them (part of teacher cache keys;
        empty for classification, so that its keys stay as they were)."""

    def distill_settings(self) -> dict[str, Any]:
        """Settings besides the recipe's [distill] table that change what a distilled student learns (part of its
        key; empty for classification)."""

    # ----------------------------------------------------------------- stage 2: teachers
    def load_model(
        self,
        resolved: str,
        *,
        label_names: Sequence[str],
        who: str,
        num_layers: int | None = None,
        trust_remote_code: bool = False,
        fine_tuned: bool = False,
        pooling: str | None = None,
        keep_layers: Sequence[int] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """A model ready to train or predict (``keep_layers`` and ``config``: causal LMs only)."""

    def check_checkpoint(self, resolved: str, *, who: str, label_names: Sequence[str], trust_remote_code: bool) -> None:
        """:raises ModelError: a given teacher checkpoint this task cannot use (no weights, other classes)."""

    def train_dataset(
        self, tokenizer: Any, split: Any, text_columns: Sequence[str], max_length: int, *, name: str,
        tokens: Any = None,
    ) -> Any:
        """A split's training samples with their targets (for teacher fine-tuning and early stopping); ``tokens``:
        the split's :meth:`encode`, when done already."""

    def collator(self, tokenizer: Any) -> Any:
        """What batches the task's samples for the trainer (None: kdkit's default collator)."""

    def encode(
        self, tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int, store: Any = None
    ) -> Any:
        """A split's model inputs, unpadded; with ``store`` (a :class:`kdkit.store.tokens.TokenStore`), tokenized
        once and kept there, so that every stage and later run reads them back. Every process of a run calls
        this together."""

    def predict(
        self, model: Any, tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int,
        batch_size: int, **kwargs: Any,
    ) -> torch.Tensor:
        """A model's outputs on a split, in the split's row order."""

    def objective(
        self, teacher_outputs: torch.Tensor | None = None, loss_fn: DistillationLoss | None = None
    ) -> Objective:
        """What the trainer minimises: the task loss alone, or ``loss_fn`` over the teachers' outputs."""

    def metrics(self, scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
        """Evaluation figures of predictions against the gold labels."""

    def metric_names(self, num_classes: int) -> list[str]:
        """The names :meth:`metrics` returns, in table order."""

    def tune_metrics(self, prediction: Any) -> dict[str, float]:
        """The Trainer's ``compute_metrics`` for early stopping (``prediction.predictions``, ``.label_ids``)."""

    def degenerate(self, scores: torch.Tensor, label_names: Sequence[str]) -> str | None:
        """What is degenerate about a model's eval predictions (e.g. one class for every row), or None."""

    def output_store(self, cache_dir: str | Path, *, batch_size: int, console: Any = None) -> Any:
        """The store that computes each teacher's outputs on a split once and keeps them (a ``teacher_logits``
        method returning ``{split: outputs}``, and ``entries``/``directory`` saying what was built or read)."""

    def ensemble(self, teacher_outputs: torch.Tensor) -> torch.Tensor:
        """The ensemble's eval scores from the teachers' eval outputs."""

    def teacher_scores(self, eval_outputs: Any, index: int) -> torch.Tensor:
        """Teacher ``index``'s eval scores, from the teachers' eval outputs."""

    # ----------------------------------------------------------------- stage 4: students
    def student_sets(
        self, tokenizer: Any, splits: Splits, outputs: Mapping[str, Any], *, max_length: int, need_unlabeled: bool,
        early_stopping: bool, store: Any = None,
    ) -> StudentSets:
        """The student's training sets, from the splits and the teachers' outputs of each; ``store`` (a
        :class:`kdkit.store.tokens.TokenStore`) keeps what is tokenized for later stages and runs."""

    def eval_inputs(self, splits: Splits, outputs: Mapping[str, Any]) -> Any:
        """What :meth:`predict` scores a student on: the eval split, in the form the task predicts it."""

    def prediction_shape(self, eval_inputs: Any, label_names: Sequence[str]) -> tuple[int, int]:
        """The shape of a model's eval scores on ``eval_inputs`` (checked when a finished run is reused)."""

    def samples(self, model: Any, tokenizer: Any, eval_inputs: Any) -> list[dict[str, str]]:
        """A few seeded generations of ``model`` for the results (empty where a task does not generate)."""

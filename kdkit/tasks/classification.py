"""Sequence classification: the task kdkit was built for (one text, or a sentence pair, to one of C classes).

What depends on the task goes through :class:`SequenceClassification`: loading a model with a classification
head, tokenizing, predicting logits ``[rows, C]``, the trainer's objective (cross-entropy, or
:class:`kdkit.DistillationLoss` over cached teacher logits), and the metrics.

Metrics on the eval split:

* ``accuracy``;
* ``macro_f1``: the unweighted mean over classes of each class's F1;
* ``f1`` (two classes only): F1 of the positive class, label id 1 (GLUE's QQP / MRPC convention: "duplicate",
  "equivalent"; for sentiment, "positive").

The ensemble averages the teachers' probabilities (softmax at temperature 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.data.splits import Splits, load_splits
from kdkit.distill.loss import DistillationLoss, check_plugins_accept
from kdkit.modeling.loading import check_labels, load_classifier, load_config
from kdkit.modeling.predict import predict_logits
from kdkit.modeling.refs import check_weights
from kdkit.modeling.tokenize import tokenized
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.plugin.registry import PluginRegistry
from kdkit.recipe.schema import DataConfig, Recipe
from kdkit.store.hashing import arrow_column
from kdkit.store.tokens import TokenArrays, TokenStore
from kdkit.tasks.base import StudentSets
from kdkit.tasks.logit_cache import LogitCache
from kdkit.training.data import EncodedDataset
from kdkit.training.objectives import LabelObjective, LogitDistillation, Objective


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
    """Metrics of predictions ``argmax(scores)`` (logits or probabilities ``[rows, C]``) against ``labels``.

    Rows labeled ``-100`` are ignored.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    keep = labels != IGNORE_INDEX
    pred = scores.argmax(dim=-1)[keep]
    gold = labels[keep]
    num_classes = scores.shape[-1]
    if gold.numel() == 0:
        raise ValueError("no labeled row to evaluate")
    result = {"accuracy": float((pred == gold).double().mean())}
    f1s = [_f1(pred, gold, c) for c in range(num_classes)]
    result["macro_f1"] = float(sum(f1s) / num_classes)
    if num_classes == 2:
        result["f1"] = float(f1s[1])
    return result


def _f1(pred: torch.Tensor, gold: torch.Tensor, cls: int) -> float:
    tp = int(((pred == cls) & (gold == cls)).sum())
    fp = int(((pred == cls) & (gold != cls)).sum())
    fn = int(((pred != cls) & (gold == cls)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def ensemble_probabilities(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``[rows, N, C]`` logits -> ``[rows, C]`` mean of the teachers' softmax probabilities."""
    return torch.softmax(teacher_logits.double(), dim=-1).mean(dim=1)


def metric_names(num_classes: int) -> list[str]:
    return ["accuracy", "f1", "macro_f1"] if num_classes == 2 else ["accuracy", "macro_f1"]


class SequenceClassification:
    """The sequence-classification task. Stateless: one instance serves every run."""

    name = "sequence-classification"

    # ----------------------------------------------------------------- data
    def load_splits(self, cfg: DataConfig, need_unlabeled: bool) -> Splits:
        """:func:`kdkit.data.splits.load_splits`: rows with a label id each (-100 when unlabeled)."""
        return load_splits(cfg, need_unlabeled=need_unlabeled)

    def distillation_loss(self, recipe: Recipe, registry: PluginRegistry) -> DistillationLoss:
        return DistillationLoss.from_plugins(
            recipe.enabled_plugins(), temperature=recipe.distill.temperature, on=recipe.distill.on, registry=registry
        )

    def check_plugins(self, loss_fn: Any, num_teachers: int, splits: Splits, *, unlabeled: bool) -> None:
        check_plugins_accept(loss_fn, num_teachers, len(splits.label_names), unlabeled=unlabeled)

    def data_settings(self) -> dict[str, Any]:
        return {}

    def distill_settings(self) -> dict[str, Any]:
        return {}

    # ----------------------------------------------------------------- models
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
        """A classifier for ``label_names`` (see :func:`kdkit.modeling.loading.load_classifier`); ``keep_layers``
        and ``config`` are causal-LM keys, refused for classification by the recipe's validation."""
        return load_classifier(
            resolved,
            label_names=label_names,
            who=who,
            num_layers=num_layers,
            trust_remote_code=trust_remote_code,
            fine_tuned=fine_tuned,
            pooling=pooling,
        )

    def check_checkpoint(self, resolved: str, *, who: str, label_names: Sequence[str], trust_remote_code: bool) -> None:
        """A given teacher must hold weights and predict the data's classes, in the data's order."""
        check_weights(resolved, who)
        check_labels(load_config(resolved, who=who, trust_remote_code=trust_remote_code), label_names, who)

    def train_dataset(
        self, tokenizer: Any, split: Any, text_columns: Sequence[str], max_length: int, *, name: str = "labeled",
        tokens: TokenArrays | None = None,
    ) -> EncodedDataset:
        """The split's encoded texts (``tokens`` when tokenized already) with their label ids."""
        encoded = tokens if tokens is not None else self.encode(tokenizer, split, text_columns, max_length)
        return EncodedDataset(encoded, arrow_column(split, "label").to_numpy())

    def collator(self, tokenizer: Any) -> None:
        """None: kdkit's :class:`~kdkit.training.data.KDCollator`, which the trainer builds itself."""
        return None

    def encode(
        self, tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int,
        store: TokenStore | None = None,
    ) -> TokenArrays:
        """Unpadded input ids of the text column(s), truncated to ``max_length`` tokens; with ``store``, read from
        it when the split was tokenized before with this tokenizer (every process of a run calls this together)."""
        return tokenized(tokenizer, dataset, text_columns, max_length, store)

    def predict(self, model: Any, tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int,
                batch_size: int, **kwargs: Any) -> torch.Tensor:
        """``[rows, C]`` float32 logits in the dataset's row order (see :func:`kdkit.modeling.predict_logits`)."""
        return predict_logits(model, tokenizer, dataset, text_columns, max_length, batch_size, **kwargs)

    def objective(
        self, teacher_outputs: torch.Tensor | None = None, loss_fn: DistillationLoss | None = None
    ) -> Objective:
        """Cross-entropy with the labels, or ``loss_fn`` over ``teacher_outputs`` ``[rows, N, C]``."""
        if loss_fn is None:
            return LabelObjective()
        assert teacher_outputs is not None
        return LogitDistillation(teacher_outputs, loss_fn)

    def metrics(self, scores: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
        return classification_metrics(scores, labels)

    def metric_names(self, num_classes: int) -> list[str]:
        return metric_names(num_classes)

    def tune_metrics(self, prediction: Any) -> dict[str, float]:
        """The Trainer's ``compute_metrics`` (early stopping): the metrics of its predictions on the tune split."""
        return classification_metrics(torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids))

    def degenerate(self, scores: torch.Tensor, label_names: Sequence[str]) -> str | None:
        """What is degenerate about a model's eval predictions (one class for every row), or None."""
        predicted = scores.argmax(dim=-1).unique()
        if len(scores) > 1 and predicted.numel() == 1:
            return f"predicts '{label_names[int(predicted[0])]}' for all {len(scores)} eval rows"
        return None

    def output_store(self, cache_dir: str | Path, *, batch_size: int, console: Any = None) -> LogitCache:
        """Where teacher outputs are computed once and kept: the logit cache under ``<cache_dir>/logits``."""
        return LogitCache(cache_dir, batch_size=batch_size, console=console)

    def ensemble(self, teacher_outputs: torch.Tensor) -> torch.Tensor:
        """``[rows, N, C]`` teacher logits -> ``[rows, C]`` mean of the teachers' probabilities."""
        return ensemble_probabilities(teacher_outputs)

    def teacher_scores(self, eval_outputs: torch.Tensor, index: int) -> torch.Tensor:
        """Teacher ``index``'s ``[rows, C]`` logits."""
        return eval_outputs[:, index]

    # ----------------------------------------------------------------- students
    def student_sets(
        self, tokenizer: Any, splits: Splits, outputs: Mapping[str, Any], *, max_length: int, need_unlabeled: bool,
        early_stopping: bool, store: TokenStore | None = None,
    ) -> StudentSets:
        """Labeled rows (and unlabeled ones, label -100) with their row ``kd_index`` in the concatenated teacher
        logits ``[labeled + unlabeled rows, N, C]``; the labeled rows alone for the baseline; the tune split for
        early stopping and the eval split's tokens. Each split is tokenized once (read from ``store`` when an
        earlier stage or run tokenized it with this tokenizer)."""
        columns = splits.text_columns
        num_labeled = len(splits.labeled)
        labeled_enc = self.encode(tokenizer, splits.labeled, columns, max_length, store=store)
        labeled_labels = arrow_column(splits.labeled, "label").to_numpy()
        parts = [EncodedDataset(labeled_enc, labeled_labels, kd_index=range(num_labeled))]
        train_logits = [outputs["labeled"]]
        if need_unlabeled:
            num_unlabeled = len(splits.unlabeled)
            parts.append(
                EncodedDataset(
                    self.encode(tokenizer, splits.unlabeled, columns, max_length, store=store),
                    np.full(num_unlabeled, IGNORE_INDEX, dtype=np.int64),
                    kd_index=range(num_labeled, num_labeled + num_unlabeled),
                )
            )
            train_logits.append(outputs["unlabeled"])
        tune = None
        if early_stopping and splits.tune is not None:
            tune = self.train_dataset(
                tokenizer, splits.tune, columns, max_length, name="tune",
                tokens=self.encode(tokenizer, splits.tune, columns, max_length, store=store),
            )
        return StudentSets(
            distill=EncodedDataset.concat(parts),
            distill_outputs=torch.cat(train_logits, dim=0),
            baseline=EncodedDataset(labeled_enc, labeled_labels),
            tune=tune,
            eval_tokens=self.encode(tokenizer, splits.eval, columns, max_length, store=store),
        )

    def eval_inputs(self, splits: Splits, outputs: Mapping[str, Any]) -> Any:
        """The eval split itself (its texts are encoded when predicted)."""
        return splits.eval

    def prediction_shape(self, eval_inputs: Any, label_names: Sequence[str]) -> tuple[int, int]:
        return len(eval_inputs), len(label_names)

    def samples(self, model: Any, tokenizer: Any, eval_inputs: Any) -> list[dict[str, str]]:
        """A classifier writes no text."""
        return []

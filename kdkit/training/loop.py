"""``fit``: train one model with kdkit's trainer, resuming where an interrupted run stopped. Teachers and
students are both trained through it, so they share one training loop, one set of arguments and one
checkpoint policy."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import EarlyStoppingCallback, TrainingArguments

from kdkit.distill.loss import DistillationLoss
from kdkit.recipe.schema import EarlyStopping
from kdkit.runtime import say, warn
from kdkit.training.checkpoints import checkpoint_to_resume
from kdkit.training.objectives import Objective
from kdkit.training.trainer import KDTrainer, make_trainer


@dataclass
class FitResult:
    """What one training run did."""

    steps: int  #: optimizer steps taken (the Trainer's global step)
    seconds: float  #: wall time of ``trainer.train``
    train_loss: float  #: the Trainer's mean training loss
    log: list[dict[str, Any]] = field(default_factory=list)  #: the Trainer's log entries that hold a loss
    resumed_from: str | None = None
    best_step: int | None = None  #: early stopping: the step of the checkpoint kept (its weights are the model's)
    best_metric: float | None = None  #: early stopping: that checkpoint's tune-split figure
    evaluations: list[dict[str, Any]] = field(default_factory=list)  #: early stopping: each tune-split evaluation


def fit(
    model: Any,
    tokenizer: Any,
    dataset: torch.utils.data.Dataset,
    args: TrainingArguments,
    *,
    objective: Objective | None = None,
    teacher_logits: torch.Tensor | None = None,
    loss_fn: DistillationLoss | None = None,
    resume: bool = False,
    label: str = "model",
    console: Any = None,
    eval_dataset: torch.utils.data.Dataset | None = None,
    compute_metrics: Callable[[Any], dict[str, float]] | None = None,
    early_stopping: EarlyStopping | None = None,
    collator: Any = None,
) -> tuple[KDTrainer, FitResult]:
    """Train ``model`` on ``dataset`` (see :func:`~kdkit.training.trainer.make_trainer` for the objective).

    :param resume: continue from the newest complete ``checkpoint-<step>`` in ``args.output_dir`` written before
        training ended (see :func:`~kdkit.training.checkpoints.checkpoint_to_resume`).
    :param label: how the model is named in progress lines ("student (seed 1)").
    :param early_stopping: evaluate on ``eval_dataset`` (with ``compute_metrics``) as ``args`` says, stop after
        the patience, and end with the best checkpoint's weights (the Trainer's EarlyStoppingCallback).
    :param collator: what batches ``dataset`` (default: :class:`~kdkit.training.data.KDCollator`).
    """
    if early_stopping is not None and (eval_dataset is None or compute_metrics is None):
        raise ValueError("early stopping needs eval_dataset and compute_metrics")
    extra = {"eval_dataset": eval_dataset, "compute_metrics": compute_metrics} if early_stopping is not None else {}
    trainer = make_trainer(
        model, tokenizer, dataset, args, teacher_logits=teacher_logits, loss_fn=loss_fn, objective=objective,
        collator=collator, **extra,
    )
    if args.fsdp and not trainer.weights_sharded and trainer.is_world_process_zero():
        # accelerate turns FSDP on for GPU-like devices only: on CPU processes (gloo) it drops it without a word
        warn(console, f"{label}: fsdp is set, but the Trainer does not shard the weights here (accelerate uses FSDP on "
                      "GPUs and other accelerators only); it trains with plain DDP instead")
    if early_stopping is not None:
        trainer.add_callback(
            EarlyStoppingCallback(
                early_stopping_patience=early_stopping.patience, early_stopping_threshold=early_stopping.threshold
            )
        )
    last = None
    if resume:
        last = checkpoint_to_resume(args.output_dir, console)
        if last:
            say(console, f"  resuming {label} from {last}")
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    state = trainer.state
    return trainer, FitResult(
        steps=state.global_step,
        seconds=seconds,
        train_loss=float(result.training_loss),
        log=[entry for entry in state.log_history if "loss" in entry],
        resumed_from=last,
        best_step=state.best_global_step if early_stopping is not None else None,
        best_metric=state.best_metric if early_stopping is not None else None,
        evaluations=[e for e in state.log_history if any(k.startswith("eval_") for k in e)],
    )

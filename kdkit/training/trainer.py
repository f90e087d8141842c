"""``KDTrainer``: a Hugging Face ``Trainer`` that minimises an objective (:mod:`kdkit.training.objectives`).

It adds to the Trainer only what every kdkit run needs: the objective's per-sample figures averaged into the
training log, a clear error (naming the last good checkpoint) when the loss stops being finite, and the
progress bar's log lines on stderr (stdout is kept for results).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback

from kdkit.distill.loss import DistillationLoss
from kdkit.errors import NonFiniteLossError
from kdkit.training.checkpoints import newest_complete_checkpoint
from kdkit.training.data import KDCollator
from kdkit.training.objectives import LabelObjective, LogitDistillation, Objective


class KDTrainer(Trainer):
    """``Trainer`` whose loss is ``objective(model, inputs).loss``.

    :param objective: what to minimise. Without it, ``teacher_logits`` and ``loss_fn`` give
        :class:`~kdkit.training.objectives.LogitDistillation` (``DistillationLoss`` over cached teacher logits
        ``[rows, N, C]``, row ``kd_index[b]`` for sample ``b``), and neither gives
        :class:`~kdkit.training.objectives.LabelObjective` (cross-entropy with the labels: teacher fine-tuning
        and the labels-only baseline).
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps itself
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        objective: Objective | None = None,
        teacher_logits: torch.Tensor | None = None,
        loss_fn: DistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if (teacher_logits is None) != (loss_fn is None):
            raise ValueError("give both teacher_logits and loss_fn, or neither")
        if objective is None:
            objective = LabelObjective() if loss_fn is None else LogitDistillation(teacher_logits, loss_fn)  # type: ignore[arg-type]
        self.objective = objective
        self._stats: dict[str, list[float]] = {}

    def _record(self, name: str, values: torch.Tensor) -> None:
        total = self._stats.setdefault(name, [0.0, 0.0])
        total[0] += float(values.sum())
        total[1] += values.numel()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        out = self.objective(model, inputs)
        for name, values in out.stats.items():
            self._record(name, values)
        loss = out.loss
        if model.training and not bool(torch.isfinite(loss.detach())):
            last = newest_complete_checkpoint(self.args.output_dir)
            self._close_progress_bar()
            kept = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.state.global_step + 1} in {self.args.output_dir}{kept}. "
                "Lower the learning rate or use fp32/bf16 instead of fp16"
            )
        return (loss, out.outputs) if return_outputs else loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """Evaluation (the tune split of early stopping) through the objective: its ``evaluate`` gives the loss,
        the predictions and the labels of a batch."""
        loss, predictions, labels = self.objective.evaluate(model, self._prepare_inputs(inputs))
        if prediction_loss_only:
            return loss, None, None
        return loss, predictions, labels

    @property
    def weights_sharded(self) -> bool:
        """Whether the Trainer shards the weights over the processes (FSDP, DeepSpeed): the model object then
        holds a share of them, and only :meth:`save_final_model` gives the whole model."""
        return bool(self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def save_final_model(self, directory: str | Path) -> None:
        """The trained model (safetensors, config, tokenizer) in ``directory``, loadable by ``from_pretrained``.

        Every process of the run calls it: under FSDP (full state dict) and DeepSpeed ZeRO-3 the Trainer gathers
        the weights from all of them, and the process that saves (``args.should_save``, rank 0) writes them; the
        others write nothing. The Trainer's pickled arguments (``training_args.bin``) are left out: kdkit's outputs
        hold safetensors and JSON only."""
        self.save_model(str(directory))
        if self.args.should_save:
            (Path(directory) / TRAINING_ARGS_NAME).unlink(missing_ok=True)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        except KeyboardInterrupt:
            self._close_progress_bar()
            raise

    def _close_progress_bar(self) -> None:
        """End the training bar's line, so that a message printed next (an error, Ctrl-C) starts on its own."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
                callback.training_bar = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, (total, count) in self._stats.items():
                if count:
                    logs[name] = round(total / count, 4)
            self._stats = {}
        super().log(logs, start_time)


class StderrProgressCallback(ProgressCallback):
    """The Trainer's tqdm bar, with its log lines written to stderr (stdout is kept for results)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
        self.training_bar.write(str(shown), file=sys.stderr)


def use_stderr_progress(trainer: Trainer) -> None:
    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StderrProgressCallback())


def make_trainer(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    args: TrainingArguments,
    *,
    teacher_logits: torch.Tensor | None = None,
    loss_fn: DistillationLoss | None = None,
    objective: Objective | None = None,
    collator: Any = None,
    eval_dataset: Any = None,
    compute_metrics: Any = None,
) -> KDTrainer:
    """A :class:`KDTrainer` over ``dataset`` with kdkit's collator (padding to a multiple of 8 under mixed
    precision on a GPU) and its progress output."""
    on_gpu = torch.cuda.is_available() and (args.bf16 or args.fp16)
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        data_collator=collator or KDCollator(tokenizer, pad_to_multiple_of=8 if on_gpu else None),
        processing_class=tokenizer,
        objective=objective,
        teacher_logits=teacher_logits,
        loss_fn=loss_fn,
    )
    use_stderr_progress(trainer)
    return trainer

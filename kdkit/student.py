"""Student distillation: a Hugging Face ``Trainer`` whose loss is :class:`kdkit.DistillationLoss` over cached
teacher logits, plus the pieces shared with teacher fine-tuning (dataset, collator, training arguments).

Each training sample carries ``kd_index``, its row in the teacher-logit tensor ``[rows, N, C]``. The collator
keeps it beside the padded model inputs, and :meth:`KDTrainer.compute_loss` pops it (and the labels) before
calling the model, so the model never sees it and the Trainer's column removal never drops it
(``remove_unused_columns`` is off: kdkit builds exactly the columns it needs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kdkit.batch import IGNORE_INDEX
from kdkit.errors import KdkitError
from kdkit.loss import DistillationLoss
from kdkit.recipe import Recipe, TrainConfig
from kdkit.utils import resolve_precision, say, warn

#: Training-config fields that change nothing about the trained weights (left out of cache keys).
NON_RESULT_FIELDS = frozenset(
    {"eval_batch_size", "logging_steps", "report_to", "gradient_checkpointing", "save_steps", "seeds", "model",
     "checkpoints", "trust_remote_code", "num_layers", "precision", "label_only_baseline"}
)


class NonFiniteLossError(KdkitError):
    """The training loss became NaN or infinite."""


def last_complete_checkpoint(directory: str | Path, console: Any = None) -> str | None:
    """The newest ``checkpoint-<step>`` folder in ``directory`` that was written completely, or None.

    The Trainer writes a checkpoint in place, its ``trainer_state.json`` last: a run killed while saving leaves a
    folder without it (or with a cut one). Such a folder is reported, removed and skipped, so that resuming starts
    from the checkpoint before it instead of failing on it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            warn(console, f"checkpoint {path} was not written completely (stopped while saving); removing it")
            shutil.rmtree(path, ignore_errors=True)
    return None


# --------------------------------------------------------------------------- data
class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized samples (unpadded), their labels and, for distillation, their row in the teacher logits."""

    def __init__(
        self,
        encoded: Mapping[str, Sequence[Sequence[int]]],
        labels: Sequence[int],
        kd_index: Sequence[int] | None = None,
    ) -> None:
        self.encoded = {name: list(values) for name, values in encoded.items()}
        self.labels = [int(v) for v in labels]
        self.kd_index = None if kd_index is None else [int(v) for v in kd_index]
        for name, values in self.encoded.items():
            if len(values) != len(self.labels):
                raise ValueError(f"column {name} has {len(values)} rows, labels {len(self.labels)}")
        if self.kd_index is not None and len(self.kd_index) != len(self.labels):
            raise ValueError("kd_index and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {name: values[i] for name, values in self.encoded.items()}
        item["labels"] = self.labels[i]
        if self.kd_index is not None:
            item["kd_index"] = self.kd_index[i]
        return item

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        names = list(parts[0].encoded)
        encoded = {name: [row for part in parts for row in part.encoded[name]] for name in names}
        labels = [v for part in parts for v in part.labels]
        has_index = all(part.kd_index is not None for part in parts)
        kd_index = [v for part in parts for v in part.kd_index] if has_index else None  # type: ignore[union-attr]
        return EncodedDataset(encoded, labels, kd_index)


class KDCollator:
    """Pads the model inputs of a batch to its longest sample; passes ``labels`` and ``kd_index`` through."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        passthrough = ("labels", "kd_index")
        inputs = [{k: v for k, v in f.items() if k not in passthrough} for f in features]
        batch = dict(
            self.tokenizer.pad(inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        )
        for name in passthrough:
            if name in features[0]:
                batch[name] = torch.tensor([int(f[name]) for f in features], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------- trainer
class KDTrainer(Trainer):
    """``Trainer`` whose loss is ``DistillationLoss`` over cached teacher logits.

    :param teacher_logits: ``[rows, N, C]``; sample ``b`` of a batch uses row ``kd_index[b]``.
    :param loss_fn: the distillation loss. Without ``loss_fn`` / ``teacher_logits`` the loss is the plain
        cross-entropy with the labels (teacher fine-tuning and the labels-only baseline), computed here the same
        way so that both kinds of run differ only in the kd term.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps itself
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        teacher_logits: torch.Tensor | None = None,
        loss_fn: DistillationLoss | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if (teacher_logits is None) != (loss_fn is None):
            raise ValueError("give both teacher_logits and loss_fn, or neither")
        self.teacher_logits = teacher_logits
        self.loss_fn = loss_fn
        self._device_logits: torch.Tensor | None = None
        self._stats: dict[str, list[float]] = {}

    def _teacher_batch(self, kd_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert self.teacher_logits is not None
        if self._device_logits is None or self._device_logits.device != device:
            self._device_logits = self.teacher_logits.to(device=device, dtype=torch.float32)
        return self._device_logits.index_select(0, kd_index.to(device))

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
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        kd_index = inputs.pop("kd_index", None)
        outputs = model(**inputs)
        logits = outputs.logits.float()
        if self.loss_fn is None:
            labeled = labels != IGNORE_INDEX
            if not bool(labeled.any()):
                loss = logits.sum() * 0.0
            else:
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        else:
            if kd_index is None:
                raise KdkitError("a distillation batch has no kd_index column: build it with EncodedDataset")
            out = self.loss_fn(logits, self._teacher_batch(kd_index, logits.device), labels)
            loss = out.loss
            self._record("kd_weight", out.kd_weights)
            self._record("sample_weight", out.sample_weights)
        if model.training and not bool(torch.isfinite(loss.detach())):
            last = last_complete_checkpoint(self.args.output_dir)
            self._close_progress_bar()
            kept = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.state.global_step + 1} in {self.args.output_dir}{kept}. "
                "Lower the learning rate or use fp32/bf16 instead of fp16"
            )
        return (loss, outputs) if return_outputs else loss

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


def training_arguments(
    cfg: TrainConfig,
    *,
    output_dir: str | Path,
    seed: int,
    save_steps: int | None = None,
    max_steps: int | None = None,
    where: str = "student",
) -> TrainingArguments:
    """``TrainingArguments`` from a recipe's training table (``where``: its name, for messages).

    :param save_steps: checkpoint every so many optimizer steps (``None``: no checkpoints).
    :param max_steps: overrides the recipe (the labels-only baseline runs as many steps as the student).
    """
    precision = resolve_precision(cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise KdkitError(f"{where}.precision = 'fp16' needs a CUDA GPU; use 'bf16', 'fp32' or 'auto' on the CPU")
    steps = cfg.max_steps if max_steps is None else max_steps
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=steps if steps and steps > 0 else -1,
        weight_decay=cfg.weight_decay,
        # a float below 1 is a ratio of the total steps for transformers; 1.0 would read as "1 step"
        warmup_steps=min(cfg.warmup_ratio, 0.999999),
        optim=cfg.optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        report_to=list(cfg.report_to) if cfg.report_to else "none",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2 if save_steps else None,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # several processes on a machine without CUDA (torchrun, gloo): without use_cpu the Trainer would not
        # wrap the model in DDP and every process would train alone on all the data
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )


def make_trainer(
    model: Any,
    tokenizer: Any,
    dataset: EncodedDataset,
    args: TrainingArguments,
    *,
    teacher_logits: torch.Tensor | None = None,
    loss_fn: DistillationLoss | None = None,
) -> KDTrainer:
    on_gpu = torch.cuda.is_available() and (args.bf16 or args.fp16)
    trainer = KDTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=KDCollator(tokenizer, pad_to_multiple_of=8 if on_gpu else None),
        processing_class=tokenizer,
        teacher_logits=teacher_logits,
        loss_fn=loss_fn,
    )
    use_stderr_progress(trainer)
    return trainer


def optimizer_steps(num_samples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """How many optimizer steps the Trainer runs for ``num_samples`` (as its own loop counts them)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(num_samples / (cfg.batch_size * world_size))
    # an epoch's last, shorter accumulation still makes an optimizer step
    per_epoch = max(math.ceil(batches / cfg.gradient_accumulation_steps), 1)
    return math.ceil(cfg.epochs * per_epoch)


# --------------------------------------------------------------------------- a student run
StudentKind = Literal["distilled", "labels-only"]


@dataclass
class StudentRun:
    """One trained student (one seed, distilled or labels-only)."""

    seed: int
    kind: StudentKind
    directory: Path
    steps: int  #: optimizer steps taken
    train_samples: int
    eval_logits: torch.Tensor  #: ``[eval rows, C]``
    seconds: float
    reused: bool = False  #: finished by an earlier run of the same recipe
    resumed_from: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


def student_config_hash(recipe: Recipe, extra: Mapping[str, Any]) -> str:
    from kdkit.models import model_identity, resolve_model_ref
    from kdkit.utils import hash_json

    cfg = recipe.student
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}
    return hash_json(
        {
            "model": model_identity(resolve_model_ref(cfg.model)),
            "num_layers": cfg.num_layers,
            "precision": resolve_precision(cfg.precision),
            "train": settings,
            "max_length": recipe.data.max_length,
            **extra,
        },
        length=10,
    )


def train_student(
    recipe: Recipe,
    *,
    tokenizer: Any,
    dataset: EncodedDataset,
    eval_split: Any,
    text_columns: Sequence[str],
    label_names: Sequence[str],
    seed: int,
    kind: StudentKind,
    directory: Path,
    teacher_logits: torch.Tensor | None = None,
    loss_fn: DistillationLoss | None = None,
    max_steps: int | None = None,
    console: Any = None,
) -> StudentRun:
    """Train (or resume, or reuse) one student in ``directory`` and predict the eval split.

    ``directory`` must be specific to the run's settings (the pipeline puts a config hash in its name): a
    ``checkpoint-<step>`` found there is resumed, and a finished run (``done.json`` + ``eval_logits.safetensors``) is
    reused as it is.
    """
    from transformers import set_seed

    from kdkit.cache import predict_logits, read_logits, write_logits
    from kdkit.models import load_classifier, resolve_model_ref
    from kdkit.utils import atomic_write_json, read_json

    done_file = directory / "done.json"
    logits_file = directory / "eval_logits.safetensors"
    if done_file.is_file() and logits_file.is_file():
        try:
            done = read_json(done_file)
            eval_logits = read_logits(logits_file, rows=len(eval_split), classes=len(label_names))
            return StudentRun(
                seed=seed,
                kind=kind,
                directory=directory,
                steps=int(done["steps"]),
                train_samples=int(done["train_samples"]),
                eval_logits=eval_logits,
                seconds=float(done["seconds"]),
                reused=True,
                log=list(done.get("log", [])),
            )
        except (ValueError, KeyError, OSError) as exc:
            warn(console, f"finished run in {directory} is unreadable ({exc}); training it again")
            done_file.unlink(missing_ok=True)

    cfg = recipe.student
    who = "student" if kind == "distilled" else "labels-only student"
    set_seed(seed)
    model = load_classifier(
        resolve_model_ref(cfg.model),
        label_names=label_names,
        who=who,
        num_layers=cfg.num_layers,
        trust_remote_code=cfg.trust_remote_code,
        pooling=cfg.pooling,
    )
    # checkpoint-<step>/ folders and the report_to logs (runs/ for TensorBoard) live in the run's directory
    args = training_arguments(cfg, output_dir=directory, seed=seed, save_steps=cfg.save_steps, max_steps=max_steps)
    trainer = make_trainer(model, tokenizer, dataset, args, teacher_logits=teacher_logits, loss_fn=loss_fn)
    last = last_complete_checkpoint(directory, console)
    if last:
        say(console, f"  resuming {who} (seed {seed}) from {last}")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step

    device = next(model.parameters()).device
    eval_logits = predict_logits(
        model, tokenizer, eval_split, text_columns, recipe.data.max_length, cfg.eval_batch_size,
        device=device, who=who, split="eval",
    )
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        trainer.save_model(str(directory / "model"))
        # the Trainer adds its arguments as a pickle (torch.save); kdkit's outputs hold safetensors and JSON only
        (directory / "model" / "training_args.bin").unlink(missing_ok=True)
        write_logits(logits_file, eval_logits, {"kind": kind, "seed": str(seed)})
        atomic_write_json(
            done_file,
            {"seed": seed, "kind": kind, "steps": steps, "train_samples": len(dataset), "seconds": seconds, "log": log},
        )
        for checkpoint in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return StudentRun(
        seed=seed,
        kind=kind,
        directory=directory,
        steps=steps,
        train_samples=len(dataset),
        eval_logits=eval_logits,
        seconds=seconds,
        resumed_from=last,
        log=log,
    )

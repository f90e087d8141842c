"""The student side shared by the step, memory and end-to-end benchmarks: data, arguments, trainers.

kdkit's side is built with kdkit's own functions (``kdkit.training.training_arguments``, ``make_trainer``,
``EncodedDataset``); the plain side is a stock ``transformers.Trainer`` with ``DataCollatorWithPadding`` and
the model's own loss, given the same arguments and the same dataset order, so both see the same batches.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from benchmarks import common
from benchmarks.common import Sizes


@dataclass
class StudentData:
    tokenizer: Any
    texts: list[str]
    encoded: dict[str, list[list[int]]]  #: unpadded, truncated to max_length
    labels: list[int]  #: true labels (plain fine-tuning)
    mixed_labels: list[int]  #: the second half -100 (labeled + unlabeled, as a UniKD run sees them)
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def mean_tokens(self) -> float:
        return statistics.mean(len(ids) for ids in self.encoded["input_ids"])


def student_data(sizes: Sizes, samples: int, seed: int = 3, classes: int | None = None) -> StudentData:
    from kdkit.modeling import encode

    from benchmarks import models as bench_models

    texts, labels, source = common.sentences(samples, seed=seed, classes=classes or sizes.classes)
    tok = common.tokenizer()
    encoded = encode(tok, bench_models.dataset(texts, labels), ["sentence"], sizes.seq)
    # the first half keeps its labels, the second half is the unlabeled split (the Trainer shuffles)
    half = samples - samples // 2
    mixed = labels[:half] + [-100] * (samples - half)
    return StudentData(tok, texts, encoded, labels, mixed, source)


def student_config(sizes: Sizes, **overrides: Any) -> Any:
    from kdkit.recipe import StudentConfig

    values: dict[str, Any] = dict(
        model=str(common.minilm_dir()),
        num_layers=sizes.student_layers,
        batch_size=sizes.batch,
        learning_rate=2e-5,
        epochs=float(sizes.epochs),
        logging_steps=50,
    )
    values.update(overrides)
    return StudentConfig(**values)


def arguments(sizes: Sizes, output_dir: Path, *, max_steps: int | None = None, epochs: float | None = None) -> Any:
    """kdkit's ``TrainingArguments`` for the student (no checkpoints, no progress bar); both sides use them."""
    from kdkit.training import training_arguments

    cfg = student_config(sizes, **({"epochs": epochs} if epochs is not None else {}))
    args = training_arguments(cfg, output_dir=output_dir, seed=0, save_steps=None, max_steps=max_steps)
    args.disable_tqdm = True
    return args


def plain_trainer(model: Any, data: StudentData, args: Any) -> Any:
    """A stock ``Trainer``: the model computes its own cross-entropy; dynamic padding per batch."""
    from transformers import DataCollatorWithPadding, Trainer

    from kdkit.training import EncodedDataset

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=EncodedDataset(data.encoded, data.labels),
        data_collator=DataCollatorWithPadding(data.tokenizer),
        processing_class=data.tokenizer,
    )
    return quiet(trainer)


def quiet(trainer: Any) -> Any:
    """No log printing (``disable_tqdm`` swaps the bar for a printer): the same on both sides."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def kdkit_trainer(model: Any, data: StudentData, args: Any, teacher_logits: torch.Tensor, loss_fn: Any) -> Any:
    """kdkit's student trainer exactly as ``kdkit run`` builds it (``kdkit.training.make_trainer``)."""
    from kdkit.training import EncodedDataset, make_trainer

    dataset = EncodedDataset(data.encoded, data.mixed_labels, kd_index=range(len(data)))
    return quiet(make_trainer(model, data.tokenizer, dataset, args, teacher_logits=teacher_logits, loss_fn=loss_fn))


def cached_logits(rows: int, teachers: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Teacher logits as the cache holds them, ``[rows, N, C]`` float32 (random: timing does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, teachers, classes, generator=gen) * 3


class StepTimer(TrainerCallback):
    """Times each optimizer step inside the Trainer: from ``on_step_begin`` to ``on_step_end``.

    That window holds forward, loss, backward, gradient clipping, the optimizer and the scheduler; it leaves
    out fetching and collating the batch, which both sides do the same way.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []  #: process CPU time (all threads) of each step
        self._start = 0.0
        self._cpu = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._cpu = time.process_time()
        self._start = common.now()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(common.now() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu)


def batch_signature(trainer: Any, batches: int) -> list[tuple[int, ...]]:
    """A fingerprint of the first ``batches`` training batches (to check both sides see the same ones)."""
    out = []
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= batches:
            break
        ids = batch["input_ids"]
        out.append((tuple(ids.shape), int(ids.sum()), int((ids * torch.arange(ids.shape[1])).sum())))
    return out

"""A recipe's training table -> ``transformers.TrainingArguments``, and how many optimizer steps that makes.

``batch_size`` is global by default (``batch_scope = "global"``): the samples of one optimizer step, over every
process and accumulation step, as papers report it. Each process then takes
``batch_size / (processes x gradient_accumulation_steps)`` samples per forward pass (:func:`per_device_batch`), so a
run on one process and a run on eight train with the same effective batch. ``batch_scope = "per-device"`` keeps
transformers' meaning (``per_device_train_batch_size``): the effective batch grows with the processes.
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from kdkit.errors import KdkitError
from kdkit.recipe.schema import TrainConfig
from kdkit.runtime import as_single_process, local_rank, resolve_precision, world_size

#: Training-config fields that change nothing about the trained weights (left out of cache keys).
NON_RESULT_FIELDS = frozenset(
    {"eval_batch_size", "logging_steps", "report_to", "gradient_checkpointing", "save_steps", "seeds", "model",
     "checkpoints", "trust_remote_code", "num_layers", "precision", "label_only_baseline",
     # how teachers continue unlabeled prompts (causal-lm): keys the generated text, not the teachers' weights
     "generation"}
)

#: Settings added after kdkit 0.1 that change nothing while they hold their default: left out of cache keys
#: then, so that a teacher trained before they existed keeps its key.
_KEYED_WHEN_SET = {"early_stopping": None, "trainer": {}, "keep_layers": None, "config": {}}


def result_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that change a trained model's weights, as they enter cache keys."""
    settings = cfg.model_dump(mode="json")
    return {
        k: v
        for k, v in settings.items()
        if k not in NON_RESULT_FIELDS and not (k in _KEYED_WHEN_SET and v == _KEYED_WHEN_SET[k])
    }


def early_stopping_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """TrainingArguments that evaluate on the tune split every ``eval_steps``, checkpoint at each evaluation and
    load the best checkpoint at the end (empty without early stopping)."""
    stop = cfg.early_stopping
    if stop is None:
        return {}
    return {
        "eval_strategy": "steps",
        "eval_steps": stop.eval_steps,
        "save_strategy": "steps",
        "save_steps": stop.eval_steps,
        "save_total_limit": 2,  # the newest checkpoint and the best one (the Trainer keeps the best besides)
        "load_best_model_at_end": True,
        "metric_for_best_model": f"eval_{stop.metric}",
        "greater_is_better": stop.metric not in ("loss", "perplexity"),
        # the patience counter is part of the checkpoint: a resumed run stops where an uninterrupted one would
        "restore_callback_states_from_checkpoint": True,
    }


def per_device_batch(cfg: TrainConfig, processes: int, where: str = "student") -> int:
    """The samples each of ``processes`` processes takes per forward pass (``per_device_train_batch_size``).

    :raises KdkitError: naming ``<where>.batch_size`` when a global batch does not divide evenly.
    """
    if cfg.batch_scope == "per-device":
        return cfg.batch_size
    parts = processes * cfg.gradient_accumulation_steps
    if cfg.batch_size % parts:
        raise KdkitError(
            f"{where}.batch_size = {cfg.batch_size} is the global batch ({where}.batch_scope = 'global'), which "
            f"must divide evenly over {processes} process{'es' if processes != 1 else ''} x "
            f"{cfg.gradient_accumulation_steps} accumulation step{'s' if cfg.gradient_accumulation_steps != 1 else ''}"
            f" = {parts}; use a multiple of {parts}, or set {where}.batch_scope = 'per-device'"
        )
    return cfg.batch_size // parts


def batch_settings(cfg: TrainConfig, processes: int, where: str = "student") -> dict[str, Any]:
    """The training settings that change a result, for cache keys (:func:`result_settings`) with the batch as the
    effective batch: ``batch_size`` is the samples of one forward pass summed over the processes (the effective
    batch divided by the accumulation steps) and ``batch_scope`` is left out, so recipes that give the same
    effective batch share keys whatever the scope and however many processes train (``processes`` matters for
    ``batch_scope = "per-device"`` only). For one process and the default scope it is the recipe's ``batch_size``,
    as before ``batch_scope`` existed, so those keys did not change."""
    settings = result_settings(cfg)
    settings.pop("batch_scope", None)
    if cfg.batch_scope == "global":
        settings["batch_size"] = per_device_batch(cfg, 1, where)
    else:
        settings["batch_size"] = cfg.batch_size * processes
    return settings


#: ``TrainingArguments`` fields with which the Trainer shards the weights over the processes (FSDP, DeepSpeed), and
#: the environment variables by which ``accelerate launch`` asks for the same.
SHARDING_FIELDS = ("fsdp", "deepspeed")
_SHARDING_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def asks_for_sharding(cfg: TrainConfig) -> bool:
    """Whether the recipe's ``trainer`` table (or ``accelerate launch``) asks the Trainer to shard the weights over
    the processes: such a model is trained by all of them together, never by one alone."""
    if any(cfg.trainer.get(name) for name in SHARDING_FIELDS):
        return True
    return any(os.environ.get(name, "").lower() in ("1", "true") for name in _SHARDING_ENV)


def sharding_problem(cfg: TrainConfig, processes: int, where: str = "student") -> tuple[str, str] | None:
    """``(recipe key, message)`` when the ``trainer`` table shards the weights (FSDP, DeepSpeed) of a model that
    ``processes`` = 1 process trains (the Trainer would refuse it later, after the stages before it ran)."""
    sharding = [name for name in SHARDING_FIELDS if cfg.trainer.get(name)]
    if not sharding or processes > 1:
        return None
    return (
        f"{where}.trainer.{sharding[0]}",
        "shards the weights over the processes of a torchrun or accelerate launch run, and this run has one "
        "process; launch several, or leave it out",
    )


class SingleProcessTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for a model that one process of a torchrun run trains alone (teachers dealt one per
    process): no DDP and no DataParallel, on this process's own GPU (transformers would pick GPU 0 and every
    visible GPU), exactly as a run of its own would train it."""

    @cached_property
    def _setup_devices(self) -> torch.device:
        gpu = local_rank()
        with as_single_process():
            device = TrainingArguments._setup_devices.func(self)  # type: ignore[attr-defined]
        if device.type == "cuda":
            device = torch.device("cuda", gpu)
            torch.cuda.set_device(device)
            self._n_gpu = 1
        return device



def training_arguments(
    cfg: TrainConfig,
    *,
    output_dir: str | Path,
    seed: int,
    save_steps: int | None = None,
    max_steps: int | None = None,
    where: str = "student",
    processes: int | None = None,
) -> TrainingArguments:
    """``TrainingArguments`` from a recipe's training table (``where``: its name, for messages).

    :param save_steps: checkpoint every so many optimizer steps (``None``: no checkpoints; with early stopping,
        a checkpoint at each evaluation instead).
    :param max_steps: overrides the recipe (the labels-only baseline runs as many steps as the student).
    :param processes: how many processes train this model together (default: all of the run's); 1 in a
        torchrun run trains it in this process alone (:class:`SingleProcessTrainingArguments`).
    """
    processes = world_size() if processes is None else processes
    problem = sharding_problem(cfg, processes, where)
    if problem is not None:
        raise KdkitError(f"{problem[0]}: {problem[1]}")
    precision = resolve_precision(cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise KdkitError(f"{where}.precision = 'fp16' needs a CUDA GPU; use 'bf16', 'fp32' or 'auto' on the CPU")
    steps = cfg.max_steps if max_steps is None else max_steps
    checkpoints = {
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "save_total_limit": 2 if save_steps else None,
    }
    kind = SingleProcessTrainingArguments if processes == 1 < world_size() else TrainingArguments
    return kind(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch(cfg, processes, where),
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
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # several processes on a machine without CUDA (torchrun, gloo): without use_cpu the Trainer would not
        # wrap the model in DDP and every process would train alone on all the data; bf16 without CUDA: without
        # it the Trainer refuses ("doesn't support bf16/gpu") instead of training under CPU bf16 autocast
        use_cpu=not torch.cuda.is_available() and (processes > 1 or precision == "bf16"),
        # every parameter of a kdkit model takes part in the loss: transformers' default (look for unused ones
        # after every backward pass) only costs time
        ddp_find_unused_parameters=False,
        **{**checkpoints, **early_stopping_arguments(cfg), **cfg.trainer},
    )


def optimizer_steps(num_samples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """How many optimizer steps the Trainer runs for ``num_samples`` (as its own loop counts them)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(num_samples / (per_device_batch(cfg, world_size) * world_size))
    # an epoch's last, shorter accumulation still makes an optimizer step
    per_epoch = max(math.ceil(batches / cfg.gradient_accumulation_steps), 1)
    return math.ceil(cfg.epochs * per_epoch)

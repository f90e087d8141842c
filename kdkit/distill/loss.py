"""``DistillationLoss``: the ensemble-distillation objective, usable in any training loop.

Per sample ``b`` (DESIGN.md section 1)::

    target_b = sum_i w_bi * softmax(z_t[b, i] / T)             # teacher ensembling hook
    kd_b     = -sum_c target_b[c] * log_softmax(z_s[b] / T)[c] * T^2   (if b's stream is in ``on``, else 0)
    task_b   = CE(z_s[b], y_b)                                  (labeled samples, else 0)
    loss_b   = s_b * (k_b * kd_b + task_b)                       # k: loss-weighting, s: sample-weighting hooks
    loss     = mean_b loss_b
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from kdkit.errors import DataError, KdkitError
from kdkit.plugin.base import Plugin
from kdkit.plugin.batch import IGNORE_INDEX, STREAMS, KDBatch, Stream, safe_log_softmax
from kdkit.plugin.collectives import data_parallel_size
from kdkit.plugin.hookspecs import combine_product, combine_teacher_weights
from kdkit.plugin.registry import (
    KdkitPluginManager,
    PluginRegistry,
    asked_for_teacher_weights,
    build_manager,
    check_ensembling_conflicts,
    discover_plugins,
)


@dataclass
class DistillationOutput:
    """What one call of :class:`DistillationLoss` computed. All ``[B]``/``[B, N]`` tensors are per sample."""

    loss: torch.Tensor  #: scalar, ``per_sample.mean()``; carries the gradient
    per_sample: torch.Tensor  #: ``[B]`` ``s * (k * kd + task)``
    kd: torch.Tensor  #: ``[B]`` the unweighted distillation term (0 where switched off)
    task: torch.Tensor  #: ``[B]`` the student's task loss (0 for unlabeled samples)
    teacher_weights: torch.Tensor  #: ``[B, N]`` detached
    kd_weights: torch.Tensor  #: ``[B]`` detached
    sample_weights: torch.Tensor  #: ``[B]`` detached


class DistillationLoss:
    """Ensemble distillation loss whose weights come from kdkit plugins.

    >>> loss_fn = DistillationLoss.from_plugins({"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10}})
    >>> out = loss_fn(student_logits, teacher_logits, labels)   # labels: -100 marks unlabeled samples
    >>> out.loss.backward()

    :param plugins: configured plugin instances (``from_plugins`` builds them from names and options).
    :param temperature: ``T`` of the soft targets; the kd term is scaled by ``T^2``.
    :param on: the streams whose samples receive the kd term.
    """

    def __init__(
        self,
        plugins: Iterable[Plugin] = (),
        *,
        temperature: float = 1.0,
        on: Sequence[str] = STREAMS,
    ) -> None:
        if not temperature > 0:
            raise KdkitError(f"temperature must be > 0, got {temperature}")
        unknown = [s for s in on if s not in STREAMS]
        if unknown or not on:
            raise KdkitError(f"`on` must be a non-empty subset of {list(STREAMS)}, got {list(on)}")
        self.plugins: list[Plugin] = list(plugins)
        check_ensembling_conflicts(self.plugins)
        self.temperature = float(temperature)
        self.on: tuple[Stream, ...] = tuple(s for s in STREAMS if s in on)
        self.plugin_manager: KdkitPluginManager = build_manager(self.plugins)
        hook = self.plugin_manager.hook
        # Teacher weights of a stream come only from the plugins that claim it (and a fallback), so that no
        # answer depends on the order the plugins were loaded in (pluggy asks the last registered first).
        self._teacher_weights = {
            stream: self.plugin_manager.subset_hook_caller(
                "kdkit_teacher_weights", [p for p in self.plugins if not asked_for_teacher_weights(p, stream)]
            )
            for stream in STREAMS
        }
        self._kd_weights = hook.kdkit_kd_weights
        self._sample_weights = hook.kdkit_sample_weights

    @classmethod
    def from_plugins(
        cls,
        plugins: Mapping[str, Mapping[str, Any] | BaseModel | None] | None = None,
        *,
        temperature: float = 1.0,
        on: Sequence[str] = STREAMS,
        registry: PluginRegistry | None = None,
    ) -> DistillationLoss:
        """Build the loss from ``{plugin name: options}``; options are validated by each plugin's model.

        :param registry: where to find the plugins; by default every installed plugin (entry points).
        """
        if registry is None:
            registry = discover_plugins()
        return cls(registry.instantiate(plugins or {}), temperature=temperature, on=on)

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.plugins) or "average"
        return f"DistillationLoss(plugins=[{names}], temperature={self.temperature}, on={list(self.on)})"

    # ----------------------------------------------------------------- weights
    def weights(self, batch: KDBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher weights ``[B, N]``, kd weights ``[B]`` and sample weights ``[B]`` for ``batch`` (no gradient).

        The hooks are called once per stream, each with a view of that stream's samples. Alone, kdkit asks only
        about the streams present in ``batch``; when several data-parallel ranks run, it asks about every
        stream on every rank, in the same order, with an empty view where this rank has no sample of a stream,
        so that a plugin reducing a statistic over ranks (:meth:`KDBatch.mean_over_ranks`) never waits for a rank
        that did not call it.
        """
        parts = batch.stream_parts(every_stream=data_parallel_size() > 1)
        size, n = batch.size, batch.num_teachers
        teacher_w = torch.empty(size, n, device=batch.device, dtype=torch.float32)
        kd_w = torch.empty(size, device=batch.device, dtype=torch.float32)
        sample_w = torch.empty(size, device=batch.device, dtype=torch.float32)
        whole: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for stream, index in parts:
            answers = self._stream_weights(batch.select(index, stream), stream)
            if index is None:
                whole = answers
            elif index.numel():
                teacher_w[index], kd_w[index], sample_w[index] = answers
        return whole if whole is not None else (teacher_w, kd_w, sample_w)

    def _stream_weights(self, view: KDBatch, stream: Stream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if stream == "unlabeled" and "unlabeled" not in self.on:
            # These samples have neither a kd term nor a task loss: their loss is 0 whatever the weights, so the
            # plugins are not asked (and the neutral weights are reported).
            ones = torch.ones(view.size, device=view.device, dtype=torch.float32)
            return view.uniform_weights, ones, ones
        with torch.no_grad():
            tw = combine_teacher_weights(self._teacher_weights[stream](batch=view), view, stream)
            kw = combine_product(self._kd_weights(batch=view), view, "kdkit_kd_weights", stream)
            sw = combine_product(self._sample_weights(batch=view), view, "kdkit_sample_weights", stream)
        return tw, kw, sw

    # ----------------------------------------------------------------- loss
    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> DistillationOutput:
        """Compute the loss of one batch.

        :param student_logits: ``[B, C]``, with gradient.
        :param teacher_logits: ``[B, N, C]``.
        :param labels: ``[B]`` long, ``-100`` for an unlabeled sample.
        """
        _check_shapes(student_logits, teacher_logits, labels)
        labels = labels.long()
        t = self.temperature
        batch = KDBatch(student_logits, teacher_logits, labels, t)
        teacher_w, kd_w, sample_w = self.weights(batch)

        labeled = batch.labeled_mask
        student_log_p = safe_log_softmax(student_logits / t)
        teacher_probs = batch.teacher_probs
        target = torch.einsum("bn,bnc->bc", teacher_w.to(teacher_probs.dtype), teacher_probs)
        kd = -(target * student_log_p).sum(dim=-1) * (t * t)
        if len(self.on) < len(STREAMS):
            gets_kd = labeled if self.on == ("labeled",) else ~labeled
            kd = kd * gets_kd.to(kd.dtype)

        log_p1 = student_log_p if t == 1.0 else safe_log_softmax(student_logits)
        task = -log_p1.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1) * labeled.to(log_p1.dtype)

        per_sample = sample_w * (kd_w * kd + task)
        return DistillationOutput(
            loss=per_sample.mean(),
            per_sample=per_sample,
            kd=kd,
            task=task,
            teacher_weights=teacher_w,
            kd_weights=kd_w,
            sample_weights=sample_w,
        )


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, C], got shape {tuple(student_logits.shape)}")
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be [B, N, C], got shape {tuple(teacher_logits.shape)}")
    b, c = student_logits.shape
    if teacher_logits.shape[0] != b or teacher_logits.shape[2] != c:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} does not match student_logits {tuple(student_logits.shape)}"
            " (expected [B, N, C])"
        )
    if teacher_logits.shape[1] < 1:
        raise ValueError("teacher_logits holds no teacher (N = 0)")
    if b == 0:
        raise DataError("empty batch: student_logits holds no sample (B = 0), so there is no loss to average")
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B] = [{b}], got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer class ids (-100 = unlabeled), got dtype {labels.dtype}")
    # -1 would otherwise count as labeled class 0, and an id >= C fail deep inside gather (a device assert on GPU)
    invalid = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= c))
    if bool(invalid.any()):
        i = int(invalid.nonzero()[0, 0])
        raise ValueError(
            f"labels must be class ids in [0, {c}) or {IGNORE_INDEX} (unlabeled); sample {i} has label {int(labels[i])}"
        )
    bad = first_true(~torch.isfinite(teacher_logits))
    if bad is not None:
        sample, teacher, cls = bad
        raise DataError(
            f"teacher logits are not finite: sample {sample}, teacher {teacher + 1}, class {cls} holds "
            f"{float(teacher_logits[sample, teacher, cls])} (a teacher that diverged or a corrupt logit file)"
        )


def first_true(mask: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first ``True`` of ``mask`` (row-major), or ``None``: where to point an error message."""
    if not bool(mask.any()):
        return None
    return tuple(int(i) for i in mask.nonzero()[0])


def check_plugins_accept(loss_fn: DistillationLoss, num_teachers: int, num_classes: int, *, unlabeled: bool) -> None:
    """Run ``loss_fn`` once on a made-up batch with the run's number of teachers and classes: one labeled sample,
    and one unlabeled sample if the run distills on unlabeled data. A plugin that refuses this ensemble (one
    teacher for disagreement, ``C * N < 1`` for AE-KD) raises here, before any data or model is touched."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, IGNORE_INDEX] if unlabeled else [0])
    student = torch.randn(len(labels), num_classes, generator=gen)
    teachers = torch.randn(len(labels), num_teachers, num_classes, generator=gen)
    loss_fn(student, teachers, labels)

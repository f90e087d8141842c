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

from kdkit.batch import IGNORE_INDEX, STREAMS, KDBatch, Stream, safe_log_softmax
from kdkit.errors import KdkitError, PluginError
from kdkit.manager import KdkitPluginManager, Plugin, PluginRegistry, build_manager, check_ensembling_conflicts


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
        self._teacher_weights = hook.kdkit_teacher_weights
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
            from kdkit.manager import discover_plugins

            registry = discover_plugins()
        return cls(registry.instantiate(plugins or {}), temperature=temperature, on=on)

    def __repr__(self) -> str:
        names = ", ".join(p.name for p in self.plugins) or "average"
        return f"DistillationLoss(plugins=[{names}], temperature={self.temperature}, on={list(self.on)})"

    # ----------------------------------------------------------------- weights
    def weights(self, batch: KDBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher weights ``[B, N]``, kd weights ``[B]`` and sample weights ``[B]`` for ``batch`` (no gradient)."""
        size, n = batch.size, batch.num_teachers
        labeled = batch.labeled_mask
        count = int(labeled.sum())
        if count == size:
            parts: list[tuple[Stream, torch.Tensor | None]] = [("labeled", None)]
        elif count == 0:
            parts = [("unlabeled", None)]
        else:
            parts = [
                ("labeled", labeled.nonzero().squeeze(1)),
                ("unlabeled", (~labeled).nonzero().squeeze(1)),
            ]
        if len(parts) == 1:
            stream = parts[0][0]
            return self._stream_weights(batch.select(None, stream), stream, n)
        teacher_w = torch.empty(size, n, device=batch.device, dtype=torch.float32)
        kd_w = torch.empty(size, device=batch.device, dtype=torch.float32)
        sample_w = torch.empty(size, device=batch.device, dtype=torch.float32)
        for stream, index in parts:
            tw, kw, sw = self._stream_weights(batch.select(index, stream), stream, n)
            teacher_w[index], kd_w[index], sample_w[index] = tw, kw, sw
        return teacher_w, kd_w, sample_w

    def _stream_weights(
        self, view: KDBatch, stream: Stream, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if stream == "unlabeled" and "unlabeled" not in self.on:
            # These samples have neither a kd term nor a task loss: their loss is 0 whatever the weights, so the
            # plugins are not asked (and the neutral weights are reported).
            ones = torch.ones(view.size, device=view.device, dtype=torch.float32)
            return view.uniform_weights, ones, ones
        with torch.no_grad():
            tw = self._teacher_weights(batch=view)
            tw = view.uniform_weights if tw is None else _checked(tw, (view.size, n), "kdkit_teacher_weights", stream)
            kw = _product(self._kd_weights(batch=view), view, "kdkit_kd_weights", stream)
            sw = _product(self._sample_weights(batch=view), view, "kdkit_sample_weights", stream)
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


def _checked(answer: Any, shape: tuple[int, ...], hook: str, stream: str) -> torch.Tensor:
    if not isinstance(answer, torch.Tensor):
        raise PluginError(f"{hook} on the {stream} stream returned {type(answer).__name__}, expected a tensor")
    if tuple(answer.shape) != shape:
        raise PluginError(f"{hook} on the {stream} stream returned shape {tuple(answer.shape)}, expected {shape}")
    return answer.detach().float()


def _product(answers: list[Any], view: KDBatch, hook: str, stream: str) -> torch.Tensor:
    result: torch.Tensor | None = None
    for answer in answers:
        answer = _checked(answer, (view.size,), hook, stream)
        result = answer if result is None else result * answer
    if result is None:
        return torch.ones(view.size, device=view.device, dtype=torch.float32)
    return result


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

"""Helpers for testing kdkit plugins, for kdkit's own tests and for third-party plugin authors.

>>> from kdkit.testing import fake_batch, plugin_registry, run_hook
>>> registry = plugin_registry(MyPlugin)                       # only MyPlugin, no entry points
>>> batch = fake_batch(size=8, teachers=3, classes=2, labeled=4, seed=0)
>>> weights = run_hook(MyPlugin(), "kdkit_sample_weights", batch.select(None, "unlabeled"))
>>> loss_fn = make_token_loss({MyPlugin: {}}, temperature=2.0)  # the same plugin, token by token
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel

from kdkit.distill.loss import DistillationLoss
from kdkit.distill.tokens import TokenDistillationLoss
from kdkit.plugin.base import Plugin
from kdkit.plugin.batch import IGNORE_INDEX, KDBatch, Stream
from kdkit.plugin.registry import PluginRegistry, build_manager, discover_plugins


def plugin_registry(*plugin_classes: type[Plugin], load_entrypoints: bool = False) -> PluginRegistry:
    """A fresh registry holding ``plugin_classes`` (and, if asked, the installed entry points)."""
    return discover_plugins(extra=plugin_classes, load_entrypoints=load_entrypoints)


def fake_logits(
    *, size: int = 8, teachers: int = 3, classes: int = 2, labeled: int | None = None, seed: int = 0, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(student_logits [B,C], teacher_logits [B,N,C], labels [B])``; the first ``labeled`` samples
    carry labels (all of them by default), the rest are ``-100``."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(size, classes, generator=gen) * scale
    teacher = torch.randn(size, teachers, classes, generator=gen) * scale
    labels = torch.randint(0, classes, (size,), generator=gen)
    if labeled is not None:
        labels[labeled:] = IGNORE_INDEX
    return student, teacher, labels


def fake_batch(
    *,
    size: int = 8,
    teachers: int = 3,
    classes: int = 2,
    labeled: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    scale: float = 2.0,
) -> KDBatch:
    """A :class:`KDBatch` of random logits (see :func:`fake_logits`); use ``.select(None, stream)`` or
    :func:`stream_view` to get the per-stream view a hook receives."""
    student, teacher, labels = fake_logits(
        size=size, teachers=teachers, classes=classes, labeled=labeled, seed=seed, scale=scale
    )
    return KDBatch(student, teacher, labels, temperature)


def stream_view(batch: KDBatch, stream: Stream) -> KDBatch:
    """The samples of ``batch`` in ``stream``, as kdkit hands them to a hook (:meth:`KDBatch.stream_view`)."""
    return batch.stream_view(stream)


def run_hook(plugin: Plugin, hook: str, batch: KDBatch) -> Any:
    """Call one hook of one plugin instance through a real plugin manager (keywords only, as kdkit does).

    Returns that plugin's answer: a tensor, or ``None`` when it has no opinion (pluggy's list of answers of a
    multi-answer hook is unwrapped, so every hook reads the same way).
    """
    pm = build_manager([plugin])
    caller = getattr(pm.hook, hook)
    result = caller(batch=batch)
    if isinstance(result, list):  # kdkit_kd_weights / kdkit_sample_weights collect all answers, None dropped
        return result[0] if result else None
    return result


def make_loss(
    plugins: Mapping[type[Plugin], Mapping[str, Any] | BaseModel | None], **kwargs: Any
) -> DistillationLoss:
    """A :class:`DistillationLoss` over the given plugin classes and options, without entry points."""
    registry = plugin_registry(*plugins)
    return DistillationLoss.from_plugins({cls.name: opts for cls, opts in plugins.items()}, registry=registry, **kwargs)


def make_token_loss(
    plugins: Mapping[type[Plugin], Mapping[str, Any] | BaseModel | None], **kwargs: Any
) -> TokenDistillationLoss:
    """A :class:`TokenDistillationLoss` over the given plugin classes and options, without entry points."""
    registry = plugin_registry(*plugins)
    return TokenDistillationLoss.from_plugins(
        {cls.name: opts for cls, opts in plugins.items()}, registry=registry, **kwargs
    )

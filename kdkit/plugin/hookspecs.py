"""Hook specifications: the contract between kdkit's engine and every weighting plugin.

A kdkit plugin is a class (a subclass of :class:`kdkit.Plugin`) that declares

* ``name`` - the name a recipe uses to enable it (``[plugins.<name>]``),
* ``version`` - shown by ``kdkit plugins``,
* ``Options`` - a pydantic model (``extra="forbid"``) of its recipe options,
* ``ensembles`` - the streams (``"labeled"``, ``"unlabeled"``) on which it sets teacher weights, so that a
  recipe enabling two plugins that both claim one stream is rejected before anything runs (or
  ``ensembled_streams()`` to derive them from its options; a plugin setting teacher weights without declaring
  streams is refused when it loads, unless it is a ``trylast`` fallback),

and implements one or more of the hooks below as methods. It is registered under the ``kdkit`` entry-point
group (``[project.entry-points.kdkit] my-name = "my_pkg.module:MyPlugin"``). For a run, kdkit builds one
instance per enabled plugin, ``MyPlugin(options)``, and calls the hooks on those instances only: a disabled
plugin is never called.

How kdkit calls the hooks
-------------------------
Every hook receives exactly one keyword argument, ``batch``: a :class:`kdkit.KDBatch` holding the samples of
**one stream** of the current step: either only labeled samples (``batch.stream == "labeled"``) or only
unlabeled ones (``"unlabeled"``). A mixed batch of B samples therefore leads to two calls of each hook, one per
stream; kdkit scatters the answers back into the batch. ``batch`` carries the tensors (student logits,
teacher logits, labels, temperature) and lazily computed shared quantities (teacher probabilities, teacher
task losses, ...) that are computed once per step and shared by all plugins.

Every answer must be a tensor detached from the autograd graph (kdkit detaches it anyway), on the device of
``batch.teacher_logits``, with one row per sample of ``batch`` (``batch.size``). Return ``None`` to mean
"no opinion on this stream".

When several data-parallel processes train together, every process asks about every stream, in the same order,
with an empty view (``batch.size == 0``) where its share of the batch lacks the stream: a hook must accept an
empty view, and one that reduces a statistic over the batch must do it with
:meth:`kdkit.KDBatch.mean_over_ranks` on every view, empty or not.

For causal LMs (:class:`kdkit.TokenDistillationLoss`) a sample is one position of one sequence and the classes
are the slots of that position's support (the teachers' top-k tokens plus one tail bucket); the hooks and their
rules are the same.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import pluggy
import torch

from kdkit.errors import PluginError
from kdkit.plugin.batch import KDBatch

PROJECT = "kdkit"

_hookspec = pluggy.HookspecMarker(PROJECT)

#: Marks a plugin method as a hook implementation: ``@kdkit.hookimpl`` (or ``@kdkit.hookimpl(trylast=True)``).
hookimpl = pluggy.HookimplMarker(PROJECT)


@_hookspec(firstresult=True)
def kdkit_teacher_weights(batch: KDBatch) -> torch.Tensor | None:
    """Teacher ensembling: how much each teacher's soft prediction counts for each sample.

    :param batch: the samples of one stream (see the module docstring).
    :returns: a float tensor ``[batch.size, batch.num_teachers]``, non-negative, each row summing to 1, or
        ``None`` to leave the stream to the next plugin.

    Combination: kdkit asks only the plugins that claim the stream (``Plugin.ensembles`` /
    ``ensembled_streams()``) and fallbacks; the **first** non-``None`` answer wins (``firstresult``). When no
    plugin answers, kdkit uses the plain average ``1/N``. A fallback plugin is marked
    ``@hookimpl(trylast=True)`` so that the claimant answers first. Two enabled plugins may not both claim a
    stream: the recipe is rejected, because which of the two would win would otherwise depend on load order.

    Example::

        class Sharpest(kdkit.Plugin):
            name, version, ensembles = "sharpest", "1.0", ("unlabeled",)

            @kdkit.hookimpl
            def kdkit_teacher_weights(self, batch):
                if batch.stream != "unlabeled":
                    return None
                confidence = batch.teacher_probs.amax(dim=-1)           # [B, N]
                return confidence / confidence.sum(dim=-1, keepdim=True)
    """


@_hookspec
def kdkit_kd_weights(batch: KDBatch) -> torch.Tensor | None:
    """Loss weighting: the weight ``k_b`` of the distillation term of each sample.

    :param batch: the samples of one stream.
    :returns: a float tensor ``[batch.size]`` of finite, non-negative weights, or ``None`` (no opinion).

    Combination: the answers of all enabled plugins are **multiplied**; with no answer ``k = 1``.
    The per-sample loss is ``s_b * (k_b * kd_b + task_b)``.

    Example (UniKD Eq. 3: trust the teachers less where they are wrong)::

        @kdkit.hookimpl
        def kdkit_kd_weights(self, batch):
            if batch.stream != "labeled":
                return None
            return 1.0 / (1.0 + batch.teacher_task_losses.mean(dim=-1))
    """


@_hookspec
def kdkit_sample_weights(batch: KDBatch) -> torch.Tensor | None:
    """Sample weighting: the weight ``s_b`` of each sample's whole loss.

    :param batch: the samples of one stream.
    :returns: a float tensor ``[batch.size]`` of finite, non-negative weights, or ``None`` (no opinion).

    Combination: the answers of all enabled plugins are **multiplied**; with no answer ``s = 1``.

    Example (up-weight samples on which the teachers disagree)::

        @kdkit.hookimpl
        def kdkit_sample_weights(self, batch):
            if batch.stream != "unlabeled":
                return None
            spread = batch.teacher_probs.var(dim=1).sum(dim=-1)   # [B]: variance over teachers
            return 1.0 + 10.0 * spread
    """


#: Every hook of this module, in the order they are defined (found, not listed by hand).
HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, value in vars(sys.modules[__name__]).items() if name.startswith("kdkit_") and callable(value)
)


# --------------------------------------------------------------------------- how answers are combined
# The rules the docstrings above promise, in one place: DistillationLoss calls these on the hooks' answers.
def checked_answer(answer: Any, shape: Sequence[int], hook: str, stream: str) -> torch.Tensor:
    """One plugin's answer as a detached float32 tensor of ``shape``; :class:`PluginError` naming the hook
    and stream when it is not a tensor or has another shape."""
    if not isinstance(answer, torch.Tensor):
        raise PluginError(f"{hook} on the {stream} stream returned {type(answer).__name__}, expected a tensor")
    if tuple(answer.shape) != tuple(shape):
        raise PluginError(
            f"{hook} on the {stream} stream returned shape {tuple(answer.shape)}, expected {tuple(shape)}"
        )
    return answer.detach().float()


def combine_teacher_weights(answer: Any, view: KDBatch, stream: str) -> torch.Tensor:
    """``kdkit_teacher_weights``: the first answer (pluggy's ``firstresult``), else the plain average."""
    if answer is None:
        return view.uniform_weights
    return checked_answer(answer, (view.size, view.num_teachers), "kdkit_teacher_weights", stream)


def combine_product(answers: list[Any], view: KDBatch, hook: str, stream: str) -> torch.Tensor:
    """``kdkit_kd_weights`` / ``kdkit_sample_weights``: the product of every answer, 1 where none answers."""
    result: torch.Tensor | None = None
    for answer in answers:
        answer = checked_answer(answer, (view.size,), hook, stream)
        result = answer if result is None else result * answer
    if result is None:
        return torch.ones(view.size, device=view.device, dtype=torch.float32)
    return result

"""Hook specifications: the contract between kdkit's engine and every weighting plugin.

A kdkit plugin is a class (a subclass of :class:`kdkit.Plugin`) that declares

* ``name`` - the name a recipe uses to enable it (``[plugins.<name>]``),
* ``version`` - shown by ``kdkit plugins``,
* ``Options`` - a pydantic model (``extra="forbid"``) of its recipe options,
* ``ensembles`` - the streams (``"labeled"``, ``"unlabeled"``) on which it sets teacher weights, so that a
  recipe enabling two plugins that both claim one stream is rejected before anything runs,

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kdkit.batch import KDBatch

PROJECT = "kdkit"

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def kdkit_teacher_weights(batch: KDBatch) -> torch.Tensor | None:
    """Teacher ensembling: how much each teacher's soft prediction counts for each sample.

    :param batch: the samples of one stream (see the module docstring).
    :returns: a float tensor ``[batch.size, batch.num_teachers]``, non-negative, each row summing to 1, or
        ``None`` to leave the stream to the next plugin.

    Combination: the **first** non-``None`` answer wins (``firstresult``). When no plugin answers, kdkit uses
    the plain average ``1/N``. A fallback plugin should be marked ``@hookimpl(trylast=True)`` so that any
    other plugin answers first. Two enabled plugins may not both claim a stream (see ``Plugin.ensembles``):
    the recipe is rejected, because which of the two would win would otherwise depend on load order.

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


@hookspec
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


@hookspec
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


HOOK_NAMES: tuple[str, ...] = ("kdkit_teacher_weights", "kdkit_kd_weights", "kdkit_sample_weights")

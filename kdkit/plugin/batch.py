"""The batch view that every hook receives, with lazily computed quantities shared by all plugins."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from kdkit.plugin.collectives import sum_over_ranks

Stream = Literal["labeled", "unlabeled"]
STREAMS: tuple[Stream, ...] = ("labeled", "unlabeled")
IGNORE_INDEX = -100
#: In ``KDBatch.class_ids``: the slot stands for every class its row does not list (a token batch's tail bucket).
REST = -2

#: Log-probabilities are floored here so that a certain (one-hot) prediction gives finite terms:
#: ``0 * log 0`` would be NaN, and ``exp(-1e4)`` is 0 in every float format, so nothing real is lost.
LOG_FLOOR = -1.0e4


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is float64 (as :func:`safe_log_softmax` computes)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def safe_log_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log_softmax`` in float32 (or float64 if given), floored at :data:`LOG_FLOOR` (never ``-inf``).

    Infinite inputs (huge finite logits divided by a temperature below 1 overflow) are clamped to the largest
    finite value first: ``inf - inf`` inside ``log_softmax`` would otherwise turn the whole row into NaN.
    """
    logits = _as_float(logits)
    big = torch.finfo(logits.dtype).max
    return F.log_softmax(logits.clamp(-big, big), dim=dim).clamp_min(LOG_FLOOR)


class KDBatch:
    """One stream of one training step, as the hooks see it.

    Tensors (all detached from the autograd graph):

    * ``student_logits`` ``[B, C]``, ``teacher_logits`` ``[B, N, C]``, ``labels`` ``[B]`` (``-100`` = unlabeled),
    * ``temperature`` ``T`` (a float), ``stream``: ``"labeled"``, ``"unlabeled"`` (or ``None`` for a mixed batch,
      which only kdkit itself sees).

    Shared quantities, computed on first use and then cached for every plugin of the step:

    * ``teacher_log_probs`` / ``teacher_probs`` ``[B, N, C]``: ``log_softmax`` / ``softmax`` of ``z_t / T``,
    * ``student_log_probs`` / ``student_probs`` ``[B, C]``: the same for ``z_s / T``,
    * ``teacher_task_losses`` ``[B, N]``: ``CE(softmax(z_t[:, i]), y)`` at temperature 1 (labeled samples only),
    * ``uniform_weights`` ``[B, N]``: ``1/N`` everywhere.

    A statistic of the whole batch (over every data-parallel rank) is :meth:`mean_over_ranks`.

    A per-stream view (``select``) takes its shared quantities from the full batch by indexing, so nothing is
    computed twice in a step.

    Classes need not be the same from one sample to the next. In a token batch (:meth:`from_log_probs`, used by
    :class:`kdkit.TokenDistillationLoss`) a sample is one position of one sequence and its "classes" are the
    slots of that position's support: the tokens some teacher ranks in its top-k, plus one tail bucket for every
    other token. ``class_ids`` ``[B, C]`` then says which class each slot is: a vocabulary id in
    ``[0, num_class_ids)``, :data:`REST` for the tail (every class not listed in the row), ``-1`` for a padded slot
    (probability 0 for every model). It is ``None`` when slot ``c`` is class ``c`` for every sample
    (classification). A plugin that adds up per-class quantities over samples uses :meth:`mean_over_ranks` with
    ``by_class=True``, which aligns them.
    """

    def __init__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
        stream: Stream | None = None,
        *,
        class_ids: torch.Tensor | None = None,
        num_class_ids: int | None = None,
    ) -> None:
        self.student_logits = student_logits.detach()
        self.teacher_logits = teacher_logits.detach()
        self.labels = labels
        self.temperature = float(temperature)
        self.stream = stream
        self.class_ids = class_ids
        self.num_class_ids = int(num_class_ids) if num_class_ids is not None else int(teacher_logits.shape[-1])
        self._parent: KDBatch | None = None
        self._index: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_log_probs(
        cls,
        student_log_probs: torch.Tensor,
        teacher_log_probs: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        *,
        teacher_task_losses: torch.Tensor | None = None,
        class_ids: torch.Tensor | None = None,
        num_class_ids: int | None = None,
    ) -> KDBatch:
        """A batch built from distributions that are already computed, e.g. on each position's support.

        :param student_log_probs: ``[B, C]`` log-probabilities at ``temperature`` (each row sums to 1 in
            probability; a padded slot holds ``-inf`` or :data:`LOG_FLOOR`, probability 0).
        :param teacher_log_probs: ``[B, N, C]`` the same for each teacher.
        :param labels: ``[B]`` the class (slot) of the gold token, ``-100`` where there is none.
        :param teacher_task_losses: ``[B, N]`` each teacher's exact task loss ``-log p_i(gold)`` at temperature
            1 (rows of unlabeled samples are ignored); without it, it is computed from the distributions.
        :param class_ids: ``[B, C]`` which class each slot is (see the class docstring), of ``num_class_ids``.

        ``teacher_logits`` is set to ``T * teacher_log_probs`` (and ``student_logits`` likewise), so that a plugin
        written for classification, which computes ``softmax(z / T)`` itself, sees exactly these distributions.
        The shared quantities are these tensors themselves, not recomputed.
        """
        t = float(temperature)
        student_lp = _as_float(student_log_probs.detach()).clamp_min(LOG_FLOOR)
        teacher_lp = _as_float(teacher_log_probs.detach()).clamp_min(LOG_FLOOR)
        batch = cls(t * student_lp, t * teacher_lp, labels, t, class_ids=class_ids, num_class_ids=num_class_ids)
        batch._cache.update(
            student_log_probs=student_lp,
            teacher_log_probs=teacher_lp,
            student_probs=student_lp.exp(),
            teacher_probs=teacher_lp.exp(),
        )
        if teacher_task_losses is not None:
            labeled = (labels != IGNORE_INDEX).unsqueeze(-1)
            losses = _as_float(teacher_task_losses.detach())
            batch._cache["teacher_task_losses"] = torch.where(labeled, losses, torch.zeros_like(losses))
        return batch

    # ----------------------------------------------------------------- shape
    @property
    def size(self) -> int:
        return self.teacher_logits.shape[0]

    @property
    def num_teachers(self) -> int:
        return self.teacher_logits.shape[1]

    @property
    def num_classes(self) -> int:
        return self.teacher_logits.shape[2]

    @property
    def device(self) -> torch.device:
        return self.teacher_logits.device

    @property
    def labeled_mask(self) -> torch.Tensor:
        """``[B]`` bool: which samples carry a label."""
        return self.labels != IGNORE_INDEX

    # ----------------------------------------------------------------- views
    def select(self, index: torch.Tensor | None, stream: Stream) -> KDBatch:
        """A view on the samples ``index`` (all samples when ``None``) that all belong to ``stream``."""
        if index is None:
            view = KDBatch(
                self.student_logits, self.teacher_logits, self.labels, self.temperature, stream,
                class_ids=self.class_ids, num_class_ids=self.num_class_ids,
            )
            view._cache = self._cache  # same samples: share the cache itself
            return view
        view = KDBatch(
            self.student_logits.index_select(0, index),
            self.teacher_logits.index_select(0, index),
            self.labels.index_select(0, index),
            self.temperature,
            stream,
            class_ids=None if self.class_ids is None else self.class_ids.index_select(0, index),
            num_class_ids=self.num_class_ids,
        )
        view._parent, view._index = self, index
        return view

    def stream_index(self, stream: Stream) -> torch.Tensor:
        """``[b]`` long: the positions of this batch's samples that belong to ``stream``."""
        mask = self.labeled_mask if stream == "labeled" else ~self.labeled_mask
        return mask.nonzero().squeeze(1)

    def stream_view(self, stream: Stream) -> KDBatch:
        """The samples of ``stream`` (possibly none), as a hook receives them."""
        return self.select(self.stream_index(stream), stream)

    def stream_parts(self, every_stream: bool = False) -> list[tuple[Stream, torch.Tensor | None]]:
        """The streams present in this batch, each with the positions of its samples (``None``: every sample,
        when one stream holds the whole batch).

        :param every_stream: list every stream of :data:`STREAMS`, in that order, even one without samples here
            (an empty index). Under DDP each rank must ask the plugins about the same streams in the same order,
            whatever its local batch holds, or a plugin's reduction over ranks would wait forever.
        """
        count = int(self.labeled_mask.sum())
        if every_stream:
            whole = {"labeled": count == self.size, "unlabeled": count == 0}
            return [(s, None if whole[s] and self.size else self.stream_index(s)) for s in STREAMS]
        if count == self.size:
            return [("labeled", None)]
        if count == 0:
            return [("unlabeled", None)]
        return [(stream, self.stream_index(stream)) for stream in STREAMS]

    # ----------------------------------------------------------------- batch statistics
    def mean_over_ranks(self, values: torch.Tensor, *, by_class: bool = False) -> torch.Tensor:
        """The mean over the samples of this view on **every data-parallel rank** of a per-sample ``values``.

        :param values: ``[size, ...]``, one row per sample of this view (possibly 0 rows).
        :param by_class: the last axis of ``values`` holds this batch's classes (``[size, ..., num_classes]``).
            Where classes differ from sample to sample (``class_ids``, a token batch), each slot is added to the
            class it stands for, so the result is ``[..., num_class_ids]``; otherwise ``[..., num_classes]``.
        :returns: ``sum of values over every rank's samples / number of those samples`` (0 when there are
            none), in the dtype of ``values``. With one process (no process group, or world size 1) this is
            the plain mean over this view's samples.

        Under DDP (a started ``torch.distributed`` process group with world size > 1) sums and counts are added
        up over ranks with ``all_reduce``, so that K processes at global batch B compute the statistic of one
        process at batch B. This is a collective: every rank calls it, with values of the same trailing shape,
        the same number of times per step. kdkit asks the plugins about every stream on every rank for that
        reason (an empty view where a rank lacks the stream); a plugin must therefore call it even on an empty
        view, and not only on some ranks.

        The statistic is per micro-batch: with gradient accumulation each micro-batch is reduced on its own.
        """
        if values.shape[0] != self.size:
            raise ValueError(f"mean_over_ranks: values have {values.shape[0]} rows, the batch {self.size} samples")
        if by_class and self.class_ids is not None:
            total = self._class_sums(values)
        else:
            total = values.sum(dim=0)
        count = torch.tensor([float(self.size)], dtype=total.dtype, device=total.device)
        reduced = sum_over_ranks(torch.cat([total.reshape(-1), count]))
        return (reduced[:-1] / reduced[-1].clamp_min(1.0)).reshape(total.shape)

    def _class_sums(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[b, ..., C]`` summed over samples into ``[..., num_class_ids]`` by ``class_ids``.

        A :data:`REST` slot (a token batch's tail) is spread evenly over the classes its row does not list, as the
        support's own model spreads a teacher's missing mass: a constant share added everywhere, taken back at
        the row's listed classes. Lumping every row's tail into one shared coordinate instead would add up the
        tails of different positions as if they were one token (measured in docs/METHOD.md: it moves AE-KD's
        weights far from the full-vocabulary ones).
        """
        assert self.class_ids is not None
        b, c = values.shape[0], values.shape[-1]
        middle = values.shape[1:-1]
        flat = values.movedim(0, -2).reshape(math.prod(middle), b, c)  # [M, b, C]
        ids = self.class_ids
        listed = ids >= 0
        rest = ids == REST
        outside = (self.num_class_ids - listed.sum(dim=1)).to(values.dtype)  # classes each row leaves to REST
        share = (flat * rest).sum(dim=-1) / outside.clamp_min(1) * (outside > 0)  # [M, b] per class outside
        total = share.sum(dim=1, keepdim=True).expand(-1, self.num_class_ids).clone()
        listed_values = flat - share.unsqueeze(-1)  # a listed class gets its slot, not the row's REST share
        total.index_add_(1, ids[listed], listed_values[:, listed])
        return total.reshape(*middle, self.num_class_ids)

    def _shared(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = self._cache.get(key)
        if cached is None:
            if self._parent is not None:
                assert self._index is not None
                cached = getattr(self._parent, key).index_select(0, self._index)
            else:
                cached = compute()
            self._cache[key] = cached
        return cached

    # ----------------------------------------------------------------- shared quantities
    @property
    def teacher_log_probs(self) -> torch.Tensor:
        return self._shared("teacher_log_probs", lambda: safe_log_softmax(self.teacher_logits / self.temperature))

    @property
    def teacher_probs(self) -> torch.Tensor:
        return self._shared("teacher_probs", lambda: self.teacher_log_probs.exp())

    @property
    def student_log_probs(self) -> torch.Tensor:
        return self._shared("student_log_probs", lambda: safe_log_softmax(self.student_logits / self.temperature))

    @property
    def student_probs(self) -> torch.Tensor:
        return self._shared("student_probs", lambda: self.student_log_probs.exp())

    @property
    def teacher_task_losses(self) -> torch.Tensor:
        """``[B, N]``: each teacher's cross-entropy with the gold label at temperature 1.

        Only defined for labeled samples: on the unlabeled stream this raises ``ValueError``. In a mixed batch
        (``stream is None``) the rows of unlabeled samples are 0.
        """
        if self.stream == "unlabeled":
            raise ValueError("teacher_task_losses needs labels, but this batch holds the unlabeled stream")
        return self._shared("teacher_task_losses", self._compute_teacher_task_losses)

    def _compute_teacher_task_losses(self) -> torch.Tensor:
        labeled = self.labeled_mask
        gold = self.labels.clamp_min(0).view(-1, 1, 1).expand(-1, self.num_teachers, 1)
        log_p1 = (
            self.teacher_log_probs if self.temperature == 1.0 else safe_log_softmax(self.teacher_logits)
        )
        losses = -log_p1.gather(-1, gold).squeeze(-1)
        return losses * labeled.unsqueeze(-1).to(losses.dtype)

    @property
    def uniform_weights(self) -> torch.Tensor:
        return self._shared(
            "uniform_weights",
            lambda: torch.full(
                (self.size, self.num_teachers), 1.0 / self.num_teachers, device=self.device, dtype=torch.float32
            ),
        )

    def __repr__(self) -> str:
        return (
            f"KDBatch(size={self.size}, teachers={self.num_teachers}, classes={self.num_classes}, "
            f"stream={self.stream!r}, T={self.temperature})"
        )

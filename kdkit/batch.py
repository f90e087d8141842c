"""The batch view that every hook receives, with lazily computed quantities shared by all plugins."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

Stream = Literal["labeled", "unlabeled"]
STREAMS: tuple[Stream, ...] = ("labeled", "unlabeled")
IGNORE_INDEX = -100

#: Log-probabilities are floored here so that a certain (one-hot) prediction gives finite terms:
#: ``0 * log 0`` would be NaN, and ``exp(-1e4)`` is 0 in every float format, so nothing real is lost.
LOG_FLOOR = -1.0e4


def safe_log_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log_softmax`` in float32 (or float64 if given), floored at :data:`LOG_FLOOR` (never ``-inf``).

    Infinite inputs (huge finite logits divided by a temperature below 1 overflow) are clamped to the largest
    finite value first: ``inf - inf`` inside ``log_softmax`` would otherwise turn the whole row into NaN.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
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

    A per-stream view (``select``) takes its shared quantities from the full batch by indexing, so nothing is
    computed twice in a step.
    """

    def __init__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float = 1.0,
        stream: Stream | None = None,
    ) -> None:
        self.student_logits = student_logits.detach()
        self.teacher_logits = teacher_logits.detach()
        self.labels = labels
        self.temperature = float(temperature)
        self.stream = stream
        self._parent: KDBatch | None = None
        self._index: torch.Tensor | None = None
        self._cache: dict[str, torch.Tensor] = {}

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
            view = KDBatch(self.student_logits, self.teacher_logits, self.labels, self.temperature, stream)
            view._cache = self._cache  # same samples: share the cache itself
            return view
        view = KDBatch(
            self.student_logits.index_select(0, index),
            self.teacher_logits.index_select(0, index),
            self.labels.index_select(0, index),
            self.temperature,
            stream,
        )
        view._parent, view._index = self, index
        return view

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

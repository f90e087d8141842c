"""UniKD (Wu, Wu, Qi, Huang, 2022, "Unified and Effective Ensemble Knowledge Distillation"): two plugins.

* ``unikd-correctness`` (labeled samples): teacher weights from each teacher's task loss on the sample (Eq. 1)
  and a kd weight ``k = 1 / (1 + mean_i L_i)`` (Eq. 3).
* ``unikd-disagreement`` (unlabeled samples): a sample weight ``s = 1 + lambda * L_p`` where ``L_p`` is the mean
  pairwise KL divergence between the teachers' soft predictions (Eq. 4 and Eq. 5).

Both use only quantities that kdkit computes once per step (``batch.teacher_task_losses``,
``batch.teacher_probs``), so they never need the teacher models at training time.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator

import kdkit

TeacherWeighting = Literal["inverse-loss", "softmax-neg-loss", "as-printed"]


class CorrectnessOptions(kdkit.Options):
    """Options of ``unikd-correctness``."""

    teacher_weighting: TeacherWeighting = Field(
        "inverse-loss",
        description=(
            "How a teacher's task loss L_i on a labeled sample becomes its weight. 'inverse-loss': "
            "(1/(L_i+eps)) / sum_j 1/(L_j+eps); 'softmax-neg-loss': softmax(-L)_i, each teacher's probability of "
            "the gold label, normalised; 'as-printed': (L_i+eps) / sum_j (L_j+eps), the paper's Eq. 1 as printed, "
            "which favours the worse teacher (kept for ablation)."
        ),
    )
    eps: float = Field(
        1e-6,
        gt=0,
        allow_inf_nan=False,
        description="Added to each teacher loss so that a teacher with zero loss gives a finite weight.",
    )
    ensembling: bool = Field(
        True,
        description="Set the teacher weights of labeled samples from the losses (Eq. 1). false leaves them to "
        "the average (ablation).",
    )
    loss_weighting: bool = Field(
        True,
        description="Weight the kd term of labeled samples by k = 1 / (1 + mean_i L_i) (Eq. 3). false keeps k = 1 "
        "(ablation).",
    )

    @field_validator("loss_weighting")
    @classmethod
    def _does_something(cls, loss_weighting: bool, info: ValidationInfo) -> bool:
        if not loss_weighting and info.data.get("ensembling") is False:
            raise ValueError("ensembling and loss_weighting are both false: disable the plugin instead")
        return loss_weighting


class CorrectnessPlugin(kdkit.Plugin):
    """Correctness-aware teacher ensembling and loss weighting on labeled samples (UniKD Eq. 1 and Eq. 3).

    With ``L_i`` the cross-entropy of teacher ``i`` with the gold label (temperature 1):

    * teacher weights (``teacher_weighting``):

      - ``"inverse-loss"`` (default): ``w_i = (1/(L_i+eps)) / sum_j 1/(L_j+eps)``,
      - ``"softmax-neg-loss"``: ``w_i = softmax(-L)_i = p_i(y) / sum_j p_j(y)``,
      - ``"as-printed"``: ``w_i = (L_i+eps) / sum_j (L_j+eps)``.

      **Eq. 1 contradicts its own text.** The paper prints ``w_i = L_i / sum_j L_j``, which gives the larger
      weight to the teacher with the larger loss, while the sentence around it says that "a higher loss on a
      specific sample yields lower importance". kdkit follows the text by default (``"inverse-loss"``, and
      ``"softmax-neg-loss"`` as a smoother variant) and keeps the printed formula as ``"as-printed"`` so that
      the difference can be measured.

    * kd weight (Eq. 3): ``k = 1 / (1 + mean_i L_i)``: where the teachers are wrong the student relies more on
      the label.

    Unlabeled samples have no loss: the plugin does not answer for them (the average applies there).
    """

    name = "unikd-correctness"
    version = kdkit.__version__
    Options = CorrectnessOptions
    ensembles = ("labeled",)

    options: CorrectnessOptions

    def ensembled_streams(self) -> tuple[str, ...]:
        return self.ensembles if self.options.ensembling else ()

    @kdkit.hookimpl
    def kdkit_teacher_weights(self, batch: kdkit.KDBatch) -> torch.Tensor | None:
        if batch.stream != "labeled" or not self.options.ensembling:
            return None
        return correctness_teacher_weights(batch.teacher_task_losses, self.options.teacher_weighting, self.options.eps)

    @kdkit.hookimpl
    def kdkit_kd_weights(self, batch: kdkit.KDBatch) -> torch.Tensor | None:
        if batch.stream != "labeled" or not self.options.loss_weighting:
            return None
        return 1.0 / (1.0 + batch.teacher_task_losses.mean(dim=-1))


def correctness_teacher_weights(losses: torch.Tensor, weighting: TeacherWeighting, eps: float) -> torch.Tensor:
    """Teacher weights ``[B, N]`` (rows sum to 1) from task losses ``[B, N]`` (see :class:`CorrectnessPlugin`)."""
    if weighting == "inverse-loss":
        # 1/(L+eps) normalised is softmax(-log(L+eps)): no overflow when a loss is 0, no 0/0 when all are huge.
        return torch.softmax(-torch.log(losses + eps), dim=-1)
    if weighting == "softmax-neg-loss":
        return torch.softmax(-losses, dim=-1)
    if weighting == "as-printed":
        shifted = losses + eps
        return shifted / shifted.sum(dim=-1, keepdim=True)
    raise kdkit.PluginError(f"unikd-correctness: unknown teacher_weighting {weighting!r}")


class DisagreementOptions(kdkit.Options):
    """Options of ``unikd-disagreement``."""

    # "lambda" is a Python keyword: the field is `lam`, the recipe key its alias (kdkit.Options forbids extras)
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    lam: float = Field(
        10.0,
        alias="lambda",
        ge=0,
        allow_inf_nan=False,
        description="lambda of Eq. 5, s = 1 + lambda * L_p: how strongly teacher disagreement up-weights a sample "
        "(the paper uses 10 or 15).",
    )
    apply_to: Literal["unlabeled", "all"] = Field(
        "unlabeled",
        description="Which samples get the disagreement weight: 'unlabeled' (the paper) or 'all' (labeled too).",
    )


class DisagreementPlugin(kdkit.Plugin):
    """Disagreement-based sample weighting (UniKD Eq. 4 and Eq. 5).

    ``L_p = 1/(N(N-1)) * sum_{i != j} KL(P_i || P_j)`` with ``P_i`` the teachers' soft predictions at the
    distillation temperature, and ``s = 1 + lambda * L_p``: samples on which the teachers disagree carry more
    information about the decision boundary and weigh more. It answers on the unlabeled stream, and on the
    labeled one too with ``apply_to = "all"``. One teacher cannot disagree with itself: ``N = 1`` is an error.

    The pairwise sum is computed in ``O(N C)`` per sample from
    ``sum_{i,j} KL(P_i||P_j) = N sum_i <P_i, log P_i> - <sum_i P_i, sum_j log P_j>`` (the ``i = j`` terms are 0).
    """

    name = "unikd-disagreement"
    version = kdkit.__version__
    Options = DisagreementOptions

    options: DisagreementOptions

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batch: kdkit.KDBatch) -> torch.Tensor | None:
        n = batch.num_teachers
        if n < 2:
            raise kdkit.PluginError(
                f"unikd-disagreement needs at least 2 teachers (L_p averages the KL divergence over teacher "
                f"pairs), but the batch has N = {n}; disable the plugin or add teachers"
            )
        if batch.stream != "unlabeled" and self.options.apply_to != "all":
            return None
        disagreement = pairwise_disagreement(batch.teacher_probs, batch.teacher_log_probs)
        return (1.0 + self.options.lam * disagreement).to(torch.float32)


def pairwise_disagreement(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``L_p`` ``[B]``: the mean of ``KL(P_i || P_j)`` over ordered teacher pairs ``i != j``.

    :param probs: ``[B, N, C]`` teacher probabilities; ``log_probs`` their logarithms (finite).
    """
    n = probs.shape[1]
    p = probs.double()
    log_p = log_probs.double()
    self_term = (p * log_p).sum(dim=(1, 2))  # sum_i <P_i, log P_i>
    cross_term = (p.sum(dim=1) * log_p.sum(dim=1)).sum(dim=-1)  # <sum_i P_i, sum_j log P_j>
    total = (n * self_term - cross_term).clamp_min(0.0)  # >= 0 in exact arithmetic; rounding may dip below
    return total / (n * (n - 1))

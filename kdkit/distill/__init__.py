"""The distillation objectives: ``DistillationLoss`` (one sample = one input, classification) and
``TokenDistillationLoss`` (one sample = one position of a sequence, causal LMs) turn student outputs, teacher
outputs, labels and the plugins' weights into one loss. They know nothing of models, data or tasks."""

from kdkit.distill.loss import DistillationLoss, DistillationOutput, check_plugins_accept
from kdkit.distill.tokens import TokenDistillationLoss, TokenDistillationOutput, TopKTeachers

__all__ = [
    "DistillationLoss",
    "DistillationOutput",
    "TokenDistillationLoss",
    "TokenDistillationOutput",
    "TopKTeachers",
    "check_plugins_accept",
]

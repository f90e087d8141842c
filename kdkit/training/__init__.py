"""Training: the trainer and its objectives, the dataset and collator, ``TrainingArguments`` from a recipe,
checkpoints, and one ``fit`` used by teachers and students alike."""

from kdkit.training.arguments import NON_RESULT_FIELDS, optimizer_steps, training_arguments
from kdkit.training.checkpoints import checkpoint_to_resume, newest_complete_checkpoint, remove_broken_checkpoints
from kdkit.training.data import EncodedDataset, KDCollator
from kdkit.training.distillation_trainer import DistillationTrainer, TeacherLogitsCollator
from kdkit.training.loop import FitResult, fit
from kdkit.training.objectives import LabelObjective, LogitDistillation, Objective, ObjectiveOutput
from kdkit.training.trainer import KDTrainer, make_trainer

__all__ = [
    "NON_RESULT_FIELDS",
    "DistillationTrainer",
    "EncodedDataset",
    "FitResult",
    "KDCollator",
    "KDTrainer",
    "LabelObjective",
    "LogitDistillation",
    "Objective",
    "ObjectiveOutput",
    "TeacherLogitsCollator",
    "checkpoint_to_resume",
    "fit",
    "make_trainer",
    "newest_complete_checkpoint",
    "optimizer_steps",
    "remove_broken_checkpoints",
    "training_arguments",
]

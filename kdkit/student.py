"""Compatibility alias of kdkit 0.1's module layout: the trainer lives in :mod:`kdkit.training`, the student
stage in :mod:`kdkit.stages.students`."""

from kdkit.stages.students import StudentRun, student_config_hash, train_student
from kdkit.training import EncodedDataset, KDCollator, KDTrainer, make_trainer, optimizer_steps, training_arguments

__all__ = [
    "EncodedDataset",
    "KDCollator",
    "KDTrainer",
    "StudentRun",
    "make_trainer",
    "optimizer_steps",
    "student_config_hash",
    "train_student",
    "training_arguments",
]

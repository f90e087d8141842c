"""The plain average of the teachers (the KD-Labeled / KD-Unlabeled baselines): ``w_i = 1/N``."""

from __future__ import annotations

import torch

import kdkit


class AveragePlugin(kdkit.Plugin):
    """Every teacher counts the same. It answers last, so any other ensembling plugin takes precedence."""

    name = "average"
    version = kdkit.__version__
    # As the fallback it claims no stream: enabling it beside another ensembling plugin is not a conflict.
    ensembles = ()

    @kdkit.hookimpl(trylast=True)
    def kdkit_teacher_weights(self, batch: kdkit.KDBatch) -> torch.Tensor:
        return batch.uniform_weights

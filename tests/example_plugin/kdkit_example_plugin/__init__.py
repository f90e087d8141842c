"""Sample weighting by the confidence of the teacher ensemble.

With ``P_i = softmax(z_t[:, i] / T)`` and the plain average ``P = mean_i P_i``, each sample gets

    s_b = (max_c P[b, c]) ** power

so a sample on which the averaged teachers hesitate (their pseudo-label is close to a coin flip) counts less.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import kdkit

__version__ = "0.1.0"


class ConfidenceOptions(kdkit.Options):
    """The recipe table ``[plugins.confidence-weighting]`` (kdkit.Options forbids unknown keys)."""

    power: float = Field(1.0, ge=0, description="exponent of the confidence; 0 gives every sample weight 1")
    apply_to: Literal["unlabeled", "all"] = Field(
        "unlabeled", description="weight only unlabeled samples, or labeled ones too"
    )


class ConfidenceWeighting(kdkit.Plugin):
    """Weight each sample by the teacher ensemble's confidence, (max_c mean_i P_i[c]) ** power."""

    name = "confidence-weighting"
    version = __version__
    Options = ConfidenceOptions

    @kdkit.hookimpl
    def kdkit_sample_weights(self, batch: kdkit.KDBatch) -> torch.Tensor | None:
        if self.options.apply_to == "unlabeled" and batch.stream != "unlabeled":
            return None  # no opinion: labeled samples keep the weight the other plugins give them
        confidence = batch.teacher_probs.mean(dim=1).amax(dim=-1)  # [B]: top class of the averaged teachers
        return confidence.pow(self.options.power)

"""Compatibility alias: mean pooling lives in :mod:`kdkit.modeling.pooling` (``kdkit.pooling.use_mean_pooling``
is shown in the docs for loading a finished student outside kdkit, and keeps working)."""

from kdkit.modeling.pooling import POOLING_KEY, MaskedMeanPooler, use_mean_pooling

__all__ = ["POOLING_KEY", "MaskedMeanPooler", "use_mean_pooling"]

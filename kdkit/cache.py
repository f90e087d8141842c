"""Compatibility alias of kdkit 0.1's module layout: prediction lives in :mod:`kdkit.modeling.predict`, the
logit files in :mod:`kdkit.store.logits`, the logit cache in :mod:`kdkit.tasks.logit_cache`."""

from kdkit.modeling.predict import CPU_MAX_TOKENS, default_max_tokens, length_buckets, predict_logits
from kdkit.store.logits import CacheWarning, read_logits, write_logits
from kdkit.tasks.logit_cache import LogitCache

__all__ = [
    "CPU_MAX_TOKENS",
    "CacheWarning",
    "LogitCache",
    "default_max_tokens",
    "length_buckets",
    "predict_logits",
    "read_logits",
    "write_logits",
]

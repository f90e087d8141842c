"""Compatibility alias of kdkit 0.1's module layout: model loading lives in :mod:`kdkit.modeling`."""

from kdkit.modeling import (
    check_weights,
    encode,
    load_classifier,
    load_tokenizer,
    resolve_model_ref,
    tokenizer_fingerprint,
)

__all__ = ["check_weights", "encode", "load_classifier", "load_tokenizer", "resolve_model_ref", "tokenizer_fingerprint"]

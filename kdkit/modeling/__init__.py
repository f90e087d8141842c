"""Models: resolving references (hub id, local directory, a directory inside a package), loading tokenizers and
classifiers, mean pooling, tokenization, prediction without padding waste, and building top-k teacher stores of
causal LMs."""

from kdkit.modeling.loading import check_labels, load_classifier, load_config, load_tokenizer, quiet_transformers
from kdkit.modeling.pooling import POOLING_KEY, MaskedMeanPooler, use_mean_pooling
from kdkit.modeling.predict import CPU_MAX_TOKENS, default_max_tokens, length_buckets, predict_logits
from kdkit.modeling.refs import check_weights, describe, is_local, model_identity, resolve_model_ref
from kdkit.modeling.tokenize import encode, tokenizer_fingerprint
from kdkit.modeling.topk import TopKBuild, build_topk_store

__all__ = [
    "CPU_MAX_TOKENS",
    "POOLING_KEY",
    "MaskedMeanPooler",
    "TopKBuild",
    "build_topk_store",
    "check_labels",
    "check_weights",
    "default_max_tokens",
    "describe",
    "encode",
    "is_local",
    "length_buckets",
    "load_classifier",
    "load_config",
    "load_tokenizer",
    "model_identity",
    "predict_logits",
    "quiet_transformers",
    "resolve_model_ref",
    "tokenizer_fingerprint",
    "use_mean_pooling",
]

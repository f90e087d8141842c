"""Causal LMs: loading one (a checkpoint, a fresh model from a config, a checkpoint cut to chosen layers), and
scoring token sequences with it (each target token's log-probability and whether it was the model's first choice).

**Cutting layers** (``keep_layers = [0, 3, 6]``, the prune-then-distill recipe): the kept decoder layers are put in
a new list in the given order, and each one's attention module gets its new index (``layer_idx``): the KV cache
is a list indexed by it, so a cut model that kept the old indices would read and write other layers' cache
entries during generation (or fail). The config's ``num_hidden_layers`` (and ``layer_types`` where a model has
one) follow, so the cut model saves and loads as an ordinary checkpoint of that many layers.

**Scoring** (:func:`score_sequences`): sequences batched by equal length (no padding), in inference mode (bf16
autocast on a GPU); per target position the log-probability of the gold token at temperature 1 and whether it is
the arg-max. On a CPU a batch holds at most :data:`LOGIT_BYTES` of float32 logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdkit.data.tokens import TokenSequences
from kdkit.errors import ModelError, NonFiniteLogitsError, did_you_mean
from kdkit.modeling.loading import _wrap_os_error, load_config, quiet_transformers
from kdkit.modeling.predict import CPU_MAX_TOKENS, length_buckets
from kdkit.modeling.refs import check_weights
from kdkit.runtime import inference_autocast

#: float32 logits of one scoring batch on a CPU: 64 MiB (341 tokens of a 49,152-token vocabulary, 4,096 tokens of
#: a 4,096-token one), so that a large vocabulary does not multiply the batch's memory by V.
LOGIT_BYTES = 1 << 26

#: Config keys that other keys derive from: when a config table changes one of these and not ``head_dim``, the
#: checkpoint's ``head_dim`` (hidden_size / heads) would be stale, so it is recomputed.
_HEAD_DIM_SOURCES = ("hidden_size", "num_attention_heads")


def decoder_layers(model: Any, who: str) -> torch.nn.ModuleList:
    """The list of decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama, Qwen, Mistral)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"{who}: {type(model).__name__} has no list of decoder layers (model.layers) to cut")
    return layers


def keep_only_layers(model: Any, keep: Sequence[int], who: str) -> None:
    """Keep the decoder layers ``keep`` (ascending, 0-based) of ``model``, renumbering their attention modules."""
    layers = decoder_layers(model, who)
    if any(i >= len(layers) for i in keep):
        raise ModelError(f"{who}: keep_layers = {list(keep)} but the model has layers 0..{len(layers) - 1} only")
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    inner.layers = kept
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


def _fresh_config(resolved: str, changes: Mapping[str, Any], who: str, trust_remote_code: bool) -> Any:
    config = load_config(resolved, who=who, trust_remote_code=trust_remote_code)
    values = config.to_dict()
    for key in changes:
        if key not in values and not hasattr(config, key):
            raise ModelError(
                f"{who}: config key '{key}' is not a field of {type(config).__name__}"
                f"{did_you_mean(key, list(values))}"
            )
    if any(k in changes for k in _HEAD_DIM_SOURCES) and "head_dim" not in changes:
        values.pop("head_dim", None)
    values.update(changes)
    return type(config).from_dict(values)


def load_causal_lm(
    resolved: str,
    *,
    who: str,
    num_layers: int | None = None,
    keep_layers: Sequence[int] | None = None,
    config: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM from ``resolved``: its checkpoint, or (``config``) a fresh model from its config.json with these
    keys changed, initialised by torch's current random state (seed it first); then cut to its first
    ``num_layers`` or to ``keep_layers``."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_transformers():
            if config:
                fresh = _fresh_config(resolved, config, who, trust_remote_code)
                model = AutoModelForCausalLM.from_config(fresh, trust_remote_code=trust_remote_code)
            else:
                check_weights(resolved, who)
                model = AutoModelForCausalLM.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _wrap_os_error(exc, resolved, who) from None
    if num_layers is not None:
        available = len(decoder_layers(model, who))
        if num_layers > available:
            raise ModelError(f"{who}: num_layers = {num_layers} but the model has only {available} layers")
        keep_layers = list(range(num_layers))
    if keep_layers is not None:
        keep_only_layers(model, keep_layers, who)
    return model


def batch_token_budget(device: torch.device, vocab_size: int) -> int | None:
    """Tokens per forward batch whose float32 logits fit :data:`LOGIT_BYTES` on a CPU (no cap on an accelerator)."""
    if device.type != "cpu":
        return None
    return max(1, min(CPU_MAX_TOKENS, LOGIT_BYTES // (4 * vocab_size)))


def score_sequences(
    model: Any, sequences: TokenSequences, *, batch_size: int = 16, device: torch.device | None = None,
    who: str = "model",
) -> torch.Tensor:
    """``[P, 2]`` float64: for every target position of every sequence (sequence order, then position order), the
    log-probability of the gold token at temperature 1 and 1.0 where it is the model's most probable token.

    :raises NonFiniteLogitsError: naming ``who`` and the sequence's row.
    """
    device = device or next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    lengths = [len(ids) for ids in sequences.ids]
    per_sequence: list[torch.Tensor] = [torch.zeros(0, 2, dtype=torch.float64)] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), inference_autocast(device):
            for batch in length_buckets(lengths, batch_size, batch_token_budget(device, vocab), same_length=True):
                if lengths[batch[0]] < 2:
                    continue
                tokens = torch.from_numpy(np.stack([sequences.ids[i] for i in batch]).astype(np.int64)).to(device)
                logits = model(input_ids=tokens, use_cache=False).logits[:, :-1].float()
                log_probs = torch.log_softmax(logits, dim=-1)
                gold = tokens[:, 1:]
                gold_lp = log_probs.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
                hit = (logits.argmax(dim=-1) == gold).double()
                for j, i in enumerate(batch):
                    if not bool(torch.isfinite(log_probs[j]).all()):
                        raise NonFiniteLogitsError(f"{who}: non-finite logits for the sequence of row {sequences.rows[i]}")
                    keep = torch.from_numpy(sequences.targets[i][1:]).to(device)
                    per_sequence[i] = torch.stack([gold_lp[j][keep].double(), hit[j][keep]], dim=1).cpu()
    finally:
        model.train(was_training)
    return torch.cat(per_sequence, dim=0) if per_sequence else torch.zeros(0, 2, dtype=torch.float64)

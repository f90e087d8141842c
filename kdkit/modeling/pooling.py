"""Mean pooling for BERT-style sequence classifiers (recipe key ``pooling = "mean"``).

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained to be read through the mean of their token
vectors. Their [CLS] vector, which ``BertForSequenceClassification`` classifies, is nearly the same for every
sentence once the model is cut to a few layers (standard deviation across sentences about 0.001 at 1-3 of its 6
layers), so such a classifier starts at chance and learns slowly. Reading the masked mean instead keeps what the
checkpoint learned.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkit.errors import ModelError

#: The config.json key in which kdkit records that a classifier reads the mean of its token vectors.
POOLING_KEY = "kdkit_pooling"


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token vectors where the attention mask is 1, then the model's own pooler layer (dense + tanh).

    Its ``dense`` is the replaced pooler's, so the parameter names, and with them the checkpoint's keys, stay
    the same. The attention mask reaches it through a forward pre-hook on the encoder (see
    :func:`use_mean_pooling`): BERT's encoder hands its pooler the hidden states only.
    """

    def __init__(self, pooler: torch.nn.Module) -> None:
        super().__init__()
        self.dense = pooler.dense
        self.activation = pooler.activation
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:  # no mask given: every position is a token
            mean = hidden_states.mean(dim=1)
        else:
            weights = self.mask.to(hidden_states.dtype).unsqueeze(-1)
            mean = (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.activation(self.dense(mean))


def use_mean_pooling(model: Any, *, who: str = "model") -> Any:
    """Make a BERT-style sequence classifier read the masked mean of its last layer instead of [CLS].

    The choice is written into the model's config (``kdkit_pooling = "mean"``), so a checkpoint kdkit saves is
    loaded the same way by :func:`kdkit.models.load_classifier`. Plain
    ``AutoModelForSequenceClassification.from_pretrained`` does not read that key: call
    ``kdkit.pooling.use_mean_pooling(model)`` after loading such a checkpoint yourself.
    """
    encoder = getattr(model, "base_model", None)
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, MaskedMeanPooler):
        return model
    if pooler is None or not isinstance(getattr(pooler, "dense", None), torch.nn.Linear):
        raise ModelError(
            f"{who}: pooling = \"mean\" needs a BERT-style model with a pooler layer; "
            f"{type(model).__name__} has none (use pooling = \"cls\")"
        )
    mean_pooler = MaskedMeanPooler(pooler)
    encoder.pooler = mean_pooler

    def hand_over_mask(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        mean_pooler.mask = mask

    def drop_mask(module: Any, args: Any, output: Any) -> None:
        mean_pooler.mask = None  # hold no batch between calls

    encoder.register_forward_pre_hook(hand_over_mask, with_kwargs=True)
    encoder.register_forward_hook(drop_mask)
    setattr(model.config, POOLING_KEY, "mean")
    return model

"""Continuations of prompts, sampled once and reproducibly, with a causal LM's own KV cache (no ``generate()``).

Why a loop of its own rather than ``model.generate``: every prompt gets its own random stream, seeded from the
recipe's generation seed and the prompt's content key (:func:`prompt_seed`), and each token is drawn by the
Gumbel-max trick from that stream (``argmax(logits / T + g)``, ``g = -log(-log(u))`` with ``u`` uniform, which is a
sample of ``softmax(logits / T)``; top-k and top-p only mask the logits first). What a prompt's continuation is
therefore does not depend on which other prompts share its batch, on the batch size, on their order or on the
process that runs them, only on the prompt, the model and the settings, as a content-keyed cache needs.
``model.generate`` draws one ``torch.multinomial`` over the whole batch from one global stream instead.

Batches hold prompts of one length (:func:`kdkit.modeling.predict.length_buckets` with ``same_length``): no padding,
so no attention mask and no position shifts; rows advance in lockstep and a row's tokens after its first
end-of-sequence token are dropped. A continuation stops at that token (kept), at ``max_new_tokens`` or at
``max_length`` tokens in all, whichever comes first.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdkit.modeling.predict import length_buckets
from kdkit.runtime import inference_autocast


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: sampled (``do_sample``) at ``temperature`` among the ``top_k`` most probable
    (0: all) within the ``top_p`` nucleus (1: all), or the most probable one (greedy)."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def prompt_seed(seed: int, key: str) -> int:
    """The seed of one prompt's random stream: 63 bits of SHA-256 over the generation seed and its content key."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) >> 1


def _masked(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``logits / T`` with every token outside the top-k and the top-p nucleus at ``-inf`` (the best one stays)."""
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = scores.topk(sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the better tokens: the best one always stays
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The next token of each row of ``logits [B, V]``: greedy, or a Gumbel-max draw from row b's own generator."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    scores = _masked(logits.float(), sampling)
    uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in generators])
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0 - 1e-16)))
    return (scores.double() + gumbel.to(scores.device)).argmax(dim=-1)


def _cache_argument(model: Any) -> tuple[str, dict[str, int]]:
    """The name under which ``model.forward`` takes and returns its KV cache (``cache`` since transformers 5.2x,
    ``past_key_values`` before), and ``logits_to_keep = 1`` where it takes it (only the last position's logits)."""
    parameters = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    return name, ({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


def _continue_batch(
    model: Any, tokens: torch.Tensor, steps: int, sampling: Sampling, generators: list[torch.Generator], eos: int | None
) -> torch.Tensor:
    """``[B, <= steps]`` new tokens after ``tokens [B, L]`` (rows of one length), the KV cache carried along."""
    if steps <= 0:
        return tokens.new_zeros(tokens.shape[0], 0)
    cache, last_only = _cache_argument(model)
    out = model(input_ids=tokens, use_cache=True, **last_only)
    chosen: list[torch.Tensor] = []
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for step in range(steps):
        nxt = choose_tokens(out.logits[:, -1, :], sampling, generators).to(tokens.device)
        chosen.append(nxt)
        if eos is not None:
            done |= nxt == eos
            if bool(done.all()):
                break
        if step + 1 < steps:
            out = model(input_ids=nxt[:, None], use_cache=True, **{cache: getattr(out, cache)})
    return torch.stack(chosen, dim=1)


def generate_continuations(
    model: Any,
    prompts: Sequence[np.ndarray],
    keys: Sequence[str],
    sampling: Sampling,
    *,
    eos: int | None,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """The continuation (int32 tokens, without the prompt) of each prompt, in the order given.

    :param keys: each prompt's content key (it seeds the prompt's random stream).
    :param max_length: prompt and continuation together hold at most so many tokens; a prompt must be shorter.
    """
    device = device or next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    results: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), inference_autocast(device):
            for batch in length_buckets(lengths, batch_size, same_length=True):
                tokens = torch.from_numpy(np.stack([prompts[i] for i in batch]).astype(np.int64)).to(device)
                steps = min(sampling.max_new_tokens, max_length - tokens.shape[1])
                generators = [torch.Generator().manual_seed(prompt_seed(sampling.seed, keys[i])) for i in batch]
                new = _continue_batch(model, tokens, steps, sampling, generators, eos).cpu().numpy()
                for j, i in enumerate(batch):
                    row = new[j]
                    if eos is not None and (row == eos).any():
                        row = row[: int(np.argmax(row == eos)) + 1]
                    results[i] = row.astype(np.int32)
                if on_batch is not None:
                    on_batch(len(batch))
    finally:
        model.train(was_training)
    return results

"""Seeded generation for the unlabeled prompts (kdkit/modeling/generate.py) against a reference written here from
its docstring: one prompt at a time, a full forward pass per token (no KV cache), each token drawn by the
Gumbel-max trick from the prompt's own stream, seeded by the first 63 bits of SHA-256 over "seed:key"."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdkit.modeling.generate import Sampling, generate_continuations

EOS = 3


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def prompts() -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(5)
    ids = [rng.integers(4, 40, size=n).astype(np.int32) for n in (3, 5, 3, 5, 4, 3)]
    return ids, [hashlib.sha256(p.tobytes()).hexdigest() for p in ids]


def reference(model, prompt: np.ndarray, key: str, sampling: Sampling, max_length: int) -> list[int]:
    stream = torch.Generator().manual_seed(int(hashlib.sha256(f"{sampling.seed}:{key}".encode()).hexdigest()[:16], 16) >> 1)
    tokens = [int(t) for t in prompt]
    out: list[int] = []
    with torch.no_grad():
        while len(out) < sampling.max_new_tokens and len(tokens) < max_length:
            logits = model(torch.tensor([tokens])).logits[0, -1].double()
            if sampling.do_sample:
                u = torch.rand(logits.shape[-1], generator=stream, dtype=torch.float64)
                nxt = int((logits / sampling.temperature - torch.log(-torch.log(u))).argmax())
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            tokens.append(nxt)
            if nxt == EOS:
                break
    return out


@pytest.mark.parametrize("do_sample", [True, False])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_continuations_equal_the_reference_whatever_the_batch(model, do_sample, batch_size) -> None:
    ids, keys = prompts()
    sampling = Sampling(max_new_tokens=6, do_sample=do_sample, temperature=1.5, seed=7)
    got = generate_continuations(model, ids, keys, sampling, eos=EOS, max_length=10, batch_size=batch_size)
    want = [reference(model, p, k, sampling, max_length=10) for p, k in zip(ids, keys, strict=True)]
    assert [g.tolist() for g in got] == want
    assert all(len(p) + len(g) <= 10 for p, g in zip(ids, got, strict=True))


def test_another_seed_samples_other_continuations(model) -> None:
    ids, keys = prompts()
    first = generate_continuations(model, ids, keys, Sampling(max_new_tokens=6, seed=1), eos=None, max_length=12)
    again = generate_continuations(model, ids, keys, Sampling(max_new_tokens=6, seed=1), eos=None, max_length=12)
    other = generate_continuations(model, ids, keys, Sampling(max_new_tokens=6, seed=2), eos=None, max_length=12)
    assert [a.tolist() for a in again] == [f.tolist() for f in first]
    assert [o.tolist() for o in other] != [f.tolist() for f in first]

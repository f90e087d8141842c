"""Tiny causal LMs and token sequences for the top-k store tests, and a driver that builds a store in another
process.

Run as a script (``python tests/helpers_topk.py ROOT MODE [SYNC]``), this file builds the store of
:func:`tiny_llama` over :func:`random_sequences` under ``ROOT`` and prints ``{"built": ..., "directory": ...}``
as JSON. ``MODE`` chooses where it stops or waits, so that the tests do not race a timer:

* ``plain``: just build (or reuse);
* ``hold``: after the first batch (holding the store's lock), create ``SYNC/holding`` and wait for ``SYNC/waiting``;
* ``probe``: before building, try the store's lock without blocking; if another process holds it, create
  ``SYNC/waiting``, then build as usual (waiting for the lock);
* ``kill``: SIGKILL itself after the second batch, with one shard file already written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers_reliability import lock_is_held

VOCAB = 96
MAX_LENGTH = 24


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> Any:
    """A randomly initialised 2-layer Llama (hidden 32) whose logits spread over several nats
    (``initializer_range`` 0.5), built in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


def random_sequences(count: int, seed: int = 0, vocab: int = VOCAB, low: int = 2, high: int = MAX_LENGTH) -> list:
    """``count`` int32 token sequences of ``low``..``high`` tokens (many share a length)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(low, high + 1)), dtype=np.int32) for _ in range(count)]


def spec(model: Any, **changes: Any) -> Any:
    """The TopKSpec of ``model`` (k 8, T 2, float16, max_length 24) with ``changes``."""
    from kdkit.store.topk import TopKSpec

    fields = dict(
        teacher="tiny-llama-seed-0",
        tokenizer="tokenizer-fingerprint-a",
        k=8,
        temperature=2.0,
        dtype="float16",
        max_length=MAX_LENGTH,
        vocab_size=model.config.vocab_size,
    )
    fields.update(changes)
    return TopKSpec(**fields)


# --------------------------------------------------------------------------- the driver
def _on_batch(mode: str, sync: Path | None) -> Any:
    calls = 0

    def on_batch(count: int) -> None:
        nonlocal calls
        calls += 1
        if mode == "hold" and calls == 1 and sync is not None:
            (sync / "holding").touch()
            deadline = time.monotonic() + 300
            while not (sync / "waiting").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if mode == "kill" and calls == 2:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return on_batch


def main(argv: list[str]) -> None:
    from kdkit.modeling.topk import build_topk_store
    from kdkit.store.topk import lock_path, sequence_key, store_key

    torch.set_num_threads(1)
    root, mode = Path(argv[0]), argv[1]
    sync = Path(argv[2]) if len(argv) > 2 else None
    model = tiny_llama()
    sequences = random_sequences(40, seed=1)
    store_spec = spec(model)
    if mode == "probe" and sync is not None:
        if lock_is_held(lock_path(root, store_key(store_spec, [sequence_key(s) for s in sequences]))):
            (sync / "waiting").touch()
    result = build_topk_store(
        model, sequences, root, store_spec, batch_size=4, shard_positions=40, on_batch=_on_batch(mode, sync)
    )
    print(json.dumps({"built": result.built, "directory": str(result.store.directory)}))


if __name__ == "__main__":
    main(sys.argv[1:])

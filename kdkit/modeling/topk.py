"""Building a top-k teacher store: a bare forward pass of a causal LM (no Trainer) over token id sequences that
keeps, for every position, the teacher's top-k token ids, their log-probabilities at temperature T, and the
log-probability of the gold (next) token at T = 1. The format, the keys and the reader: :mod:`kdkit.store.topk`.

Convention: position t of a sequence of L tokens holds the teacher's prediction of token t + 1, made from its
logits at token t; a sequence has L - 1 positions (the logits of its last token are not kept).

How (as :func:`kdkit.modeling.predict.predict_logits` does for classifiers): ``torch.inference_mode``; bf16
autocast on a CUDA GPU that supports it (:func:`kdkit.runtime.inference_autocast`); sequences batched by equal
length (:func:`kdkit.modeling.predict.length_buckets` with ``same_length``), so nothing is padded and the
forward needs no attention mask; on a CPU a batch also holds at most a token budget. Each batch's logits are
reduced a chunk of positions at a time (:func:`topk_positions`), so the memory beyond the logits themselves stays
bounded whatever the vocabulary. Tokenizing is the caller's job: the builder takes token ids and their keys.

Several processes (ranks) build one store together: each builds its part (:func:`build_topk_store` with
``part``), then one of them merges the parts (:func:`kdkit.store.topk.merge_topk_parts`). A rank's share is whole
batches of the one-process plan (:func:`plan_batches`), so every sequence meets the same batch-mates, and gets
the same floats, as in a one-process build on the same device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.errors import DataError, ModelError, NonFiniteLogitsError
from kdkit.modeling.predict import default_max_tokens, length_buckets
from kdkit.runtime import inference_autocast
from kdkit.store.files import remove_stale_temporaries
from kdkit.store.locks import file_lock
from kdkit.store.topk import (
    SHARD_POSITIONS,
    PartInfo,
    TopKSpec,
    TopKStore,
    TopKWriter,
    canonical_order,
    lock_path,
    part_directory,
    reuse_store,
    sequence_key,
    store_key,
    write_store,
)

#: Float32 logits reduced at once on a CPU: 2 MiB (10 positions of a 49,152-token vocabulary), so that a chunk's
#: temporaries are reused from the caches instead of being fresh memory. Measured on a 2-core EPYC (benchmarks/
#: bench_topk_store.py, docs/PERFORMANCE.md) on logits [8, 128, 49152] at T = 2: chunks of 0.8 to 12 MiB (4 to
#: 64 positions) alike, ~360-430 us of CPU per position; 192 MiB (1,024 positions) ~1.9x slower.
CHUNK_BYTES = 1 << 21

#: The same on an accelerator: 256 MiB (1,365 positions of a 49,152-token vocabulary), so that a batch takes few
#: kernel launches while the temporaries (about three times this) stay small beside the logits themselves.
ACCELERATOR_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class TopKBuild:
    """What :func:`build_topk_store` returns: the store, and whether this call computed it (False: reused)."""

    store: TopKStore
    built: bool


@dataclass(frozen=True)
class PreparedSequences:
    """The distinct sequences of a build, each once (its first occurrence), as int32 arrays with their keys."""

    tokens: list[np.ndarray]
    keys: list[str]
    rows: list[int]  #: each sequence's index in the data passed in (for error messages)


# --------------------------------------------------------------------------- the arithmetic
def chunk_positions(device: torch.device, vocab_size: int) -> int:
    """How many positions' logits :func:`capture_topk` reduces at once on ``device``."""
    budget = CHUNK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    return max(1, budget // (4 * vocab_size))


def topk_positions(
    logits: torch.Tensor, gold: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For R positions: the top-k token ids (int32, best first) and their log-probabilities at ``temperature``
    (float32), the gold tokens' log-probabilities at T = 1 (float32), and which positions have finite logits.

    :param logits: ``[R, V]`` logits (any float dtype; reduced in float32).
    :param gold: ``[R]`` the gold (next) token id of each position.

    This is ``log_softmax(x / T).topk(k)`` and ``log_softmax(x)[gold]`` without materialising either
    log-softmax: ``log_softmax(x / T)_i = x_i / T - logsumexp(x / T)``, so the top-k of ``x`` are the top-k of
    ``log_softmax(x / T)`` for any T > 0, and both log-sum-exps are shifted by the row's maximum (its top-1
    logit), sharing one ``[R, V]`` buffer. A row holding a NaN or an infinity has a non-finite sum: that is the
    finiteness test, one cheap pass.
    """
    x = logits.float()
    finite = torch.isfinite(x.sum(dim=-1))
    values, ids = x.topk(k, dim=-1)
    top = values[:, :1]
    shifted = x - top
    lse = top[:, 0] + torch.exp(shifted).sum(dim=-1).log()
    if temperature == 1.0:
        lse_t = lse
    else:
        lse_t = top[:, 0] / temperature + shifted.div_(temperature).exp_().sum(dim=-1).log()
    logprobs = values / temperature - lse_t[:, None]
    gold_logprobs = x.gather(1, gold[:, None])[:, 0] - lse
    return ids.to(torch.int32), logprobs, gold_logprobs, finite


def capture_topk(
    logits: torch.Tensor, tokens: torch.Tensor, k: int, temperature: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """:func:`topk_positions` over a batch, ``chunk`` positions at a time.

    :param logits: ``[B, L, V]``; :param tokens: ``[B, L]`` the input ids (token t + 1 is position t's gold).
    :returns: ids ``[B, L - 1, k]`` int32, log-probabilities ``[B, L - 1, k]`` float32, gold log-probabilities
        ``[B, L - 1]`` float32, and ``(b, t)`` of the first position with non-finite logits (else ``None``).
    """
    batch, length, vocab = logits.shape
    flat = logits.reshape(batch * length, vocab)
    gold = torch.roll(tokens, shifts=-1, dims=1).reshape(-1).long()  # the last column wraps; it is dropped below
    ids = torch.empty(batch * length, k, dtype=torch.int32, device=logits.device)
    logprobs = torch.empty(batch * length, k, dtype=torch.float32, device=logits.device)
    gold_logprobs = torch.empty(batch * length, dtype=torch.float32, device=logits.device)
    finite = torch.empty(batch * length, dtype=torch.bool, device=logits.device)
    for start in range(0, batch * length, chunk):
        stop = min(start + chunk, batch * length)
        out = topk_positions(flat[start:stop], gold[start:stop], k, temperature)
        ids[start:stop], logprobs[start:stop], gold_logprobs[start:stop], finite[start:stop] = out
    bad = (~finite.view(batch, length)[:, :-1]).nonzero()
    first = (int(bad[0, 0]), int(bad[0, 1])) if len(bad) else None
    keep = (batch, length, k)
    return (
        ids.view(keep)[:, :-1],
        logprobs.view(keep)[:, :-1],
        gold_logprobs.view(batch, length)[:, :-1],
        first,
    )


# --------------------------------------------------------------------------- sequences and batches
def prepare_sequences(
    sequences: Sequence[Sequence[int] | np.ndarray], keys: Sequence[str] | None, spec: TopKSpec
) -> PreparedSequences:
    """The distinct sequences (first occurrence kept) as int32 arrays, checked against their keys and ``spec``.

    :param keys: each sequence's :func:`kdkit.store.topk.sequence_key` (computed when ``None``); a given key
        that is not its sequence's is an error, never silently trusted: it is what pairs outputs with samples.
    :raises DataError: naming the sequence (its index and key): a wrong key, more than ``max_length`` tokens,
        a token id outside the vocabulary.
    """
    if keys is not None and len(keys) != len(sequences):
        raise DataError(f"{len(sequences)} sequences but {len(keys)} keys")
    prepared = PreparedSequences([], [], [])
    seen: set[str] = set()
    for row, sequence in enumerate(sequences):
        tokens = np.asarray(sequence.cpu() if isinstance(sequence, torch.Tensor) else sequence)
        key = sequence_key(tokens)
        if keys is not None and keys[row] != key:
            raise DataError(f"sequence {row}: key {keys[row]} is not the key of its tokens ({key})")
        if len(tokens) > spec.max_length:
            raise DataError(
                f"sequence {row} (key {key}) has {len(tokens)} tokens, more than max_length {spec.max_length}"
            )
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= spec.vocab_size):
            raise DataError(
                f"sequence {row} (key {key}) holds token ids outside the vocabulary [0, {spec.vocab_size})"
            )
        if key not in seen:
            seen.add(key)
            prepared.tokens.append(tokens.astype(np.int32, copy=False))
            prepared.keys.append(key)
            prepared.rows.append(row)
    return prepared


def plan_batches(prepared: PreparedSequences, batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """The forward batches of a build, as indices into ``prepared``: the sequences in the store's canonical order
    (longest first, ties by key), cut into batches of one length each, at most ``batch_size`` rows and, if given,
    ``max_tokens`` tokens. Rank r of w builds batches ``r, r + w, r + 2w, ...`` of this plan."""
    lengths = [max(len(tokens), 1) for tokens in prepared.tokens]  # 0 and 1 token: no position either way
    order = canonical_order(lengths, prepared.keys)
    cuts = length_buckets([lengths[i] for i in order], batch_size, max_tokens, same_length=True)
    return [[order[j] for j in cut] for cut in cuts]


# --------------------------------------------------------------------------- the forward pass
def _forward_batches(
    model: Any,
    prepared: PreparedSequences,
    batches: Sequence[Sequence[int]],
    writer: TopKWriter,
    *,
    device: torch.device,
    who: str,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Run ``batches`` through ``model`` and append every sequence's top-k to ``writer``, in batch order."""
    spec = writer.spec
    chunk = chunk_positions(device, spec.vocab_size)
    for batch in batches:
        length = len(prepared.tokens[batch[0]])
        if length < 2:  # no position: nothing to predict
            for i in batch:
                empty = torch.zeros(0, spec.k)
                writer.add(prepared.keys[i], empty.int(), empty, torch.zeros(0))
        else:
            tokens = torch.from_numpy(np.stack([prepared.tokens[i] for i in batch])).to(device).long()
            logits = model(input_ids=tokens, use_cache=False).logits
            if logits.shape[-1] != spec.vocab_size:
                raise ModelError(
                    f"{who}: its logits have {logits.shape[-1]} entries, the store's vocab_size is {spec.vocab_size}"
                )
            ids, logprobs, gold, bad = capture_topk(logits, tokens, spec.k, spec.temperature, chunk)
            if bad is not None:
                b, t = bad
                raise NonFiniteLogitsError(
                    f"{who}: non-finite logits for sequence {prepared.rows[batch[b]]} (key {prepared.keys[batch[b]]}) "
                    f"at position {t}; the model diverged or its weights are corrupt"
                )
            ids, logprobs, gold = ids.cpu(), logprobs.cpu(), gold.cpu()  # the writer stores logprobs in spec.dtype
            for j, i in enumerate(batch):
                writer.add(prepared.keys[i], ids[j], logprobs[j], gold[j])
        if on_batch is not None:
            on_batch(len(batch))


def _build(
    model: Any,
    prepared: PreparedSequences,
    batches: Sequence[Sequence[int]],
    directory: Path,
    spec: TopKSpec,
    *,
    store: str,
    part: PartInfo | None,
    device: torch.device,
    who: str,
    on_batch: Callable[[int], None] | None,
    shard_positions: int,
) -> None:
    """Write the store (or part) ``directory`` from ``batches``: complete, or absent if anything fails."""
    remove_stale_temporaries(directory.parent, directory.name)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), inference_autocast(device):
            with write_store(directory, spec, store=store, part=part, shard_positions=shard_positions) as writer:
                _forward_batches(model, prepared, batches, writer, device=device, who=who, on_batch=on_batch)
    finally:
        model.train(was_training)


def build_topk_store(
    model: Any,
    sequences: Sequence[Sequence[int] | np.ndarray],
    root: str | Path,
    spec: TopKSpec,
    *,
    part: PartInfo | None = None,
    keys: Sequence[str] | None = None,
    batch_size: int = 64,
    max_tokens: int | None = None,
    device: torch.device | None = None,
    who: str = "teacher",
    on_batch: Callable[[int], None] | None = None,
    console: Any = None,
    shard_positions: int = SHARD_POSITIONS,
) -> TopKBuild:
    """The top-k store of ``model`` over ``sequences`` under ``root``: reused if complete and intact, else built
    (once, under a lock: a second process building the same store waits and then reuses it). A damaged store is
    reported (``CacheWarning``) and rebuilt.

    :param model: a causal LM (``model(input_ids=...).logits`` ``[B, L, V]``), already on its device.
    :param sequences: token id sequences (lists or int32 arrays), at most ``spec.max_length`` tokens each;
        repeats are stored once.
    :param spec: teacher and tokenizer fingerprints, k, temperature, dtype, max_length, vocab_size.
    :param part: build only this rank's share (batches ``rank, rank + world_size, ...`` of :func:`plan_batches`)
        into its part directory (:func:`kdkit.store.topk.part_directory`); every rank passes all the sequences
        and the same ``batch_size`` and ``max_tokens``. When every part exists, one process merges them with
        :func:`kdkit.store.topk.merge_topk_parts`. The returned store is then the part.
    :param keys: the sequences' :func:`kdkit.store.topk.sequence_key` (checked; computed when ``None``).
    :param batch_size: at most this many sequences per forward pass; ``max_tokens``: at most this many tokens
        (``None``: :func:`kdkit.modeling.predict.default_max_tokens` of the device).
    :param on_batch: called with the number of sequences after each batch (progress bars).
    :raises NonFiniteLogitsError: naming ``who``, the sequence (index and key) and the position.
    """
    prepared = prepare_sequences(sequences, keys, spec)
    key = store_key(spec, prepared.keys)
    if part is None:
        directory, lock, what = Path(root) / key, lock_path(root, key), who
    else:
        directory = part_directory(root, key, part.rank, part.world_size)
        lock, what = directory.with_name(f"{directory.name}.lock"), f"{who}, part {part.rank} of {part.world_size}"
    device = device or next(model.parameters()).device
    with file_lock(lock):
        store = reuse_store(directory, spec, what=what, console=console)
        if store is not None:
            return TopKBuild(store, built=False)
        batches = plan_batches(prepared, batch_size, default_max_tokens(device) if max_tokens is None else max_tokens)
        if part is not None:
            batches = batches[part.rank :: part.world_size]
        _build(model, prepared, batches, directory, spec, store=key, part=part, device=device, who=who,
               on_batch=on_batch, shard_positions=shard_positions)
    return TopKBuild(TopKStore.open(directory, verify=False), built=True)

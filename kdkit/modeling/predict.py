"""Prediction without padding waste: rows batched by equal length, in inference mode, in the split's order.

Samples are sorted by token count and batched by equal length, so no batch is padded and the attention needs no
mask; a batch holds at most ``batch_size`` rows and, on a CPU, at most :data:`CPU_MAX_TOKENS` tokens (small
batches stay in the CPU caches); the outputs are put back in the original order. On a GPU the forward pass runs
under bf16 autocast (fp32 outputs are kept). Why each of these, with measurements: docs/PERFORMANCE.md.

Several processes (torchrun) share a prediction (``sharded=True``): every process cuts the same batches, each
takes a share of them (:func:`deal_batches`: about as many tokens each), and the outputs are gathered, so every
process ends with the whole split. A batch is computed the same way whichever process runs it (same rows, same
shape), so the result equals one process's bit for bit (with the same number of threads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdkit.errors import NonFiniteLogitsError
from kdkit.modeling.tokenize import encode
from kdkit.runtime import all_gather_rows, inference_autocast, rank, release_freed_memory, world_size
from kdkit.store.hashing import arrow_column
from kdkit.store.tokens import ATTENTION_MASK, TokenArrays

#: Token budget of a teacher batch on a CPU (rows x padded length). Measured on one core (docs/PERFORMANCE.md):
#: a MiniLM-L6 teacher runs ~1.35x faster in batches of about 4,096 tokens than in batches of 256 sentences of
#: ~27 tokens (~7,000), whose activations no longer stay in the CPU caches; 1,024-8,192 are all within 3%.
CPU_MAX_TOKENS = 4096
#: Batches between two :func:`kdkit.runtime.release_freed_memory` calls. Measured on a 40,000-row prediction of a
#: tiny BERT: every 16 batches, peak memory 43 MB instead of 59-73 MB at the same speed; every batch, 17 MB but
#: 50% slower.
TRIM_EVERY = 16


def length_buckets(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, *, same_length: bool = False
) -> list[list[int]]:
    """Indices sorted by decreasing length (ties keep their order), cut into batches.

    A batch holds at most ``batch_size`` rows and, if ``max_tokens`` is given, at most ``max_tokens`` tokens once
    padded to its longest (first) row; a row longer than ``max_tokens`` gets a batch of its own. With
    ``same_length`` a batch holds rows of one length only: no padding at all. The longest batch comes first, so
    running out of memory happens at once rather than at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (
            len(current) >= batch_size
            or (max_tokens is not None and (len(current) + 1) * lengths[current[0]] > max_tokens)
            or (same_length and lengths[i] != lengths[current[0]])
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def default_max_tokens(device: torch.device) -> int | None:
    """The token budget of a prediction batch when none is given: :data:`CPU_MAX_TOKENS` on a CPU, none on an
    accelerator (there the larger the batch, the better, up to ``batch_size``)."""
    return CPU_MAX_TOKENS if device.type == "cpu" else None


def deal_batches(batches: Sequence[Sequence[int]], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Which batches (by position in ``batches``) each of ``parts`` processes predicts: each batch in turn goes
    to the process with the fewest tokens so far (ties to the lowest rank), so the shares stay balanced whatever
    the lengths. Every process computes the same answer from the same batches."""
    load = [0] * parts
    dealt: list[list[int]] = [[] for _ in range(parts)]
    for number, batch in enumerate(batches):
        part = min(range(parts), key=lambda p: (load[p], p))
        dealt[part].append(number)
        load[part] += len(batch) * int(lengths[batch[0]])
    return dealt


def predict_logits(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    text_columns: Sequence[str],
    max_length: int,
    batch_size: int,
    *,
    device: torch.device | None = None,
    who: str = "model",
    split: str = "",
    on_batch: Callable[[int], None] | None = None,
    max_tokens: int | None = None,
    encoded: Mapping[str, Sequence[Sequence[int]]] | None = None,
    sharded: bool = False,
) -> torch.Tensor:
    """``[len(dataset), num_classes]`` float32 logits of ``model`` in the dataset's row order.

    :param max_tokens: also cap each batch at this many tokens (:func:`length_buckets`); ``None``:
        :func:`default_max_tokens` for the device. Rows are batched by equal length, so nothing is padded and
        the attention runs without a mask; the logits equal a padded forward's up to float rounding.
    :param encoded: the split already tokenized with this tokenizer and ``max_length`` (a
        :class:`~kdkit.store.tokens.TokenArrays`, or ``{input: rows}``); tokenized here if not given.
    :param on_batch: called with the number of samples after each batch this process predicts (progress bars).
    :param sharded: every process of the run calls this together; each predicts a share of the batches and all
        get the whole result.
    :raises NonFiniteLogitsError: naming ``who``, the split and the sample (on every process).
    """
    device = device or next(model.parameters()).device
    if encoded is None:
        encoded = encode(tokenizer, dataset, text_columns, max_length)
    tokens = encoded if isinstance(encoded, TokenArrays) else TokenArrays.from_rows(encoded)
    size = len(dataset)
    lengths = tokens.lengths()
    budget = default_max_tokens(device) if max_tokens is None else max_tokens
    batches = length_buckets(lengths.tolist(), batch_size, budget, same_length=True) if size else []
    if sharded and world_size() > 1:
        batches = [batches[number] for number in deal_batches(batches, lengths, world_size())[rank()]]
    extra = [ATTENTION_MASK] if ATTENTION_MASK in getattr(tokenizer, "model_input_names", ()) else []
    index, logits = _forward(model, tokens, batches, device, extra, on_batch, model.config.num_labels)
    if sharded:
        index = torch.cat(all_gather_rows(index))
        logits = torch.cat(all_gather_rows(logits))
    out = torch.empty(size, model.config.num_labels, dtype=torch.float32)
    out[index] = logits
    _check_finite(out, dataset, who, split)
    return out


def _forward(
    model: Any, tokens: TokenArrays, batches: Sequence[Sequence[int]], device: torch.device, extra: Sequence[str],
    on_batch: Callable[[int], None] | None, num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``batches`` (int64) and their float32 logits ``[rows, C]``, on the CPU.

    Both are allocated before the first forward pass and filled in place, and the memory the batches free is
    handed back every :data:`TRIM_EVERY` batches (:func:`kdkit.runtime.release_freed_memory`): the batches' shapes
    change all the time, and the heap would otherwise keep growing (docs/PERFORMANCE.md).
    """
    rows = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]) if batches else np.zeros(0, np.int64)
    logits = torch.empty(len(rows), num_classes, dtype=torch.float32)
    start = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), inference_autocast(device):
            for number, batch in enumerate(batches):
                inputs = {name: t.to(device) for name, t in tokens.batch(batch, extra).items()}
                logits[start : start + len(batch)] = model(**inputs).logits.float().cpu()
                start += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
                if number % TRIM_EVERY == TRIM_EVERY - 1:
                    release_freed_memory()
    finally:
        model.train(was_training)
        release_freed_memory()
    return torch.from_numpy(rows), logits


def _check_finite(logits: torch.Tensor, dataset: Any, who: str, split: str) -> None:
    """:raises NonFiniteLogitsError: naming the first row (in the split's order) whose logits are not finite."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return
    bad = int((~finite).nonzero()[0, 0])
    names = getattr(dataset, "column_names", None) or []
    row = arrow_column(dataset, "row")[bad].as_py() if "row" in names else bad
    where = f" of the {split} split" if split else ""
    raise NonFiniteLogitsError(
        f"{who}: non-finite logits for sample {row}{where} (position {bad}); "
        "the model diverged or its weights are corrupt"
    )

"""Training causal LMs with kdkit's trainer: a dataset of token sequences, its collator, and the two objectives.

* :class:`CausalLMObjective`: cross-entropy of the next token at the labeled positions (teacher fine-tuning and
  the labels-only student);
* :class:`StoreDistillation`: :class:`kdkit.TokenDistillationLoss` over the teachers' top-k stores, which it reads
  by each sequence's content key (:meth:`kdkit.store.topk.TopKStore.read`) for the sequences of a batch; no
  teacher model is in memory.

Positions are those of :mod:`kdkit.data.tokens` and of the store: position t of a sequence predicts token t + 1.
The collator pads a batch to its longest sequence L and aligns ``labels`` / ``generated`` to the model's logits
``[B, L, V]``: column t holds token t + 1 of each sequence where it is a target (else -100) and whether it was
generated; the last column (and padding) holds -100 and false. The logits are passed whole (a contiguous tensor:
the token objective reads it fastest, :mod:`kdkit.distill.chunked`), never sliced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.data.tokens import TokenSequences
from kdkit.distill.tokens import TokenDistillationLoss, TopKTeachers
from kdkit.errors import KdkitError
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.store.topk import MissingSequenceError, TopKRows, TopKStore
from kdkit.training.objectives import ObjectiveOutput


class TokenDataset(torch.utils.data.Dataset):
    """Token sequences as training samples: ``input_ids``, ``labels`` and ``generated`` per position, and (for
    distillation) ``kd_index``, the sequence's index in the objective's list of keys."""

    def __init__(self, sequences: TokenSequences, kd_offset: int | None = None) -> None:
        self.sequences = sequences
        self.kd_offset = kd_offset

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def encoded(self) -> dict[str, list[list[int]]]:
        """The input ids (what :func:`kdkit.modeling.tokenize.mostly_unknown` inspects)."""
        return {"input_ids": [ids.tolist() for ids in self.sequences.ids]}

    def __getitem__(self, i: int) -> dict[str, Any]:
        labels, generated = self.sequences.labels(i)
        item: dict[str, Any] = {"input_ids": self.sequences.ids[i], "labels": labels, "generated": generated}
        if self.kd_offset is not None:
            item["kd_index"] = self.kd_offset + i
        return item

    @staticmethod
    def concat(parts: Sequence[TokenDataset]) -> TokenDataset:
        """One dataset of the parts' sequences; ``kd_index`` runs on across the parts (each part's offset is where
        it starts in the concatenation)."""
        sequences = TokenSequences.concat([p.sequences for p in parts])
        return TokenDataset(sequences, kd_offset=0 if all(p.kd_offset is not None for p in parts) else None)


class CausalLMCollator:
    """Right-pads a batch of sequences (``pad_id``, with an attention mask) and aligns labels to the logits."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        generated = torch.zeros((batch, width), dtype=torch.bool)
        for b, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[b, :n] = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
            mask[b, :n] = 1
            labels[b, : n - 1] = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
            generated[b, : n - 1] = torch.as_tensor(np.asarray(f["generated"], dtype=bool))
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "generated": generated}
        if "kd_index" in features[0]:
            out["kd_index"] = torch.tensor([int(f["kd_index"]) for f in features], dtype=torch.long)
        return out


def _split_inputs(inputs: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any]:
    """(the model's inputs, labels, generated, kd_index or None)."""
    model_inputs = dict(inputs)
    labels = model_inputs.pop("labels")
    generated = model_inputs.pop("generated", None)
    kd_index = model_inputs.pop("kd_index", None)
    if generated is None:
        generated = torch.zeros_like(labels, dtype=torch.bool)
    return model_inputs, labels, generated, kd_index


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at the labeled positions (0, with a gradient, when a batch has none)."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def next_token_evaluation(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
    """A tune batch: the next-token loss at labeled positions, predictions ``[B, L, 2]`` (the gold token's
    log-probability and whether it is the arg-max) and the labels ``[B, L]``."""
    model_inputs, labels, _, _ = _split_inputs(inputs)
    with torch.no_grad():
        logits = model(**model_inputs).logits.float()
        loss = next_token_loss(logits, labels)
        log_probs = torch.log_softmax(logits, dim=-1)
        gold = labels.clamp_min(0).unsqueeze(-1)
        predictions = torch.stack(
            [log_probs.gather(-1, gold).squeeze(-1), (logits.argmax(dim=-1) == labels).float()], dim=-1
        )
    return loss.detach(), predictions, labels


class CausalLMObjective:
    """Cross-entropy of the next token at the labeled positions (generated and ignored positions take no part)."""

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        model_inputs, labels, _, _ = _split_inputs(inputs)
        outputs = model(**model_inputs)
        return ObjectiveOutput(next_token_loss(outputs.logits, labels), outputs)

    evaluate = staticmethod(next_token_evaluation)


class StoreDistillation:
    """``loss_fn(student logits, the teachers' stored top-k, labels, generated)`` for each batch.

    :param stores: per teacher, the stores that hold the training sequences (one per split); every sequence of
        the dataset must be in one store of every teacher.
    :param keys: the content key of each training sequence, indexed by the batch's ``kd_index``.
    """

    def __init__(
        self, stores: Sequence[Sequence[TopKStore]], keys: Sequence[str], loss_fn: TokenDistillationLoss
    ) -> None:
        if not stores:
            raise KdkitError("token distillation needs the stores of at least one teacher")
        self.stores = [list(s) for s in stores]
        self.keys = list(keys)
        self.loss_fn = loss_fn
        manifest = self.stores[0][0].manifest
        self.temperature, self.vocab_size = manifest.temperature, manifest.vocab_size

    def _rows(self, teacher: Sequence[TopKStore], keys: Sequence[str]) -> TopKRows:
        """One teacher's rows of ``keys``, read from whichever of its stores holds each."""
        if len(teacher) == 1:
            return teacher[0].read(keys)
        owner = []
        for item, key in enumerate(keys):
            found = next((s for s in teacher if key in s), None)
            if found is None:
                raise MissingSequenceError(teacher[0].directory, key, item)
            owner.append(found)
        parts = [store.read([key]) for store, key in zip(owner, keys, strict=True)]
        counts = torch.tensor([int(p.offsets[-1]) for p in parts])
        offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
        offsets[1:] = counts.cumsum(0)
        return TopKRows(
            keys=tuple(keys), ids=torch.cat([p.ids for p in parts]), logprobs=torch.cat([p.logprobs for p in parts]),
            gold=torch.cat([p.gold for p in parts]), offsets=offsets,
        )

    def teachers(self, kd_index: torch.Tensor, length: int, device: torch.device) -> TopKTeachers:
        """The batch's ``TopKTeachers`` ``[B, length, N, k]``, padded past each sequence's positions."""
        keys = [self.keys[int(i)] for i in kd_index.tolist()]
        padded = [self._rows(teacher, keys).padded(length) for teacher in self.stores]
        return TopKTeachers(
            ids=torch.stack([p.ids for p in padded], dim=2).to(device),
            log_probs=torch.stack([p.logprobs for p in padded], dim=2).to(device),
            gold_log_probs=torch.stack([p.gold for p in padded], dim=2).to(device),
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        model_inputs, labels, generated, kd_index = _split_inputs(inputs)
        if kd_index is None:
            raise KdkitError("a distillation batch has no kd_index column: build it with TokenDataset(kd_offset=0)")
        outputs = model(**model_inputs)
        logits = outputs.logits
        out = self.loss_fn(logits, self.teachers(kd_index, logits.shape[1], logits.device), labels, generated)
        return ObjectiveOutput(out.loss, outputs, {"kd_weight": out.kd_weights, "sample_weight": out.sample_weights})

    evaluate = staticmethod(next_token_evaluation)

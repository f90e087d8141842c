"""Training samples: tokenized rows with their labels and, for distillation, their row in the teacher outputs.

Each distillation sample carries ``kd_index``, its row in the teacher-output tensor (``[rows, N, C]`` for
classifiers). The collator keeps it beside the padded model inputs, and the trainer's objective pops it (and the
labels) before calling the model, so the model never sees it and the Trainer's column removal never drops it
(``remove_unused_columns`` is off: kdkit builds exactly the columns it needs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdkit.store.tokens import TokenArrays


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized samples (unpadded), their labels and, for distillation, their row in the teacher logits.

    The tokens are kept as :class:`~kdkit.store.tokens.TokenArrays` (flat arrays; a mapping of lists is converted),
    the labels and rows as int64 arrays: ~150 bytes a sample instead of ~4.7 KB of Python lists.
    """

    def __init__(
        self,
        encoded: Mapping[str, Sequence[Sequence[int]]],
        labels: Sequence[int],
        kd_index: Sequence[int] | None = None,
    ) -> None:
        self.encoded = encoded if isinstance(encoded, TokenArrays) else TokenArrays.from_rows(encoded)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.kd_index = None if kd_index is None else np.asarray(kd_index, dtype=np.int64).reshape(-1)
        if self.encoded.num_rows != len(self.labels):
            raise ValueError(f"the tokens hold {self.encoded.num_rows} rows, labels {len(self.labels)}")
        if self.kd_index is not None and len(self.kd_index) != len(self.labels):
            raise ValueError("kd_index and labels differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = self.encoded.row(i)
        item["labels"] = int(self.labels[i])
        if self.kd_index is not None:
            item["kd_index"] = int(self.kd_index[i])
        return item

    @staticmethod
    def concat(parts: Sequence[EncodedDataset]) -> EncodedDataset:
        encoded = TokenArrays.concat([part.encoded for part in parts])
        labels = np.concatenate([part.labels for part in parts])
        has_index = all(part.kd_index is not None for part in parts)
        kd_index = np.concatenate([part.kd_index for part in parts]) if has_index else None  # type: ignore[misc]
        return EncodedDataset(encoded, labels, kd_index)


class KDCollator:
    """Pads the model inputs of a batch to its longest sample; passes ``labels`` and ``kd_index`` through."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        passthrough = ("labels", "kd_index")
        inputs = [{k: v for k, v in f.items() if k not in passthrough} for f in features]
        batch = dict(
            self.tokenizer.pad(inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        )
        for name in passthrough:
            if name in features[0]:
                batch[name] = torch.tensor([int(f[name]) for f in features], dtype=torch.long)
        return batch

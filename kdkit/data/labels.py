"""Label names: the one comparison of two label lists that the data checks and the model checks share.

Two models (or a model and the data) that disagree on the order of the labels would silently average the
probabilities of different classes, so every place that meets a second list of label names compares it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelMismatch:
    """How ``got`` differs from ``expected``."""

    got: list[str]
    expected: list[str]

    @property
    def reordered(self) -> bool:
        """The same names in a different order (label ids would mean different classes)."""
        return sorted(self.got) == sorted(self.expected)

    @property
    def missing(self) -> list[str]:
        return [n for n in self.expected if n not in self.got]

    @property
    def extra(self) -> list[str]:
        return [n for n in self.got if n not in self.expected]


def label_mismatch(expected: Sequence[object], got: Sequence[object]) -> LabelMismatch | None:
    """``None`` when ``got`` lists the same label names as ``expected`` in the same order, else how it differs."""
    expected_names, got_names = [str(n) for n in expected], [str(n) for n in got]
    if expected_names == got_names:
        return None
    return LabelMismatch(got=got_names, expected=expected_names)

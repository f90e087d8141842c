"""Data: loading local files or hub datasets, checking every row, and the labeled / unlabeled / tune split."""

from kdkit.data.labels import LabelMismatch, label_mismatch
from kdkit.data.splits import FORMATS, Splits, label_names_consistent, load_splits

__all__ = ["FORMATS", "LabelMismatch", "Splits", "label_mismatch", "label_names_consistent", "load_splits"]

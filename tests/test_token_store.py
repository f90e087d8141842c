"""Tokenize once (issue 12): splits are tokenized once per (tokenizer, texts, max_length), kept on disk in flat
int32 / uint8 arrays, read back by every later stage and run, rebuilt when damaged; fingerprints are read through
Arrow and equal the row-by-row hashes they replace; a finished run reruns without tokenizing anything."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from rich.console import Console

from helpers_models import FILLER, POSITIVE, count_tokenizations, make_bert, make_tokenizer, quick_recipe, sentences
from helpers_reliability import one_thread
from kdkit.modeling.tokenize import encode, tokenized
from kdkit.recipe import validate_recipe
from kdkit.stages.run import run_recipe
from kdkit.store.hashing import arrow_column, hash_arrow_columns, hash_columns
from kdkit.store.logits import CacheWarning
from kdkit.store.tokens import TokenArrays, TokenStore, read_tokens, write_tokens
from kdkit.training import EncodedDataset


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _split(count: int, seed: int = 1) -> datasets.Dataset:
    rows = sentences(count, seed=seed)
    return datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows], "label": [r["label"] for r in rows]})


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows handed to the tokenizer, one entry per tokenization."""
    return count_tokenizations(monkeypatch)


# --------------------------------------------------------------------------- fingerprints through Arrow
def test_arrow_hashes_equal_the_row_by_row_hashes() -> None:
    rng = random.Random(3)
    alphabet = "ab \x1f\x1e\u00e9\u20ac\U0001f600xyz0"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(700)]
    numbers = [rng.randint(-300, 300) for _ in range(700)]
    ds = datasets.Dataset.from_dict({"t": texts, "n": numbers})
    # the reference: the byte stream spelled out by hand, "\x1ecol" then "\x1f" + str(value) per value
    import hashlib

    stream = b"".join(
        b"\x1ecol" + b"".join(b"\x1f" + str(v).encode("utf-8") for v in column) for column in (texts, numbers, [700])
    )
    expected = hashlib.sha256(stream).hexdigest()[:32]
    assert hash_columns([texts, numbers, [700]], length=32) == expected
    assert hash_arrow_columns([arrow_column(ds, "t"), arrow_column(ds, "n"), [700]], length=32) == expected
    # selected rows (an indices mapping), and a column cut into chunks with offsets, hash as their values do
    picked = [5, 699, 0, 5]
    assert hash_arrow_columns([arrow_column(ds.select(picked), "t")]) == hash_columns([[texts[i] for i in picked]])
    chunked = pa.chunked_array([pa.array(["zz", *texts[:300]]).slice(1), pa.array(texts[300:])])
    assert hash_arrow_columns([chunked]) == hash_columns([texts])
    assert hash_arrow_columns([pa.chunked_array([pa.array(texts, pa.large_string())])]) == hash_columns([texts])


# --------------------------------------------------------------------------- arrays
def test_token_arrays_hold_what_the_tokenizer_returns_in_flat_narrow_arrays(tokenizer: Any) -> None:
    ds = _split(40)
    arrays = encode(tokenizer, ds, ["sentence"], 9)
    reference = tokenizer(list(ds["sentence"]), truncation=True, max_length=9)
    assert arrays.num_rows == 40
    assert [arrays["input_ids"][i] for i in range(40)] == reference["input_ids"]
    assert [arrays["token_type_ids"][i] for i in range(40)] == reference["token_type_ids"]
    assert "attention_mask" not in arrays  # all ones without padding: padding makes it again
    assert arrays.columns["input_ids"].dtype == np.int32 and arrays.columns["token_type_ids"].dtype == np.uint8
    total = sum(len(r) for r in reference["input_ids"])
    assert arrays.nbytes == 8 * 41 + 4 * total + 1 * total  # offsets int64, ids int32, token types uint8
    # a batch of equal-length rows without padding, with the attention mask a model takes
    same = [i for i in range(40) if len(reference["input_ids"][i]) == 9][:3]
    batch = arrays.batch(same, ["attention_mask"])
    assert batch["input_ids"].tolist() == [reference["input_ids"][i] for i in same]
    assert batch["attention_mask"].tolist() == [[1] * 9] * len(same)
    # the training set reads them row by row; labels and rows as int64 arrays
    data = EncodedDataset(arrays, ds["label"], kd_index=range(40))
    assert data[7] == {**{k: reference[k][7] for k in ("input_ids", "token_type_ids")}, "labels": ds[7]["label"],
                       "kd_index": 7}


def test_token_files_round_trip_and_refuse_damage(tmp_path: Path, tokenizer: Any) -> None:
    arrays = encode(tokenizer, _split(30), ["sentence"], 12)
    path = tmp_path / "t.safetensors"
    write_tokens(path, arrays, {"label": "x"})
    back = read_tokens(path, rows=30)
    assert back.offsets.tolist() == arrays.offsets.tolist()
    assert all(np.array_equal(back.columns[k], arrays.columns[k]) for k in arrays)
    with pytest.raises(ValueError, match="holds 30 rows, the split has 31"):
        read_tokens(path, rows=31)
    data = bytearray(path.read_bytes())
    data[-8 * 31 - 3] ^= 0x01  # one bit of a token type (tensors in name order: the 31 int64 offsets come last)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_tokens(path)
    data[-1] ^= 0x01  # the last offset
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="inconsistent"):
        read_tokens(path)


# --------------------------------------------------------------------------- the store
def test_a_split_is_tokenized_once_and_keyed_by_tokenizer_data_and_max_length(
    tmp_path: Path, tokenizer: Any, counted: list[int]
) -> None:
    store = TokenStore(tmp_path)
    ds = _split(50)
    first = tokenized(tokenizer, ds, ["sentence"], 12, store)
    again = tokenized(tokenizer, ds, ["sentence"], 12, TokenStore(tmp_path))  # another object: read from disk
    assert counted == [50]
    assert again.offsets.tolist() == first.offsets.tolist()
    assert all(np.array_equal(again.columns[k], first.columns[k]) for k in first)
    # another max_length, other texts, another tokenizer: each another entry, tokenized once
    tokenized(tokenizer, ds, ["sentence"], 11, store)
    tokenized(tokenizer, ds.select(range(49)), ["sentence"], 12, store)
    other = make_tokenizer(tmp_path / "other", texts=[" ".join(POSITIVE + FILLER)])
    tokenized(other, ds, ["sentence"], 12, store)
    assert counted == [50, 50, 49, 50]
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 4
    tokenized(other, ds, ["sentence"], 12, store)
    assert counted == [50, 50, 49, 50] and store.built == 4 and store.read == 1


def test_a_damaged_entry_is_reported_and_rebuilt(tmp_path: Path, tokenizer: Any, counted: list[int]) -> None:
    ds = _split(20)
    first = tokenized(tokenizer, ds, ["sentence"], 12, TokenStore(tmp_path))
    [path] = list((tmp_path / "tokens").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    console = Console(file=io.StringIO(), width=300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = tokenized(tokenizer, ds, ["sentence"], 12, TokenStore(tmp_path, console))
    assert counted == [20, 20]
    assert any(issubclass(w.category, CacheWarning) for w in caught)
    assert f"token cache {path.name}" in console.file.getvalue() and "rebuilding it" in console.file.getvalue()
    assert all(np.array_equal(rebuilt.columns[k], first.columns[k]) for k in first)
    assert read_tokens(path, 20).num_rows == 20


# --------------------------------------------------------------------------- a whole run
def test_a_run_tokenizes_each_split_once_and_a_finished_run_not_at_all(
    tmp_path: Path, counted: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_bert(tmp_path / "base", layers=1, seed=0)
    data = quick_recipe(tmp_path, base, **{"teachers.max_steps": 2, "student.max_steps": 2})
    recipe = validate_recipe(data)
    console = Console(file=io.StringIO(), width=200)
    first = run_recipe(recipe, console=console, print_table=False)
    # teachers and student share the base model's tokenizer: labeled (training the teachers, their outputs and
    # the student), unlabeled, tune and eval are each tokenized once in the whole run
    sizes = first["data"]
    assert sorted(counted) == sorted([sizes["labeled"], sizes["unlabeled"], sizes["tune"], sizes["eval"]])

    # the same recipe again: every student run is finished, so nothing is tokenized and no model loaded
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the student's tokenizer was loaded for a finished run")

    monkeypatch.setattr("kdkit.stages.students.load_tokenizer", forbidden)
    counted.clear()
    again = run_recipe(recipe, console=console, print_table=False)
    assert counted == []
    assert [r["reused"] for r in again["student"]["runs"]] == [True]
    assert again["student"]["runs"][0]["metrics"] == first["student"]["runs"][0]["metrics"]
    monkeypatch.undo()

    # another student seed: a new run, whose splits come from the token store (still no tokenization)
    monkeypatch.setattr("kdkit.modeling.tokenize.encode_rows", lambda *a, **k: pytest.fail("tokenized again"))
    third = run_recipe(validate_recipe({**data, "seeds": [2]}), console=console, print_table=False)
    assert [r["reused"] for r in third["student"]["runs"]] == [False]
    assert torch.isfinite(torch.tensor(third["student"]["mean"]["accuracy"]))


def test_cache_files_have_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """The safetensors library orders a header's metadata by a hash map seeded per process, so two processes
    saving the same tensor write different bytes; kdkit's files depend on their content only."""
    script = (
        "import sys, torch, safetensors.torch as st\n"
        "from pathlib import Path\n"
        "from kdkit.store.logits import write_logits\n"
        "t = torch.arange(12, dtype=torch.float32).reshape(6, 2)\n"
        "info = {'teacher': 't', 'split': 's', 'teacher_key': 'k', 'a': '1', 'b': '2', 'c': '3'}\n"
        "write_logits(Path(sys.argv[1]) / 'kdkit.safetensors', t, info)\n"
        "Path(sys.argv[1], 'library.safetensors').write_bytes(st.save({'logits': t}, metadata=info))\n"
    )
    runs = []
    for i in range(3):
        out = tmp_path / str(i)
        out.mkdir()
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=120)
        runs.append(out)
    kdkit_files = {(r / "kdkit.safetensors").read_bytes() for r in runs}
    assert len(kdkit_files) == 1
    assert len({(r / "library.safetensors").read_bytes() for r in runs}) > 1  # why kdkit writes its own header
    from safetensors.torch import load

    assert load(kdkit_files.pop())["logits"].tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0],
                                                         [8.0, 9.0], [10.0, 11.0]]

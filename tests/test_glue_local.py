"""GLUE's loading path without the network.

Small files in GLUE's own column layout (the columns, label names and split names of the hub's ``nyu-mll/glue``
configs qqp, sst2, mnli and qnli, test splits labelled -1) go through ``files = {...}``, and through the hub
path with ``datasets.load_dataset`` replaced by a function that serves those files.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from kdkit.data import load_splits
from kdkit.errors import DataError
from kdkit.recipe import DataConfig, parse_toml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# GLUE's layout, as the dataset card of nyu-mll/glue lists it
GLUE = {
    "qqp": {
        "text": ["question1", "question2"],
        "names": ["not_duplicate", "duplicate"],
        "splits": ["train", "validation", "test"],
        "eval": "validation",
    },
    "sst2": {
        "text": ["sentence"],
        "names": ["negative", "positive"],
        "splits": ["train", "validation", "test"],
        "eval": "validation",
    },
    "mnli": {
        "text": ["premise", "hypothesis"],
        "names": ["entailment", "neutral", "contradiction"],
        "splits": ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"],
        "eval": "validation_matched",
    },
    "qnli": {
        "text": ["question", "sentence"],
        "names": ["entailment", "not_entailment"],
        "splits": ["train", "validation", "test"],
        "eval": "validation",
    },
}
SIZES = {"train": 24}  # every other split: 6 rows


def glue_split(task: str, split: str) -> datasets.Dataset:
    """Rows in GLUE's columns and feature types; the texts say which task, split, row and column they are."""
    spec = GLUE[task]
    n = SIZES.get(split, 6)
    columns = {c: [f"{task} {split} row {i} {c} text ?" for i in range(n)] for c in spec["text"]}
    labels = [-1] * n if split.startswith("test") else [i % len(spec["names"]) for i in range(n)]
    features = {c: datasets.Value("string") for c in spec["text"]}
    features["label"] = datasets.ClassLabel(names=spec["names"])
    features["idx"] = datasets.Value("int32")
    return datasets.Dataset.from_dict(
        {**columns, "label": labels, "idx": list(range(n))}, features=datasets.Features(features)
    )


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    for task, spec in GLUE.items():
        for split in spec["splits"]:
            glue_split(task, split).to_parquet(str(root / f"{task}-{split}.parquet"))
    return root


def check_against_source(splits, task: str, eval_split: str) -> None:
    spec = GLUE[task]
    assert splits.text_columns == spec["text"]
    assert splits.label_names == spec["names"]  # from the ClassLabel feature, in GLUE's id order
    train, evaluation = glue_split(task, "train"), glue_split(task, eval_split)
    for part, source in ((splits.labeled, train), (splits.unlabeled, train), (splits.eval, evaluation)):
        assert part.column_names == [*spec["text"], "label", "row"]  # GLUE's idx is not carried along
        for record in part:
            original = source[record["row"]]
            for column in spec["text"]:  # both sentences of a pair stay together, in their columns
                assert record[column] == original[column]
            if part is not splits.unlabeled:
                assert record["label"] == original["label"]
    assert set(splits.unlabeled["label"]) == {-100}
    assert len(splits.labeled) + len(splits.unlabeled) + (len(splits.tune) if splits.tune else 0) == 24
    assert len(splits.eval) == 6


@pytest.mark.parametrize("task", GLUE)
def test_glue_layout_from_local_parquet_files(glue_dir, task):
    spec = GLUE[task]
    files = {split: str(glue_dir / f"{task}-{split}.parquet") for split in spec["splits"]}
    cfg = DataConfig(files=files, text=spec["text"], eval_split=spec["eval"])
    splits = load_splits(cfg)
    check_against_source(splits, task, spec["eval"])
    # 24 rows: 12 labeled (1 held out for tuning, round(12 * 0.1)), 12 unlabeled
    assert (len(splits.labeled), len(splits.tune), len(splits.unlabeled)) == (11, 1, 12)


def test_mnli_mismatched_is_a_separate_eval_split(glue_dir):
    spec = GLUE["mnli"]
    files = {split: str(glue_dir / f"mnli-{split}.parquet") for split in spec["splits"]}
    cfg = DataConfig(files=files, text=spec["text"], eval_split="validation_mismatched")
    splits = load_splits(cfg)
    assert all("validation_mismatched" in p for p in splits.eval["premise"])


def test_glue_pairs_from_jsonl_with_integer_labels(tmp_path):
    # GLUE's qqp columns as jsonl: the labels are bare ids, so the recipe names them
    paths = {}
    for split in ("train", "validation"):
        ds = glue_split("qqp", split)
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in ds.to_list()), encoding="utf-8")
    cfg = DataConfig(
        files={k: str(v) for k, v in paths.items()},
        text=["question1", "question2"],
        label_names=["not_duplicate", "duplicate"],
    )
    check_against_source(load_splits(cfg), "qqp", "validation")
    # without names the ids stand for themselves
    assert load_splits(cfg.model_copy(update={"label_names": None})).label_names == ["0", "1"]


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records the call and serves the local GLUE files."""

    def __init__(self, glue_dir: Path) -> None:
        self.glue_dir = glue_dir
        self.calls: list[tuple] = []

    def __call__(self, path, name=None, **kwargs):
        self.calls.append((path, name, kwargs))
        if path != "nyu-mll/glue" or name not in GLUE:
            raise FileNotFoundError(f"no dataset {path}/{name} here")
        return datasets.DatasetDict(
            {
                split: datasets.Dataset.from_parquet(str(self.glue_dir / f"{name}-{split}.parquet"))
                for split in GLUE[name]["splits"]
            }
        )


@pytest.mark.parametrize("task", GLUE)
def test_paper_recipe_data_through_the_hub_path(glue_dir, monkeypatch, task):
    hub = FakeHub(glue_dir)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    table = parse_toml(RECIPES / f"unikd_{task}.toml")["data"]
    cfg = DataConfig.model_validate(table)
    splits = load_splits(cfg)
    assert hub.calls == [("nyu-mll/glue", task, {})]  # the dataset and its GLUE config, every split at once
    check_against_source(splits, task, GLUE[task]["eval"])
    assert splits.tune is None  # the paper recipes hold nothing out


def test_hub_test_split_with_hidden_labels_is_refused(glue_dir, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(glue_dir))
    cfg = DataConfig(dataset="nyu-mll/glue", config="sst2", text=["sentence"], eval_split="test")
    with pytest.raises(DataError) as info:
        load_splits(cfg)
    message = str(info.value)
    assert "split 'test' of hub dataset 'nyu-mll/glue' (config 'sst2'), row 0: label -1" in message
    assert "GLUE's test splits" in message


def test_hub_mnli_needs_its_own_eval_split_name(glue_dir, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(glue_dir))
    cfg = DataConfig(dataset="nyu-mll/glue", config="mnli", text=["premise", "hypothesis"])  # eval "validation"
    with pytest.raises(DataError, match=r"no split 'validation' \(did you mean 'validation_matched'\?\)"):
        load_splits(cfg)

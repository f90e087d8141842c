"""The causal-LM quickstart's base folder (kdkit/sources/bpe.py): a byte-level BPE trained on a jsonl file and a
Llama config of its vocabulary, written once (a second call does nothing), and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from helpers_lm_pipeline import documents
from kdkit.errors import DataError
from kdkit.sources.bpe import BaseSettings, main, prepare


def corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60, seed=3)), encoding="utf-8")
    return path


def test_writes_a_tokenizer_and_a_config_once(tmp_path) -> None:
    data = corpus(tmp_path / "train.jsonl")
    settings = BaseSettings(vocab_size=300, layers=1, hidden=32)
    first = prepare(data, tmp_path / "base", settings)
    assert not first.skipped and first.vocab_size == 300
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    config = AutoConfig.from_pretrained(str(tmp_path / "base"))
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (300, 32, 1)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    text = "the senate approved ünïcode ☃ in 1801."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: nothing is unknown
    stamp = (tmp_path / "base" / "tokenizer.json").stat().st_mtime_ns
    assert prepare(data, tmp_path / "base", settings).skipped
    assert (tmp_path / "base" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert not prepare(data, tmp_path / "base", BaseSettings(vocab_size=280, layers=1, hidden=32)).skipped


def test_bad_input_names_the_file_and_line(tmp_path, capsys) -> None:
    with pytest.raises(DataError, match="file not found"):
        prepare(tmp_path / "missing.jsonl", tmp_path / "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    assert main(["--data", str(bad), "--out", str(tmp_path / "base")]) == 2
    assert f"{bad}, line 2: no text field 'text'" in capsys.readouterr().err

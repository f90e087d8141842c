"""Causal-LM data: loading and splitting rows (kdkit.data.lm) and turning them into token sequences whose targets,
prompts and generated marks are the ones docs/RECIPES.md promises (kdkit.data.tokens). Expected tokens come from
the tokenizer itself, cut and joined by hand here."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from helpers_lm_pipeline import documents, make_lm_base, write_lm_data
from helpers_models import write_jsonl
from kdkit.data.lm import load_lm_splits
from kdkit.data.tokens import Encoding, TokenSequences, encode_split
from kdkit.errors import DataError
from kdkit.recipe.schema import DataConfig
from kdkit.store.topk import sequence_key


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(make_lm_base(tmp_path_factory.mktemp("base") / "base")))


def rows(**columns) -> datasets.Dataset:
    first = next(iter(columns.values()))
    return datasets.Dataset.from_dict({**columns, "row": list(range(len(first)))})


# ----------------------------------------------------------------------------------------------- text
def test_text_targets_every_token_after_the_first_and_appends_the_end_token(tokenizer):
    text = documents(1, seed=5)[0]
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    seqs = encode_split(tokenizer, rows(text=[text]), ["text"], Encoding("text", 500), split="train", prompts=False)
    assert seqs.ids[0].tolist() == ids
    assert seqs.targets[0].tolist() == [False] + [True] * (len(ids) - 1)
    labels, generated = seqs.labels(0)
    assert labels.tolist() == ids[1:] and not generated.any()
    assert seqs.keys == [sequence_key(ids)]


def test_long_text_is_truncated_or_split_into_windows_that_predict_every_token_once(tokenizer):
    text = " ".join(documents(3, seed=6))
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids)
    assert n > 30
    cut = encode_split(tokenizer, rows(text=[text]), ["text"], Encoding("text", 12), split="train", prompts=False)
    assert [s.tolist() for s in cut.ids] == [ids[:12]]
    split = encode_split(tokenizer, rows(text=[text]), ["text"], Encoding("text", 12, "split"), split="t", prompts=False)
    # windows of 12 starting every 11 tokens: [0:12], [11:23], [22:34], ...; each repeats its predecessor's last token
    expected = [ids[s : s + 12] for s in range(0, n - 1, 11) if len(ids[s : s + 12]) >= 2]
    assert [s.tolist() for s in split.ids] == expected
    predicted = [tok for i in range(len(split)) for tok in split.labels(i)[0].tolist()]
    assert predicted == ids[1:]  # every token but the first, exactly once, in order


def test_an_unlabeled_document_keeps_its_first_prompt_tokens(tokenizer):
    long, short = documents(1, seed=7)[0], "the union"
    seqs = encode_split(
        tokenizer, rows(text=[long, short]), ["text"], Encoding("text", 64, prompt_tokens=5), split="u", prompts=True
    )
    assert seqs.ids[0].tolist() == tokenizer(long)["input_ids"][:5]
    short_ids = tokenizer(short)["input_ids"] + [tokenizer.eos_token_id]
    assert seqs.ids[1].tolist() == short_ids[: min(5, len(short_ids) - 1)]  # at most all but one token
    assert not np.concatenate(seqs.targets).any()


# ----------------------------------------------------------------------------------------------- prompt, completion
def test_prompt_completion_targets_the_completion_only(tokenizer):
    prompt, completion = "the senate approved", " the budget in 1801."
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = rows(prompt=[prompt], completion=[completion])
    seqs = encode_split(tokenizer, data, ["prompt", "completion"], Encoding("prompt-completion", 64), split="t",
                        prompts=False)  # fmt: skip
    assert seqs.ids[0].tolist() == p + c
    labels, _ = seqs.labels(0)
    assert labels.tolist() == [-100] * (len(p) - 1) + c  # position t predicts token t + 1
    prompts = encode_split(tokenizer, data, ["prompt", "completion"], Encoding("prompt-completion", 64), split="t",
                           prompts=True)  # fmt: skip
    assert prompts.ids[0].tolist() == p


def test_a_prompt_without_room_for_a_completion_is_an_error_naming_the_row(tokenizer):
    long = " ".join(documents(4, seed=8))
    data = rows(prompt=["the union", long], completion=["x.", "y."])
    with pytest.raises(DataError, match=r"split 'train', row 1: the prompt alone has \d+ tokens, no room for a "
                       r"completion in data.max_length = 16"):  # fmt: skip
        encode_split(tokenizer, data, ["prompt", "completion"], Encoding("prompt-completion", 16), split="train",
                     prompts=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------- chat
def chat(*turns: tuple[str, str]) -> str:
    return json.dumps([{"role": r, "content": c} for r, c in turns], sort_keys=True)


def test_chat_targets_the_assistant_messages_with_their_end_of_turn(tokenizer):
    value = chat(("user", "who approved it"), ("assistant", "the senate did"), ("user", "when"),
                 ("assistant", "in 1801"))  # fmt: skip
    seqs = encode_split(tokenizer, rows(messages=[value]), ["messages"], Encoding("chat", 128), split="t", prompts=False)
    ids, targets = seqs.ids[0], seqs.targets[0]
    rendered = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in
                       [("user", "who approved it"), ("assistant", "the senate did"), ("user", "when"),
                        ("assistant", "in 1801")])  # fmt: skip
    assert tokenizer.decode(ids.tolist()) == rendered
    # the target tokens, joined, are the two replies with their end-of-turn markup and nothing else
    runs, current = [], []
    for tok, is_target in zip(ids.tolist(), targets.tolist(), strict=True):
        if is_target:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    runs.append(current) if current else None
    assert [tokenizer.decode(r) for r in runs] == ["the senate did<|im_end|>\n", "in 1801<|im_end|>\n"]

    prompt = encode_split(tokenizer, rows(messages=[value]), ["messages"], Encoding("chat", 128), split="t",
                          prompts=True)  # fmt: skip
    expected = rendered.rsplit("<|im_start|>assistant\n", 1)[0] + "<|im_start|>assistant\n"
    assert tokenizer.decode(prompt.ids[0].tolist()) == expected


def test_chat_whose_reply_lies_beyond_max_length_is_an_error(tokenizer):
    value = chat(("user", " ".join(documents(3, seed=9))), ("assistant", "yes"))
    with pytest.raises(DataError, match=r"split 'train', row 0: the first assistant token is token \d+, beyond "
                       r"data.max_length = 20"):  # fmt: skip
        encode_split(tokenizer, rows(messages=[value]), ["messages"], Encoding("chat", 20), split="train",
                     prompts=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------- loading and splits
def test_splits_keep_half_of_the_rows_labeled_and_mark_the_rest(tmp_path):
    files = write_lm_data(tmp_path, "text", train=40, dev=10)
    cfg = DataConfig(files=files, text=["text"], labeled_fraction=0.5, tune_fraction=0.25, max_length=64)
    splits = load_lm_splits(cfg)
    assert (len(splits.labeled), len(splits.tune), len(splits.unlabeled), len(splits.eval)) == (15, 5, 20, 10)
    assert set(splits.labeled["label"]) == {0} and set(splits.unlabeled["label"]) == {-100}
    train = [json.loads(line)["text"] for line in Path(files["train"]).read_text().splitlines()]
    seen = sorted(list(splits.labeled["row"]) + list(splits.tune["row"]) + list(splits.unlabeled["row"]))
    assert seen == list(range(40))
    assert [train[r] for r in splits.unlabeled["row"]] == list(splits.unlabeled["text"])
    assert splits.label_names == [] and splits.text_columns == ["text"]
    again = load_lm_splits(cfg)
    assert again.fingerprint == splits.fingerprint
    # how rows become tokens is part of the fingerprint, so that students trained on other sequences differ
    assert load_lm_splits(cfg.model_copy(update={"prompt_tokens": 8})).fingerprint != splits.fingerprint


def test_bad_chat_rows_are_errors_naming_the_row(tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cases = [
        ([{"role": "user", "content": "hi"}], r"row 1: column 'messages': the conversation has no assistant"),
        ([{"role": "robot", "content": "hi"}], r"row 1: column 'messages', message 0: unknown role 'robot'"),
        ([{"role": "user"}], r"row 1: column 'messages', message 0: must hold a text 'role' and a text 'content'"),
    ]
    for bad, message in cases:
        files = {
            "train": str(write_jsonl(tmp_path / "train.jsonl", [{"messages": good}, {"messages": bad}] * 2)),
            "validation": str(write_jsonl(tmp_path / "dev.jsonl", [{"messages": good}])),
        }
        cfg = DataConfig(files=files, text=["messages"], format="chat", tune_fraction=0.0)
        with pytest.raises(DataError, match=message):
            load_lm_splits(cfg)


def test_token_sequences_concatenate_and_count_positions():
    a = TokenSequences()
    a.add([5, 6, 7], [False, True, True], row=0)
    b = TokenSequences()
    b.add([1, 2, 3, 4], [False, False, False, False], row=3, generated=[False, False, True, True])
    both = TokenSequences.concat([a, b])
    assert both.rows == [0, 3] and both.position_count() == (2, 2)
    labels, generated = both.labels(1)
    assert labels.tolist() == [-100, -100, -100] and generated.tolist() == [False, True, True]

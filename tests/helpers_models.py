"""Tiny models and data for pipeline tests: a word-level tokenizer trained on synthetic sentences, random
BERT configs (hidden 32, 1-2 layers), and sentences whose label is given by a keyword.

Everything is built locally (no hub), in well under a second.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

POSITIVE = ("good", "great", "fine", "lovely")
NEGATIVE = ("bad", "awful", "poor", "dull")
FILLER = tuple(
    "the a this that movie film plot story actor scene music script ending was is felt seemed quite very rather "
    "really so and but with of in on it its we they i".split()
)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def sentences(count: int, *, seed: int = 0, noise: float = 0.0) -> list[dict[str, Any]]:
    """``count`` rows ``{"sentence", "label"}``: label 1 iff the sentence holds a positive keyword.

    :param noise: share of rows whose label is flipped (so that teachers disagree and ensembling matters).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        if rng.random() < noise:
            label = 1 - label
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def pairs(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Sentence pairs: label 1 iff both halves carry the same polarity."""
    a, b = sentences(count, seed=seed), sentences(count, seed=seed + 1)
    return [
        {"sentence1": x["sentence"], "sentence2": y["sentence"], "label": int(x["label"] == y["label"])}
        for x, y in zip(a, b, strict=True)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tokenizer(directory: Path, texts: list[str] | None = None) -> Any:
    """A word-level BERT-style tokenizer ([CLS] a [SEP] b [SEP]) over the synthetic vocabulary, saved to
    ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [" ".join(POSITIVE + NEGATIVE + FILLER)]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL)))
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_bert(
    directory: Path,
    *,
    layers: int = 2,
    hidden: int = 32,
    seed: int = 0,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
) -> Path:
    """A random tiny BERT saved (safetensors) with its tokenizer in ``directory``.

    Without ``num_labels`` it is a base model (``BertModel``), as a pretrained hub model would be; with it, a
    fine-tuned classifier checkpoint.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if num_labels is None:
        model = BertModel(config)
    else:
        config.num_labels = num_labels
        if label_names is not None:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(directory))
    return directory


def base_and_two_teachers(root: Path, label_names: list[str]) -> dict[str, Path]:
    """A 1-layer random BERT to train (``base``) and two fine-tuned-looking teachers of it (``t1``, ``t2``) with
    ``label_names``: the set-up of the tests that give a recipe teacher checkpoints instead of training them."""
    return {
        "base": make_bert(root / "base", layers=1, seed=0),
        "t1": make_bert(root / "t1", layers=1, seed=1, num_labels=len(label_names), label_names=label_names),
        "t2": make_bert(root / "t2", layers=1, seed=2, num_labels=len(label_names), label_names=label_names),
    }


def quick_recipe(tmp_path: Path, model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A recipe mapping for a tiny end-to-end run on synthetic data written under ``tmp_path``."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", sentences(240, seed=1, noise=0.1))
    dev = write_jsonl(tmp_path / "data" / "dev.jsonl", sentences(80, seed=2))
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seeds": [1],
        "output_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"),
        "data": {
            "files": {"train": str(train), "validation": str(dev)},
            "text": ["sentence"],
            "label_names": ["negative", "positive"],
            "labeled_fraction": 0.5,
            "tune_fraction": 0.1,
            "max_length": 24,
        },
        "teachers": {
            "model": str(model_dir),
            "seeds": [1, 2],
            "learning_rate": 5e-3,
            "batch_size": 16,
            "epochs": 2,
            "logging_steps": 5,
        },
        "student": {
            "model": str(model_dir),
            "num_layers": 1,
            "learning_rate": 5e-3,
            "batch_size": 16,
            "epochs": 1,
            "save_steps": 5,
            "logging_steps": 5,
        },
    }
    for dotted, value in overrides.items():
        node = recipe
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return recipe


def count_tokenizations(monkeypatch: Any) -> list[int]:
    """Record every tokenization kdkit runs (``kdkit.modeling.tokenize.encode_rows``): one entry per call, the
    number of rows it tokenized. Reads from the token store are not tokenizations."""
    import kdkit.modeling.tokenize

    calls: list[int] = []
    real = kdkit.modeling.tokenize.encode_rows

    def counting(tokenizer: Any, dataset: Any, columns: Any, max_length: int, start: int, stop: int) -> Any:
        calls.append(stop - start)
        return real(tokenizer, dataset, columns, max_length, start, stop)

    monkeypatch.setattr("kdkit.modeling.tokenize.encode_rows", counting)
    return calls

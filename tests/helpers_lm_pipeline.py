"""Tiny causal-LM runs for the pipeline tests: a byte-level BPE tokenizer (with a chat template) and a 2-layer
Llama config saved as a base "model" without weights, text / prompt-completion / chat data written as jsonl, and
causal-lm recipes over them. Everything is built locally in well under a second."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from helpers_models import write_jsonl

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMES = ("the senate", "the house", "the people", "the union", "the nation", "congress", "the army", "our navy")
VERBS = ("approved", "rejected", "debated", "funded", "praised", "reviewed", "delayed", "expanded")
OBJECTS = ("the budget", "a treaty", "the tariff", "new roads", "the schools", "the courts", "a canal", "the banks")


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} in {rng.randint(1790, 1830)}."


def documents(count: int, seed: int = 0, sentences: tuple[int, int] = (2, 4)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(*sentences))) for _ in range(count)]


def make_lm_base(directory: Path, *, vocab_size: int = 160, layers: int = 2, hidden: int = 32) -> Path:
    """A BPE tokenizer trained on :func:`documents` and a Llama config.json (no weights) in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents(200, seed=99) + ["user assistant system hello"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(str(directory))
    return directory


def write_lm_data(directory: Path, fmt: str, *, train: int = 48, dev: int = 12) -> dict[str, str]:
    """``train.jsonl`` and ``dev.jsonl`` in ``fmt`` (``text``, ``prompt-completion`` or ``chat``); the files table."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for split, count, seed in (("train", train, 1), ("dev", dev, 2)):
        docs = documents(count, seed=seed)
        if fmt == "text":
            rows[split] = [{"text": d} for d in docs]
        elif fmt == "prompt-completion":
            rows[split] = [{"prompt": d.split(" in ")[0], "completion": " in " + d.split(" in ", 1)[1]} for d in docs]
        else:
            rows[split] = [
                {"messages": [{"role": "user", "content": d.split(" ")[1]}, {"role": "assistant", "content": d.split(".")[0]}]}
                for d in docs
            ]
    return {
        "train": str(write_jsonl(directory / f"{fmt}-train.jsonl", rows["train"])),
        "validation": str(write_jsonl(directory / f"{fmt}-dev.jsonl", rows["dev"])),
    }


def lm_recipe(root: Path, base: Path, fmt: str = "text", **changes: Any) -> dict[str, Any]:
    """A causal-lm recipe: 2 fresh 2-layer teachers, a fresh 1-layer student, a few steps each."""
    columns = {"text": ["text"], "prompt-completion": ["prompt", "completion"], "chat": ["messages"]}[fmt]
    train = {"batch_size": 4, "max_steps": 4, "learning_rate": 3e-3, "logging_steps": 2, "eval_batch_size": 8}
    recipe: dict[str, Any] = {
        "name": f"lm-{fmt}",
        "task": "causal-lm",
        "seeds": [1],
        "output_dir": str(root / "runs"),
        "cache_dir": str(root / "cache"),
        "data": {
            "files": write_lm_data(root / "data", fmt), "text": columns, "format": fmt, "labeled_fraction": 0.5,
            "tune_fraction": 0.0, "max_length": 40, "prompt_tokens": 6,
        },
        "teachers": {"model": str(base), "seeds": [1, 2], "config": {"num_hidden_layers": 2}, **train,
                     "generation": {"max_new_tokens": 12, "seed": 3, "batch_size": 5}},  # fmt: skip
        "student": {"model": str(base), "config": {"num_hidden_layers": 1}, "save_steps": 2,
                    "label_only_baseline": True, **train},  # fmt: skip
        "distill": {"temperature": 1.0},
        "tokens": {"top_k": 8},
        "plugins": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 1.0}},
    }
    for dotted, value in changes.items():
        table = recipe
        *parents, last = dotted.split(".")
        for key in parents:
            table = table.setdefault(key, {})
        table[last] = value
    return recipe


def read_results(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "runs" / name / "results.json").read_text())

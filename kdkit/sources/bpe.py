"""A base "model" for causal LMs trained from scratch: a byte-level BPE tokenizer trained on a jsonl text file, and
a small Llama config.json beside it (no weights).

    python -m kdkit.sources.bpe --data .data/sotu/train.jsonl --out .data/sotu-bpe

writes into ``--out``

    tokenizer.json, tokenizer_config.json   the tokenizer (``<|endoftext|>`` pads and ends a document)
    config.json                              a Llama config of the tokenizer's vocabulary (--layers, --hidden)
    MANIFEST.json                            the settings, the sha256 of the training file and of every file above

A recipe names the folder as its teachers' and student's ``model`` and builds fresh models from it with a
``config`` table (``config = {num_hidden_layers = 1}``): the quickstart of causal-LM distillation
(``recipes/quickstart_lm.toml``) trains its teachers and students this way, because on a CPU a 1M-parameter Llama
with a 4,096-token vocabulary trained on the text itself reaches a usable perplexity in minutes, while SmolLM2 cut
to a few layers needs hundreds of steps of 10 s each (docs/notes in ``benchmarks/results/lm_plan_*.json``).

Why a BPE of 4,096 tokens: on the State of the Union text it needs 1.38 tokens a word (SmolLM2's 49,152-token
vocabulary: 1.18), and the output layer and the teachers' stores stay small; training it on the 20,846 training
chunks takes a few seconds. The vocabulary is byte-level: no text is unknown to it.

The run is idempotent like the data converters (:mod:`kdkit.sources.common`): when ``MANIFEST.json`` records the
same settings and training file and every file its checksum, nothing is done; files are written atomically and
the manifest last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import DataError, KdkitError
from kdkit.store.files import atomic_write_bytes, atomic_write_text
from kdkit.store.hashing import sha256_file

FORMAT = "kdkit-bpe-1"
MANIFEST = "MANIFEST.json"
FILES = ("tokenizer.json", "tokenizer_config.json", "config.json")
END = "<|endoftext|>"


@dataclass(frozen=True)
class BaseSettings:
    """The tokenizer's vocabulary size and the Llama config's shape."""

    vocab_size: int = 4096
    layers: int = 2
    hidden: int = 128
    max_positions: int = 256

    def as_dict(self) -> dict[str, object]:
        return {"format": FORMAT, "vocab_size": self.vocab_size, "layers": self.layers, "hidden": self.hidden,
                "max_positions": self.max_positions}  # fmt: skip


@dataclass
class Result:
    out: Path
    skipped: bool
    seconds: float
    vocab_size: int


def read_texts(path: Path, column: str = "text") -> list[str]:
    """The ``column`` of every row of a jsonl file. :raises DataError: naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (run `python -m kdkit.sources.sotu` first?)")
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get(column), str):
                raise DataError(f"{path}, line {number}: no text field '{column}'")
            texts.append(row[column])
    if not texts:
        raise DataError(f"{path}: holds no row")
    return texts


def is_complete(out: Path, expected: dict[str, object]) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("settings") == expected and all(
            sha256_file(out / name) == manifest["files"][name] for name in FILES
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> object:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (``<|endoftext|>`` is token 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END, pad_token=END)


def write_base(out: Path, texts: Sequence[str], settings: BaseSettings) -> int:
    """Train the tokenizer, write it and the config into ``out``; return the vocabulary size."""
    from transformers import LlamaConfig

    tokenizer = train_tokenizer(texts, settings.vocab_size)
    heads = max(1, settings.hidden // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden, intermediate_size=4 * settings.hidden,
        num_hidden_layers=settings.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=settings.max_positions, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder does not look complete
    saved = out / ".saving"
    tokenizer.save_pretrained(str(saved))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        atomic_write_bytes(out / name, (saved / name).read_bytes())
    for leftover in saved.iterdir():
        leftover.unlink()
    saved.rmdir()
    atomic_write_text(out / "config.json", config.to_json_string())
    return len(tokenizer)


def prepare(data: str | Path, out: str | Path, settings: BaseSettings = BaseSettings(), force: bool = False) -> Result:
    """Build ``out`` from the jsonl file ``data`` unless it is complete for these settings and this file."""
    start = time.perf_counter()
    data, out = Path(data), Path(out)
    if not data.is_file():
        raise DataError(f"{data}: file not found (run `python -m kdkit.sources.sotu` first?)")
    expected = {**settings.as_dict(), "data_sha256": sha256_file(data)}
    if not force and is_complete(out, expected):
        vocab = json.loads((out / "config.json").read_text(encoding="utf-8"))["vocab_size"]
        return Result(out, True, time.perf_counter() - start, vocab)
    vocab = write_base(out, read_texts(data), settings)
    manifest = {"settings": expected, "files": {name: sha256_file(out / name) for name in FILES}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Result(out, False, time.perf_counter() - start, vocab)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdkit.sources.bpe``: train the tokenizer and write the base folder once."""
    parser = argparse.ArgumentParser(prog="python -m kdkit.sources.bpe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=".data/sotu/train.jsonl", help="jsonl file with a 'text' field")
    parser.add_argument("--out", default=".data/sotu-bpe", help="output folder (default: .data/sotu-bpe)")
    parser.add_argument("--vocab-size", type=int, default=BaseSettings.vocab_size)
    parser.add_argument("--layers", type=int, default=BaseSettings.layers)
    parser.add_argument("--hidden", type=int, default=BaseSettings.hidden)
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = parser.parse_args(argv)
    try:
        settings = BaseSettings(vocab_size=args.vocab_size, layers=args.layers, hidden=args.hidden)
        result = prepare(args.data, args.out, settings, force=args.force)
    except KdkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    state = "already complete, nothing done" if result.skipped else f"written in {result.seconds:.1f} s"
    print(f"{result.out}: {state} (a byte-level BPE of {result.vocab_size} tokens and a Llama config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

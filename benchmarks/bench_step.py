"""(b) One student step: kdkit's distillation step over cached logits vs a plain ``Trainer`` fine-tuning step.

The same student (MiniLM cut to 3 layers, same initial weights), the same arguments (kdkit's
``training_arguments``), the same dataset order and therefore the same batches (checked), batch 32, sequences
truncated to 48 tokens and padded per batch. Every round builds a fresh Trainer per variant from the same
initial weights and runs ``steps + 1`` optimizer steps; a ``TrainerCallback`` times each step from
``on_step_begin`` to ``on_step_end`` and the first one (optimizer state allocation) is dropped.

Variants:

* ``plain Trainer``: stock ``transformers.Trainer``, the model's own cross-entropy;
* ``kdkit N=5 ...``: ``kdkit.training.make_trainer`` with 5 teachers' cached logits and ``DistillationLoss``
  with all UniKD plugins (``unikd-correctness`` + ``unikd-disagreement``): the target, <= 1.05x;
* ``kdkit N=1, 3, 10``: to show the step does not grow with N (with N = 1 only ``unikd-correctness``:
  disagreement needs two teachers);
* ``kdkit N=5 aekd``: AE-KD instead (it solves a small QP per stream per step).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common
from benchmarks import models as bench_models
from benchmarks import student_setup as ss
from benchmarks.common import Report, Sizes

UNIKD = {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}}


def plugins_for(n: int, kind: str = "unikd") -> dict[str, Any]:
    if kind == "aekd":
        return {"aekd": {}}
    return {"unikd-correctness": {}} if n == 1 else UNIKD


def run(sizes: Sizes, teacher_counts: tuple[int, ...] = (1, 3, 5, 10)) -> Report:
    from kdkit import DistillationLoss

    report = Report("step", "(b) Student step: kdkit (cached logits) vs plain Trainer fine-tuning")
    steps = sizes.steps + 1
    data = ss.student_data(sizes, samples=sizes.batch * (steps + 2))
    initial = common.minilm_classifier(sizes.student_layers, sizes.classes, seed=0)

    cpu: dict[str, list[float]] = {}

    def variant(build: Callable[[Any, Any], Any], name: str) -> Callable[[], list[float]]:
        def run_once() -> list[float]:
            model = copy.deepcopy(initial)
            args = ss.arguments(sizes, bench_models.fresh_dir("step"), max_steps=steps)
            trainer = build(model, args)
            timer = ss.StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            cpu.setdefault(name, []).extend(timer.cpu_times[1:])
            return timer.times[1:]

        return run_once

    variants: dict[str, Callable[[], list[float]]] = {
        "plain Trainer (CE)": variant(lambda m, a: ss.plain_trainer(m, data, a), "plain Trainer (CE)")
    }
    order = [5] + [n for n in teacher_counts if n != 5]
    for n in order:
        logits = ss.cached_logits(len(data), n, sizes.classes, seed=n)
        plugins = plugins_for(n)
        loss_fn = DistillationLoss.from_plugins(plugins)
        label = "+".join(p.replace("unikd-", "") for p in plugins)
        name = f"kdkit N={n} unikd ({label})"
        variants[name] = variant(
            lambda m, a, logits=logits, loss_fn=loss_fn: ss.kdkit_trainer(m, data, a, logits, loss_fn), name
        )
    if not sizes.quick:
        logits5 = ss.cached_logits(len(data), 5, sizes.classes, seed=5)
        aekd = DistillationLoss.from_plugins({"aekd": {}})
        variants["kdkit N=5 aekd"] = variant(lambda m, a: ss.kdkit_trainer(m, data, a, logits5, aekd), "kdkit N=5 aekd")

    # both sides see the same batches
    args = ss.arguments(sizes, bench_models.fresh_dir("check"), max_steps=steps)
    plain_sig = ss.batch_signature(ss.plain_trainer(copy.deepcopy(initial), data, args), steps)
    kd_sig = ss.batch_signature(
        ss.kdkit_trainer(copy.deepcopy(initial), data, args, ss.cached_logits(len(data), 5, sizes.classes),
                         DistillationLoss.from_plugins(UNIKD)),
        steps,
    )
    same = plain_sig == kd_sig
    if not same:
        raise RuntimeError("the plain and the kdkit Trainer do not see the same batches; the comparison is void")

    common.log(f"student step: {len(variants)} variants, {sizes.rounds} rounds of {steps} steps (first dropped)")
    samples = common.interleave(variants, sizes.rounds, log=common.log)
    rows = common.summarize(samples, baseline="plain Trainer (CE)")
    plain_cpu = statistics.median(cpu["plain Trainer (CE)"])
    for row in rows:
        med = statistics.median(cpu[row.name])
        row.extra["CPU time"] = common.fmt_time(med)
        row.extra["CPU ratio"] = f"{med / plain_cpu:.3f}x"
    report.data.update(rows=common.rows_data(rows), same_batches=same, source=data.source, mean_tokens=data.mean_tokens)
    report.add(
        f"Student MiniLM cut to {sizes.student_layers} layers, batch {sizes.batch}, max_length {sizes.seq} "
        f"(dynamic padding; {data.source}, {data.mean_tokens:.1f} tokens on average), "
        f"{sizes.rounds} interleaved rounds x {steps - 1} timed steps per variant; both sides checked to get "
        f"identical batches. kdkit batches are half labeled, half unlabeled. 'CPU time': process CPU time of a "
        "step (both threads; median), a second view, less sensitive to other processes taking the cores.\n\n"
        + common.time_table(rows, "median step", extra_cols=["CPU time", "CPU ratio"])
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)
    sizes = Sizes.quick_sizes() if args.quick else Sizes()
    if args.rounds:
        sizes.rounds = args.rounds
    if args.steps:
        sizes.steps = args.steps
    run(sizes)


if __name__ == "__main__":
    main()

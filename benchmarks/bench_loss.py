"""(a) What the distillation loss costs, hook dispatch included, as a fraction of one student step.

Variants, interleaved round by round:

* ``student step``: one plain fine-tuning step of the student (MiniLM cut to 3 layers; forward, cross-entropy,
  backward, AdamW) at batch 32 x seq 48: the denominator;
* ``CE only``: the loss plain fine-tuning computes (``F.cross_entropy`` and its backward, from the logits);
* ``DistillationLoss[...]``: kdkit's loss and its backward from the logits, hooks called through pluggy, on a
  mixed batch (half labeled, half unlabeled: both streams, so every hook is called twice: the worst case).

The loss cost is the time from logits to gradient-of-logits; the rest of a step (the model's forward and
backward, the optimizer) is the same whatever the loss. Target: kdkit's loss under 2% of a step.

Then the AE-KD solver alone (capped min-norm over N teachers), N = 2 .. 16: target under 1 ms.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import Report, Sizes


def loss_variants() -> dict[str, dict[str, Any]]:
    """``{label: plugin options}`` of the kdkit losses measured (only those whose plugins are installed)."""
    import kdkit

    registry = kdkit.discover_plugins()
    wanted = {
        "average (no plugin)": {},
        "unikd-correctness + unikd-disagreement": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}},
        "aekd": {"aekd": {}},
    }
    return {label: opts for label, opts in wanted.items() if all(n in registry.available() for n in opts)}


def make_logits(size: int, teachers: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(size, classes, generator=gen) * 2
    teacher = torch.randn(size, teachers, classes, generator=gen) * 2
    labels = torch.randint(0, classes, (size,), generator=gen)
    unlabeled = torch.randperm(size, generator=gen)[: size // 2]
    labels[unlabeled] = -100  # mixed batch: both streams
    return student, teacher, labels


def loss_block(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    calls: int,
) -> Callable[[], float]:
    """A variant: ``calls`` loss evaluations with backward; returns the mean seconds per call."""

    def run() -> float:
        start = common.now()
        for _ in range(calls):
            z = student.detach().requires_grad_(True)
            fn(z, teacher, labels).backward()
        return (common.now() - start) / calls

    return run


def kdkit_loss_fn(options: dict[str, Any], temperature: float = 1.0) -> Callable[..., torch.Tensor]:
    from kdkit import DistillationLoss

    loss = DistillationLoss.from_plugins(options, temperature=temperature)
    return lambda z, t, y: loss(z, t, y).loss


def ce_loss_fn(z: torch.Tensor, _t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z, y, ignore_index=-100)


def student_step_fn(sizes: Sizes, steps: int) -> Callable[[], list[float]]:
    """Plain fine-tuning steps of the student on fixed batches; returns the time of each step."""
    model = common.minilm_classifier(sizes.student_layers, sizes.classes, seed=0)
    model.train()
    texts, labels, _ = common.sentences(sizes.batch * 4, seed=1)
    batches = []
    for i in range(4):
        enc = common.encode(texts[i * sizes.batch : (i + 1) * sizes.batch], sizes.seq)
        enc["labels"] = torch.tensor(labels[i * sizes.batch : (i + 1) * sizes.batch])
        batches.append(enc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    counter = [0]

    def run() -> list[float]:
        times = []
        for _ in range(steps):
            batch = batches[counter[0] % len(batches)]
            counter[0] += 1
            start = common.now()
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(common.now() - start)
        return times

    return run


def bench_solver(report: Report, sizes: Sizes) -> None:
    """The AE-KD plugin's own solver (``kdkit_plugins.aekd.min_norm_capped_simplex``) and Gram matrix."""
    try:
        from kdkit_plugins import aekd
    except ImportError:
        report.add("AE-KD solver: plugin `aekd` not installed; skipped.")
        return
    rows = []
    reps = 50 if sizes.quick else 300
    for classes in (2, 10):
        for n in (2, 3, 4, 5, 8, 10, 12, 16):
            gen = torch.Generator().manual_seed(n)
            student_probs = torch.softmax(torch.randn(sizes.batch, classes, generator=gen), -1)
            teacher_probs = torch.softmax(torch.randn(sizes.batch, n, classes, generator=gen) * 2, -1)
            gram = aekd.gradient_gram(student_probs, teacher_probs).tolist()
            solve, whole = [], []
            for _ in range(reps):
                start = common.now()
                aekd.min_norm_capped_simplex(gram, 0.6)
                solve.append(common.now() - start)
                start = common.now()
                aekd.min_norm_capped_simplex(aekd.gradient_gram(student_probs, teacher_probs).tolist(), 0.6)
                whole.append(common.now() - start)
            med = statistics.median(solve)
            rows.append(
                [
                    n,
                    classes,
                    common.fmt_time(med),
                    common.fmt_time(common.quantile(solve, 0.9)),
                    common.fmt_time(max(solve)),
                    common.fmt_time(statistics.median(whole)),
                    "yes" if med < 1e-3 else "NO",
                ]
            )
            report.data.setdefault("solver", []).append(
                {"n": n, "classes": classes, "median": med, "max": max(solve), "with_gram": statistics.median(whole)}
            )
    report.add(
        f"AE-KD solver alone (`min_norm_capped_simplex`, Wolfe's min-norm point, cap C = 0.6, batch {sizes.batch}, "
        f"{reps} calls each; the last column adds building the Gram matrix from the probabilities):\n\n"
        + common.markdown_table(["N", "classes", "median", "p90", "max", "with Gram", "median < 1 ms"], rows)
    )


def run(sizes: Sizes) -> Report:
    report = Report("loss", "(a) Loss overhead: DistillationLoss vs one student step")
    torch.manual_seed(0)
    calls = 20 if sizes.quick else 50
    rounds = 3 if sizes.quick else 12
    student, teacher, labels = make_logits(sizes.batch, sizes.teachers, sizes.classes)
    variants: dict[str, Callable[[], Any]] = {"student step (plain fine-tuning)": student_step_fn(sizes, 2)}
    variants["CE only (what plain fine-tuning computes)"] = loss_block(ce_loss_fn, student, teacher, labels, calls)
    labels_of = {}
    for label, options in loss_variants().items():
        name = f"DistillationLoss: {label}"
        labels_of[name] = label
        variants[name] = loss_block(kdkit_loss_fn(options), student, teacher, labels, calls)
    common.log(f"loss overhead: {len(variants)} variants, {rounds} rounds, {calls} loss calls a block")
    samples = common.interleave(variants, rounds, log=common.log)
    rows = common.summarize(samples, baseline=None)
    step = rows[0].median
    ce = rows[1].median
    body = []
    for row in rows:
        if row is rows[0]:
            body.append([row.name, common.fmt_time(row.median), f"{common.fmt_time(row.p25)}-{common.fmt_time(row.p75)}", "100%", ""])
            continue
        frac = row.median / step
        extra = (row.median - ce) / step
        body.append(
            [
                row.name,
                common.fmt_time(row.median),
                f"{common.fmt_time(row.p25)}-{common.fmt_time(row.p75)}",
                f"{frac * 100:.3f}%",
                f"{extra * 100:+.3f}%" if row is not rows[1] else "",
            ]
        )
    report.data["rows"] = common.rows_data(rows)
    report.add(
        f"Batch {sizes.batch} (half labeled, half unlabeled), N = {sizes.teachers} teachers, C = {sizes.classes}; "
        f"student MiniLM cut to {sizes.student_layers} layers, seq {sizes.seq}. "
        f"Loss rows: mean of {calls} calls (forward + backward from the logits), median over {rounds} rounds.\n\n"
        + common.markdown_table(
            ["variant", "median", "IQR", "share of a student step", "extra over CE, share of a step"], body
        )
    )
    bench_solver(report, sizes)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(Sizes.quick_sizes() if args.quick else Sizes())


if __name__ == "__main__":
    main()

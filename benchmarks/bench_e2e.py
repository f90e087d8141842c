"""(d) End to end: kdkit (cache build + student) vs naive online distillation vs TextBrewer.

Same 5 teacher checkpoints (MiniLM-L6), same student (MiniLM cut to 3 layers, same initial weights), same
sentences (half labeled, half unlabeled), same batches (batch 32, max_length 48, padded per batch), same number
of epochs. Timed from "teacher checkpoints on disk, student built" to "student trained":

* ``kdkit``: ``LogitCache.teacher_logits`` (labeled and unlabeled splits, into an empty cache) then
  ``kdkit.training.make_trainer(...).train()`` with UniKD (correctness + disagreement), as ``kdkit run`` does;
* ``naive online``: the 5 teachers loaded and run under ``torch.no_grad()`` at every step, inside a ``Trainer``
  whose loss is the same ``DistillationLoss`` (so the two differ only in where teacher logits come from);
* ``TextBrewer``: ``MultiTeacherDistiller`` (optional; ``pip install --no-deps --target /tmp/textbrewer
  textbrewer``), its own training loop, averaged soft targets (its only multi-teacher scheme) + the hard-label
  loss, no TensorBoard, one checkpoint at the end;
* ``TextBrewer, is_caching_logits`` (``--sides textbrewer-cached kdkit``, or ``--e2e-sides ...`` in
  ``benchmarks.run_all``; not in the default run):
  TextBrewer's own in-memory logit cache: before training it runs the teachers once over the training batches
  and keeps those batches with their logits; every epoch then reshuffles the same batches.

On a GPU every side runs there: the student stages with kdkit's ``precision = "auto"`` (bf16), the naive
teachers inside the Trainer's autocast, TextBrewer under ``torch.autocast("cuda", bfloat16)`` (its own
``fp16`` option needs apex), kdkit's cache build with bf16 autocast.

Then the ablation: 5 recipe variants reusing one cache (kdkit: one build + 5 student runs, measured) against
5 naive / TextBrewer runs (5 x their measured single run: each variant repeats the same work).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer

from benchmarks import common
from benchmarks import models as bench_models
from benchmarks import student_setup as ss
from benchmarks.common import Report, Sizes

TEXTBREWER_PATH = Path("/tmp/textbrewer")
UNIKD = {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}}
ABLATION = {
    "unikd (both)": UNIKD,
    "correctness only": {"unikd-correctness": {}},
    "disagreement only": {"unikd-disagreement": {"lambda": 10.0}},
    "average": {},
    "aekd": {"aekd": {}},
}


# --------------------------------------------------------------------------- data shared by all sides
class E2EData:
    def __init__(self, sizes: Sizes, samples: int) -> None:
        self.sizes = sizes
        self.student = ss.student_data(sizes, samples, seed=4)
        data = self.student
        half = sum(1 for y in data.mixed_labels if y != -100)
        self.labeled_ds = bench_models.dataset(data.texts[:half], data.labels[:half])
        self.unlabeled_ds = bench_models.dataset(data.texts[half:], [-100] * (len(data) - half))
        self.refs = bench_models.teacher_checkpoints(sizes.teachers, sizes.classes)
        self.initial = common.minilm_classifier(sizes.student_layers, sizes.classes, seed=0)

    def student_model(self) -> Any:
        return copy.deepcopy(self.initial)


# --------------------------------------------------------------------------- kdkit
def kdkit_cache(d: E2EData, cache_dir: Path | None = None) -> torch.Tensor:
    from kdkit.tasks.logit_cache import LogitCache

    cache = LogitCache(cache_dir or bench_models.fresh_dir("e2e-cache"), batch_size=d.sizes.cache_batch)
    logits = cache.teacher_logits(
        list(d.refs),
        {"labeled": d.labeled_ds, "unlabeled": d.unlabeled_ds},
        ["sentence"],
        bench_models.label_names(d.sizes.classes),
        max_length=d.sizes.seq,
    )
    return torch.cat([logits["labeled"], logits["unlabeled"]], dim=0)


def kdkit_student(d: E2EData, teacher_logits: torch.Tensor, plugins: dict[str, Any]) -> tuple[float, int]:
    from kdkit import DistillationLoss

    args = ss.arguments(d.sizes, bench_models.fresh_dir("e2e-student"))
    model = d.student_model()
    start = common.now()
    trainer = ss.kdkit_trainer(model, d.student, args, teacher_logits, DistillationLoss.from_plugins(plugins))
    trainer.train()
    return common.now() - start, trainer.state.global_step


def kdkit_e2e(d: E2EData) -> dict[str, float]:
    start = common.now()
    logits = kdkit_cache(d)
    cache_s = common.now() - start
    student_s, steps = kdkit_student(d, logits, UNIKD)
    return {"total": cache_s + student_s, "cache": cache_s, "student": student_s, "steps": steps}


# --------------------------------------------------------------------------- naive online distillation
class OnlineKDTrainer(Trainer):
    """Runs every teacher on every batch (what kdkit's cache avoids); the loss is kdkit's DistillationLoss."""

    def __init__(self, *args: Any, teachers: list[Any], loss_fn: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teachers = teachers
        self.loss_fn = loss_fn

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("kd_index", None)
        with torch.no_grad():
            teacher_logits = torch.stack([t(**inputs).logits.float() for t in self.teachers], dim=1)
        outputs = model(**inputs)
        loss = self.loss_fn(outputs.logits.float(), teacher_logits, labels).loss
        return (loss, outputs) if return_outputs else loss


def load_teachers(d: E2EData) -> list[Any]:
    from transformers import AutoModelForSequenceClassification

    common.quiet_transformers()
    teachers = []
    for ref in d.refs:
        model = AutoModelForSequenceClassification.from_pretrained(ref.path)
        model.eval()
        teachers.append(model)
    return teachers


def naive_e2e(d: E2EData) -> dict[str, float]:
    from kdkit import DistillationLoss
    from kdkit.training import EncodedDataset, KDCollator

    start = common.now()
    teachers = load_teachers(d)
    args = ss.arguments(d.sizes, bench_models.fresh_dir("e2e-naive"))
    trainer = OnlineKDTrainer(
        model=d.student_model(),
        args=args,
        train_dataset=EncodedDataset(d.student.encoded, d.student.mixed_labels, kd_index=range(len(d.student))),
        data_collator=KDCollator(d.student.tokenizer),
        processing_class=d.student.tokenizer,
        teachers=teachers,
        loss_fn=DistillationLoss.from_plugins(UNIKD),
    )
    for teacher in teachers:
        teacher.to(trainer.args.device)
    ss.quiet(trainer)
    trainer.train()
    total = common.now() - start
    return {"total": total, "steps": trainer.state.global_step}


# --------------------------------------------------------------------------- TextBrewer
def textbrewer_available() -> str | None:
    """``None`` if TextBrewer imports, else why not."""
    if str(TEXTBREWER_PATH) not in sys.path and TEXTBREWER_PATH.is_dir():
        sys.path.insert(0, str(TEXTBREWER_PATH))
    try:
        import textbrewer  # noqa: F401
        from textbrewer import DistillationConfig, MultiTeacherDistiller, TrainingConfig  # noqa: F401
    except Exception as exc:  # any import failure means: not usable here
        return f"{type(exc).__name__}: {exc}"
    return None


def textbrewer_e2e(d: E2EData, caching: bool = False) -> dict[str, float]:
    import logging

    from textbrewer import DistillationConfig, MultiTeacherDistiller, TrainingConfig
    from transformers import get_linear_schedule_with_warmup

    from kdkit.training import EncodedDataset, KDCollator

    logging.getLogger("Distillation").setLevel(logging.WARNING)
    device = common.device()
    start = common.now()
    teachers = [t.to(device) for t in load_teachers(d)]
    student = d.student_model().to(device)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        EncodedDataset(d.student.encoded, d.student.mixed_labels),
        batch_size=d.sizes.batch,
        shuffle=True,
        generator=gen,
        collate_fn=KDCollator(d.student.tokenizer),
    )

    def adaptor_t(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits}

    def adaptor_s(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits, "losses": outputs.loss}

    out_dir = bench_models.fresh_dir("e2e-textbrewer")
    train_config = TrainingConfig(
        device=str(device), output_dir=str(out_dir), log_dir=None, ckpt_frequency=1, ckpt_epoch_frequency=10_000
    )
    distill_config = DistillationConfig(
        temperature=1.0, kd_loss_type="ce", hard_label_weight=1.0, kd_loss_weight=1.0, is_caching_logits=caching
    )
    distiller = MultiTeacherDistiller(train_config, distill_config, teachers, student, adaptor_t, adaptor_s)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    steps = len(loader) * d.sizes.epochs
    with distiller, common.autocast(device):
        distiller.train(
            optimizer,
            loader,
            num_epochs=d.sizes.epochs,
            scheduler_class=get_linear_schedule_with_warmup,
            scheduler_args={"num_warmup_steps": 0, "num_training_steps": steps},
            max_grad_norm=1.0,
        )
    return {"total": common.now() - start, "steps": steps}


# --------------------------------------------------------------------------- the benchmark
#: Every side of the end-to-end table: key -> (row name, function).
SIDES: dict[str, tuple[str, Any]] = {
    "naive": ("naive online (5 teachers every step)", naive_e2e),
    "kdkit": ("kdkit (cache build + student)", kdkit_e2e),
    "textbrewer": ("TextBrewer MultiTeacherDistiller", textbrewer_e2e),
    "textbrewer-cached": (
        "TextBrewer MultiTeacherDistiller, is_caching_logits",
        lambda d: textbrewer_e2e(d, caching=True),
    ),
}
#: The issue's comparison.
DEFAULT_SIDES = ("naive", "kdkit", "textbrewer")


def run(sizes: Sizes, samples: int | None = None, rounds: int | None = None, textbrewer: bool = True,
        ablation: bool = True, sides: Sequence[str] | None = None) -> Report:
    report = Report("e2e", "(d) End to end: kdkit vs naive online distillation vs TextBrewer")
    count = samples or sizes.samples
    rounds = rounds or 1
    sides = list(sides or DEFAULT_SIDES)
    if "kdkit" not in sides:
        raise SystemExit("the end-to-end benchmark compares with kdkit: keep 'kdkit' among the sides")
    d = E2EData(sizes, count)
    tb_problem = textbrewer_available() if textbrewer else "not asked for (--no-textbrewer)"
    if tb_problem is not None:
        sides = [k for k in sides if not k.startswith("textbrewer")]

    detail: dict[str, list[dict[str, float]]] = {key: [] for key in sides}

    def recorder(name: str, fn: Any) -> Any:
        def run_once() -> float:
            result = fn(d)
            detail[name].append(result)
            common.log(f"    {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
            return result["total"]

        return run_once

    variants = {SIDES[key][0]: recorder(key, SIDES[key][1]) for key in sides}
    key_of = {SIDES[key][0]: key for key in sides}
    common.log(f"end to end: {sizes.teachers} teachers, {count} sentences, {sizes.epochs} epochs, {rounds} rounds, "
               f"sides {', '.join(sides)}")
    samples_ = common.interleave(variants, rounds, warmup=0, log=common.log)
    rows = common.summarize(samples_, baseline=SIDES[sides[0]][0])
    kd = detail["kdkit"]
    for row in rows:
        runs = detail[key_of[row.name]]
        steps = runs[0]["steps"] if runs else 0
        row.extra["steps"] = int(steps)
        # per round: this side's time / kdkit's time in the same round, then the median over rounds
        per_round = [r["total"] / k["total"] for r, k in zip(runs, kd)]
        row.extra["kdkit speed-up"] = f"{statistics.median(per_round):.2f}x"
        if len(per_round) > 1:
            row.extra["kdkit speed-up"] += f" ({min(per_round):.2f}-{max(per_round):.2f})"
    cache_med = statistics.median(r["cache"] for r in kd)
    student_med = statistics.median(r["student"] for r in kd)
    report.data.update(rows=common.rows_data(rows), detail=detail, textbrewer=tb_problem or "ok",
                       source=d.student.source)
    tb_note = (
        "TextBrewer 0.2.1 (installed with --no-deps into /tmp/textbrewer) runs with transformers "
        f"{__import__('transformers').__version__}."
        if tb_problem is None
        else f"TextBrewer not measured: {tb_problem}."
    )
    report.add(
        f"{sizes.teachers} MiniLM-L6 teachers, student MiniLM-3, {count} sentences ({d.student.source}; half labeled), "
        f"{sizes.epochs} epochs, batch {sizes.batch}, max_length {sizes.seq}, {rounds} interleaved round(s). "
        f"kdkit's time splits into cache build {common.fmt_time(cache_med)} and student "
        f"{common.fmt_time(student_med)} (medians). {tb_note}\n\n"
        + common.time_table(rows, "median total", extra_cols=["steps", "kdkit speed-up"])
    )

    if ablation:
        ablation_run(report, d, rows)
    return report


def ablation_run(report: Report, d: E2EData, rows: list[Any]) -> None:
    """5 variants of a recipe over one cache: kdkit builds it once; the others redo all the teacher work."""
    common.log("ablation: one cache, 5 student runs")
    cache_dir = bench_models.fresh_dir("ablation-cache")
    start = common.now()
    logits = kdkit_cache(d, cache_dir)
    build = common.now() - start
    start = common.now()
    again = kdkit_cache(d, cache_dir)  # the second variant onwards find the cache
    reread = common.now() - start
    assert torch.equal(again, logits)
    from kdkit import discover_plugins

    available = discover_plugins().available()
    body = []
    total = build
    for label, plugins in ABLATION.items():
        if any(p not in available for p in plugins):
            continue
        seconds, _ = kdkit_student(d, logits, plugins)
        common.log(f"    kdkit {label}: {seconds:.1f} s")
        body.append([f"kdkit student: {label}", common.fmt_time(seconds)])
        total += seconds + reread
    variants = len(body)
    body.insert(0, ["kdkit cache build (once)", common.fmt_time(build)])
    body.append([f"kdkit cache read back (x{variants})", common.fmt_time(reread)])
    body.append([f"**kdkit, {variants} variants**", f"**{common.fmt_time(total)}**"])
    for row in rows:
        if row.name.startswith("kdkit"):
            continue
        other = row.median * variants
        body.append([f"{row.name}, {variants} variants (= {variants} x measured)", f"{common.fmt_time(other)} "
                     f"(kdkit {other / total:.2f}x faster)"])
    report.data["ablation"] = {"build": build, "reread": reread, "total": total, "variants": variants}
    report.add(
        f"Ablation, {variants} recipe variants (plugins: {', '.join(ABLATION)}), one teacher-logit cache:\n\n"
        + common.markdown_table(["what", "time"], body)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--no-textbrewer", action="store_true")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), help=f"default: {' '.join(DEFAULT_SIDES)}")
    args = parser.parse_args(argv)
    sizes = Sizes.quick_sizes() if args.quick else Sizes()
    if args.epochs:
        sizes.epochs = args.epochs
    run(sizes, args.samples, args.rounds, textbrewer=not args.no_textbrewer, ablation=not args.no_ablation,
        sides=args.sides)


if __name__ == "__main__":
    main()

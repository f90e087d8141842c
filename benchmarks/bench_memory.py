"""(e) Peak memory of the student stage vs plain fine-tuning, each in a fresh process (peak RSS, ``VmHWM``).

Children, interleaved over rounds, each a new Python process that imports the same libraries:

* ``plain``: a stock ``Trainer`` fine-tunes the student for ``steps`` steps;
* ``kdkit student stage``: reads the teacher logits from an existing cache (``LogitCache.teacher_logits``
  finds every file, so no teacher is loaded) and trains the same student with kdkit's trainer;
* ``kdkit cache build + student``: what one ``kdkit run`` process does: builds the cache (teachers loaded one
  at a time and freed), then trains the student;
* ``naive online``: the 5 teachers stay in memory beside the student (for contrast).

Target: the kdkit student stage <= 1.1x plain fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

from benchmarks import common
from benchmarks.common import Report, Sizes

KINDS = {
    "plain": "plain Trainer fine-tuning",
    "kdkit-student": "kdkit student stage (cache read)",
    "kdkit-run": "kdkit cache build + student (one process)",
    "naive": "naive online (5 teachers in memory)",
}


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: on Linux ``ru_maxrss`` survives ``fork`` + ``exec``,
    so a child started by a big parent would report at least the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    from types import SimpleNamespace

    import torch

    from benchmarks import bench_e2e
    from benchmarks import models as bench_models
    from benchmarks import student_setup as ss

    sizes = Sizes(**spec["sizes"])
    data = ss.student_data(sizes, spec["samples"], seed=4)
    half = sum(1 for y in data.mixed_labels if y != -100)
    ready = _rss_mb()  # libraries imported, data tokenized
    torch.manual_seed(0)
    student = common.minilm_classifier(sizes.student_layers, sizes.classes, seed=0)
    args = ss.arguments(sizes, bench_models.fresh_dir("mem"), max_steps=spec["steps"])
    teachers_loaded = 0
    if kind == "plain":
        trainer = ss.plain_trainer(student, data, args)
    elif kind in ("kdkit-student", "kdkit-run"):
        from kdkit import DistillationLoss
        from kdkit.tasks.base import TeacherRef
        from kdkit.tasks.logit_cache import LogitCache

        refs = [TeacherRef(**r) for r in spec["teachers"]]
        cache_dir = spec["cache_dir"] if kind == "kdkit-student" else bench_models.fresh_dir("mem-cache")
        cache = LogitCache(cache_dir, batch_size=sizes.cache_batch)
        splits = {
            "labeled": bench_models.dataset(data.texts[:half], data.labels[:half]),
            "unlabeled": bench_models.dataset(data.texts[half:], [-100] * (len(data) - half)),
        }
        logits = cache.teacher_logits(
            refs, splits, ["sentence"], bench_models.label_names(sizes.classes), max_length=sizes.seq
        )
        teachers_loaded = len({e.teacher for e in cache.entries if e.built})
        teacher_logits = torch.cat([logits["labeled"], logits["unlabeled"]])
        loss_fn = DistillationLoss.from_plugins(bench_e2e.UNIKD)
        trainer = ss.kdkit_trainer(student, data, args, teacher_logits, loss_fn)
    elif kind == "naive":
        from kdkit import DistillationLoss
        from kdkit.training import EncodedDataset, KDCollator

        from kdkit.tasks.base import TeacherRef

        teachers = bench_e2e.load_teachers(SimpleNamespace(refs=[TeacherRef(**r) for r in spec["teachers"]]))
        teachers_loaded = len(teachers)
        trainer = ss.quiet(
            bench_e2e.OnlineKDTrainer(
                model=student,
                args=args,
                train_dataset=EncodedDataset(data.encoded, data.mixed_labels, kd_index=range(len(data))),
                data_collator=KDCollator(data.tokenizer),
                processing_class=data.tokenizer,
                teachers=teachers,
                loss_fn=DistillationLoss.from_plugins(bench_e2e.UNIKD),
            )
        )
    else:
        raise SystemExit(f"unknown kind {kind}")
    before_training = _rss_mb()
    trainer.train()
    return {
        "kind": kind,
        "ready_mb": ready,
        "before_training_mb": before_training,
        "peak_mb": _rss_mb(),
        "steps": trainer.state.global_step,
        "teachers_built": teachers_loaded,
    }


def run(sizes: Sizes, steps: int | None = None, rounds: int | None = None) -> Report:
    from benchmarks import models as bench_models
    from benchmarks import student_setup as ss

    report = Report("memory", "(e) Peak memory: kdkit student stage vs plain fine-tuning")
    steps = steps or (3 if sizes.quick else 10)
    rounds = rounds or (1 if sizes.quick else 3)
    samples = sizes.batch * steps
    refs = bench_models.teacher_checkpoints(sizes.teachers, sizes.classes)
    teachers = [{"name": r.name, "key": r.key, "path": r.path} for r in refs]

    # the cache the student-stage child reads
    from kdkit.tasks.logit_cache import LogitCache

    data = ss.student_data(sizes, samples, seed=4)
    half = sum(1 for y in data.mixed_labels if y != -100)
    cache_dir = bench_models.fresh_dir("mem-shared-cache")
    LogitCache(cache_dir, batch_size=sizes.cache_batch).teacher_logits(
        list(refs),
        {
            "labeled": bench_models.dataset(data.texts[:half], data.labels[:half]),
            "unlabeled": bench_models.dataset(data.texts[half:], [-100] * (len(data) - half)),
        },
        ["sentence"],
        bench_models.label_names(sizes.classes),
        max_length=sizes.seq,
    )
    spec = {"sizes": sizes.as_dict(), "samples": samples, "steps": steps, "teachers": teachers,
            "cache_dir": str(cache_dir)}
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}

    def launcher(kind: str) -> Any:
        def launch() -> float:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_memory", "--child", kind, "--spec", json.dumps(spec)],
                cwd=str(common.REPO), capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results[kind].append(result)
            return result["peak_mb"]

        return launch

    common.log(f"memory: {len(KINDS)} kinds, {rounds} rounds, {steps} steps each, one process per run")
    samples_ = common.interleave({KINDS[k]: launcher(k) for k in KINDS}, rounds, warmup=0,
                                 log=common.log, fmt=lambda mb: f"{mb:.0f} MB")
    plain_peaks = [r["peak_mb"] for r in results["plain"]]
    body = []
    for kind, label in KINDS.items():
        runs = results[kind]
        peaks = [r["peak_mb"] for r in runs]
        ratios = [p / b for p, b in zip(peaks, plain_peaks)]
        body.append(
            [
                label,
                f"{common.statistics.median(peaks):.0f} MB",
                f"{min(peaks):.0f}-{max(peaks):.0f}",
                f"{common.statistics.median(r['before_training_mb'] for r in runs):.0f} MB",
                f"{common.statistics.median(ratios):.3f}x",
                runs[0]["teachers_built"] if kind != "naive" else f"{runs[0]['teachers_built']} (kept)",
            ]
        )
    report.data.update(results=results, steps=steps, rounds=rounds)
    del samples_
    report.add(
        f"Peak resident memory (VmHWM) of a fresh process; student MiniLM-3, batch {sizes.batch}, "
        f"{steps} steps, {sizes.teachers} teachers, {rounds} interleaved round(s). \"before training\" is the "
        "peak up to trainer.train() (libraries, data, models, and for kdkit-run the cache build).\n\n"
        + common.markdown_table(
            ["process", "median peak", "min-max", "peak before training", "ratio to plain", "teachers loaded"],
            body,
        )
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--child", choices=list(KINDS))
    parser.add_argument("--spec")
    args = parser.parse_args(argv)
    if args.child:
        common.quiet_transformers()
        print(json.dumps(child(args.child, json.loads(args.spec))), flush=True)
        return
    run(Sizes.quick_sizes() if args.quick else Sizes(), args.steps, args.rounds)


if __name__ == "__main__":
    main()

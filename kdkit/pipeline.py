"""``kdkit run``: data -> teachers -> teacher-logit cache -> student(s) -> evaluation.

Paths: ``output_dir``, ``cache_dir`` and ``data.files`` in a recipe resolve against the current working
directory (as with any command-line tool), not against the recipe file. A run writes into
``<output_dir>/<name>/``:

* ``recipe.resolved.json``: the recipe with every default filled in (written first);
* ``students/<kind>-seed<seed>-<hash>/``: each student run (checkpoints while training, then ``model/``,
  ``eval_logits.safetensors`` and ``done.json``); the hash covers every setting that changes the result, so a
  changed recipe starts a fresh run and the same recipe resumes or reuses the finished one;
* ``results.partial.json``: the figures of the student runs finished so far (removed at the end);
* ``results.json``: every figure, written atomically once everything is done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdkit.batch import IGNORE_INDEX
from kdkit.errors import KdkitError
from kdkit.recipe import Recipe
from kdkit.utils import init_distributed, is_main_process, say, warn


def _stage(console: Any, number: int, title: str) -> None:
    say(console, f"{number}/5 {title}", style="bold")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_plugins_accept(loss_fn: Any, num_teachers: int, num_classes: int, *, unlabeled: bool) -> None:
    """Run the loss once on a dummy batch (a labeled sample, and an unlabeled one if the training set will hold
    some) with the recipe's number of teachers and classes, so that a plugin refusing it (e.g. disagreement with
    one teacher) fails before any teacher is trained."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, IGNORE_INDEX] if unlabeled else [0])
    student = torch.randn(len(labels), num_classes, generator=gen)
    teachers = torch.randn(len(labels), num_teachers, num_classes, generator=gen)
    loss_fn(student, teachers, labels)


def run_recipe(
    recipe: Recipe,
    *,
    recipe_path: Path | str | None = None,
    console: Any,
    results_console: Any = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Run a recipe end to end and return its results (also written to ``<output_dir>/<name>/results.json``).

    :param console: progress and diagnostics (stderr).
    :param results_console: where the results table goes (default: a console on stdout).
    :param print_table: print the results table (off for ``--json``).
    """
    from kdkit.models import no_weight_progress_bars

    with no_weight_progress_bars():
        return _run(
            recipe, recipe_path=recipe_path, console=console, results_console=results_console, print_table=print_table
        )


def _run(
    recipe: Recipe, *, recipe_path: Path | str | None, console: Any, results_console: Any, print_table: bool
) -> dict[str, Any]:
    from transformers import set_seed

    import kdkit
    from kdkit.cache import LogitCache
    from kdkit.data import load_splits
    from kdkit.evaluate import classification_metrics, ensemble_probabilities, mean_std, metric_names, results_table
    from kdkit.loss import DistillationLoss
    from kdkit.manager import discover_plugins
    from kdkit.models import check_weights, encode, load_tokenizer, resolve_model_ref
    from kdkit.student import EncodedDataset, StudentRun, student_config_hash, train_student
    from kdkit.teachers import prepare_teachers
    from kdkit.utils import atomic_write_json

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    set_seed(recipe.seeds[0])
    # several processes (torchrun): all train together; the main one alone writes the run's files
    init_distributed()
    main = is_main_process()
    run_dir = Path(recipe.output_dir).expanduser().resolve() / recipe.name
    cache_dir = Path(recipe.cache_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    results_file = run_dir / "results.json"
    partial_file = run_dir / "results.partial.json"
    if main:
        # results of an earlier run may belong to another version of the recipe: never leave them beside this one
        results_file.unlink(missing_ok=True)
        atomic_write_json(run_dir / "recipe.resolved.json", recipe.model_dump(mode="json"))
    say(console, f"run {recipe.name} -> {run_dir}")

    # ------------------------------------------------------------------ 1. data
    tick = time.perf_counter()
    _stage(console, 1, "data")
    need_unlabeled = "unlabeled" in recipe.distill.on
    splits = load_splits(recipe.data, need_unlabeled=need_unlabeled)
    label_names = list(splits.label_names)
    text_columns = list(splits.text_columns)
    num_classes = len(label_names)
    registry = discover_plugins(blocked=recipe.blocked_plugins)
    loss_fn = DistillationLoss.from_plugins(
        recipe.enabled_plugins(), temperature=recipe.distill.temperature, on=recipe.distill.on, registry=registry
    )
    check_plugins_accept(loss_fn, recipe.teachers.count, num_classes, unlabeled=need_unlabeled)
    # a base model directory without weights is found now, not after hours of teacher training
    check_weights(resolve_model_ref(recipe.student.model), "student")
    if recipe.teachers.model is not None:
        check_weights(resolve_model_ref(recipe.teachers.model), "teachers.model")
    sizes = {
        "labeled": len(splits.labeled),
        "unlabeled": len(splits.unlabeled) if need_unlabeled else 0,
        "tune": len(splits.tune) if splits.tune is not None else 0,
        "eval": len(splits.eval),
    }
    say(
        console,
        "  " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"; classes: {', '.join(label_names)}; {loss_fn!r}"
    )
    seconds["data"] = time.perf_counter() - tick

    # ------------------------------------------------------------------ 2. teachers
    tick = time.perf_counter()
    _stage(console, 2, f"teachers ({recipe.teachers.count})")
    teachers = prepare_teachers(
        recipe.teachers,
        cache_dir=cache_dir,
        labeled=splits.labeled,
        text_columns=text_columns,
        label_names=label_names,
        max_length=recipe.data.max_length,
        console=console,
        world_size=world_size(),
    )
    seconds["teachers"] = time.perf_counter() - tick

    # ------------------------------------------------------------------ 3. teacher logits
    tick = time.perf_counter()
    _stage(console, 3, "teacher logits")
    needed = {"labeled": splits.labeled}
    if need_unlabeled:
        needed["unlabeled"] = splits.unlabeled
    if splits.tune is not None and len(splits.tune):
        needed["tune"] = splits.tune
    needed["eval"] = splits.eval
    cache = LogitCache(cache_dir, batch_size=recipe.teachers.eval_batch_size, console=console)
    logits = cache.teacher_logits(teachers, needed, text_columns, label_names, max_length=recipe.data.max_length)
    built = [f"{e.teacher}/{e.split}" for e in cache.entries if e.built]
    say(console, f"  {len(built)} logit files built, {len(cache.entries) - len(built)} read from {cache.directory}")
    seconds["teacher_logits"] = time.perf_counter() - tick

    # ------------------------------------------------------------------ 4. students
    tick = time.perf_counter()
    runs_label = f"{len(recipe.seeds)} seed{'s' if len(recipe.seeds) != 1 else ''}"
    _stage(console, 4, f"student ({runs_label}{', plus labels-only baseline' if recipe.student.label_only_baseline else ''})")
    tokenizer = load_tokenizer(
        resolve_model_ref(recipe.student.model), who="student", trust_remote_code=recipe.student.trust_remote_code
    )
    if recipe.student.trust_remote_code:
        warn(console, "student.trust_remote_code is on: model code will run")
    max_length = recipe.data.max_length
    num_labeled = len(splits.labeled)
    labeled_enc = encode(tokenizer, splits.labeled, text_columns, max_length)
    labeled_labels = list(splits.labeled["label"])
    parts = [EncodedDataset(labeled_enc, labeled_labels, kd_index=range(num_labeled))]
    train_logits = [logits["labeled"]]
    if need_unlabeled:
        num_unlabeled = len(splits.unlabeled)
        parts.append(
            EncodedDataset(
                encode(tokenizer, splits.unlabeled, text_columns, max_length),
                [IGNORE_INDEX] * num_unlabeled,
                kd_index=range(num_labeled, num_labeled + num_unlabeled),
            )
        )
        train_logits.append(logits["unlabeled"])
    distill_data = EncodedDataset.concat(parts)
    distill_logits = torch.cat(train_logits, dim=0)
    baseline_data = EncodedDataset(labeled_enc, labeled_labels)
    common = {"data": splits.fingerprint, "world_size": world_size()}
    distill_extra = {
        **common,
        "kind": "distilled",
        "teachers": [t.key for t in teachers],
        "distill": recipe.distill.model_dump(mode="json"),
        "plugins": recipe.enabled_plugins(),
    }
    students: list[StudentRun] = []
    baselines: list[StudentRun] = []

    def figures(run: StudentRun) -> dict[str, Any]:
        return {
            "seed": run.seed,
            "steps": run.steps,
            "train_samples": run.train_samples,
            "seconds": round(run.seconds, 3),
            "reused": run.reused,
            "directory": str(run.directory),
            "metrics": classification_metrics(run.eval_logits, eval_labels),
        }

    eval_labels = torch.as_tensor(list(splits.eval["label"]), dtype=torch.long)

    def train(kind: str, dataset: EncodedDataset, seed: int, tag: str, **extra: Any) -> StudentRun:
        return train_student(
            recipe,
            tokenizer=tokenizer,
            dataset=dataset,
            eval_split=splits.eval,
            text_columns=text_columns,
            label_names=label_names,
            seed=seed,
            kind=kind,
            directory=run_dir / "students" / f"{kind}-seed{seed}-{tag}",
            console=console,
            **extra,
        )

    for seed in recipe.seeds:
        tag = student_config_hash(recipe, {**distill_extra, "seed": seed})
        run = train("distilled", distill_data, seed, tag, teacher_logits=distill_logits, loss_fn=loss_fn)
        students.append(run)
        _report_run(console, "student", run, classification_metrics(run.eval_logits, eval_labels))
        if recipe.student.label_only_baseline:
            tag = student_config_hash(recipe, {**common, "kind": "labels-only", "seed": seed, "max_steps": run.steps})
            base = train("labels-only", baseline_data, seed, tag, max_steps=run.steps)
            if base.steps != run.steps:
                raise KdkitError(
                    f"the labels-only student ran {base.steps} optimizer steps, the distilled one {run.steps} "
                    f"(seed {seed}); the comparison needs equal steps"
                )
            baselines.append(base)
            _report_run(console, "labels-only student", base, classification_metrics(base.eval_logits, eval_labels))
        if main:
            atomic_write_json(
                partial_file,
                {
                    "complete": False,
                    "student": [figures(r) for r in students],
                    "labels_only": [figures(r) for r in baselines],
                },
            )
    seconds["students"] = time.perf_counter() - tick

    # ------------------------------------------------------------------ 5. evaluation
    _stage(console, 5, "evaluation")
    eval_teacher_logits = logits["eval"]
    teacher_rows = []
    for teacher in teachers:
        teacher_rows.append(
            {
                "name": teacher.name,
                "seed": teacher.seed,
                "source": teacher.source,
                "key": teacher.key,
                "path": teacher.path,
                "steps": teacher.info.get("steps"),
                "trained_now": teacher.trained_now,
                "metrics": classification_metrics(eval_teacher_logits[:, teacher.index], eval_labels),
            }
        )
    teacher_mean, teacher_std = mean_std([t["metrics"] for t in teacher_rows])

    def block(runs: list[StudentRun]) -> dict[str, Any] | None:
        if not runs:
            return None
        rows = [figures(r) for r in runs]
        mean, std = mean_std([r["metrics"] for r in rows])
        return {"runs": rows, "mean": mean, "std": std}

    seconds["total"] = time.perf_counter() - started
    results: dict[str, Any] = {
        "name": recipe.name,
        "kdkit_version": kdkit.__version__,
        "recipe_file": str(recipe_path) if recipe_path is not None else None,
        "resolved_recipe": "recipe.resolved.json",
        "run_dir": str(run_dir),
        "labels": label_names,
        "metrics": metric_names(num_classes),
        "data": {"fingerprint": splits.fingerprint, **sizes},
        "eval": {"split": recipe.data.eval_split, "rows": len(splits.eval)},
        "distill": {
            "on": list(recipe.distill.on),
            "temperature": recipe.distill.temperature,
            "plugins": recipe.enabled_plugins(),
        },
        "teachers": teacher_rows,
        "teacher_mean": teacher_mean,
        "teacher_std": teacher_std,
        "ensemble": classification_metrics(ensemble_probabilities(eval_teacher_logits), eval_labels),
        "student": block(students),
        "labels_only": block(baselines),
        "cache": {
            "teachers_trained": sum(t.trained_now for t in teachers),
            "logits_built": built,
            "logits_read": len(cache.entries) - len(built),
        },
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if not main:
        return results
    atomic_write_json(results_file, results)
    partial_file.unlink(missing_ok=True)
    say(console, f"  results: {results_file} ({seconds['total']:.0f} s)")
    if print_table:
        if results_console is None:
            from rich.console import Console

            results_console = Console()
        results_console.print(results_table(results))
    return results


def _report_run(console: Any, label: str, run: Any, metrics: Mapping[str, float]) -> None:
    state = "reused" if run.reused else f"{run.seconds:.0f} s"
    say(
        console,
        f"  {label} seed {run.seed}: {run.steps} steps ({state}), eval accuracy {100 * metrics['accuracy']:.2f}"
    )

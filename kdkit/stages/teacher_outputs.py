"""Stage 3, teacher outputs: every teacher's predictions on every split the run needs, computed once and cached
(for sequence classification: the logit cache, :mod:`kdkit.tasks.logit_cache`; for causal LMs: the continuations
of the unlabeled prompts and the top-k stores, :mod:`kdkit.tasks.lm_outputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.recipe.schema import Recipe
from kdkit.runtime import say, world_size
from kdkit.stages.data import RunData
from kdkit.stages.teachers import Teacher
from kdkit.tasks.base import Task


@dataclass
class TeacherOutputs:
    """What stage 3 hands on: the task's outputs of each split (``{split: [rows, N, C]}`` for classification) and
    which files were built or read."""

    by_split: dict[str, Any]
    built: list[str]  #: "<teacher>/<split>" of each file computed by this run
    read: int  #: files found in the cache
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  #: teacher name -> seeded generations


def teacher_outputs(
    recipe: Recipe, *, task: Task, data: RunData, teachers: list[Teacher], cache_dir: Path, console: Any
) -> TeacherOutputs:
    """Each teacher's outputs on the labeled split, the unlabeled one (if distilled on), the tune split (if any)
    and the eval split; missing ones are computed, the rest read from ``cache_dir``."""
    splits = data.splits
    needed = {"labeled": splits.labeled}
    if data.need_unlabeled:
        needed["unlabeled"] = splits.unlabeled
    if splits.tune is not None and len(splits.tune):
        needed["tune"] = splits.tune
    needed["eval"] = splits.eval
    store = task.output_store(cache_dir, batch_size=recipe.teachers.eval_batch_size, console=console)
    by_split = store.teacher_logits(
        teachers, needed, data.text_columns, data.label_names, max_length=recipe.data.max_length
    )
    built = [f"{e.teacher}/{e.split}" for e in store.entries if e.built]
    read = len(store.entries) - len(built)
    what = getattr(store, "what", "logit files")  # what the store calls its entries
    say(console, f"  {len(built)} {what} built, {read} read from {store.directory}")
    if world_size() > 1:  # each process predicted a share of every file built: say how much
        for split, ds in needed.items():
            mine = [getattr(e, "predicted", 0) for e in store.entries if e.built and e.split == split]
            if mine:
                say(console, f"  {split} split: this process predicted {sum(mine)} of {len(mine)} x {len(ds)} rows")
    return TeacherOutputs(by_split=by_split, built=built, read=read, samples=dict(getattr(store, "samples", {})))

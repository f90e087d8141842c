"""Teacher checkpoints and datasets shared by the benchmarks (built once per process)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from benchmarks import common

_ROOT: Path | None = None


def scratch() -> Path:
    """A temporary directory for checkpoints and caches, removed when the process ends."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="kdkit-bench-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def fresh_dir(prefix: str) -> Path:
    path = scratch() / f"{prefix}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def label_names(classes: int) -> list[str]:
    return [f"class{i}" for i in range(classes)]


@lru_cache(maxsize=None)
def teacher_checkpoints(count: int, classes: int) -> tuple[Any, ...]:
    """``count`` MiniLM-L6 teacher checkpoints on disk (seeded heads), as :class:`kdkit.tasks.base.TeacherRef`.

    They are not fine-tuned: a forward pass costs the same either way.
    """
    from kdkit.tasks.base import TeacherRef

    tok = common.tokenizer()
    refs = []
    for i in range(count):
        directory = scratch() / f"teacher-c{classes}-{i}"
        if not directory.exists():
            model = common.minilm_classifier(None, classes, seed=100 + i)
            model.save_pretrained(str(directory))
            tok.save_pretrained(str(directory))
            del model
        refs.append(TeacherRef(name=f"teacher-{i + 1}", key=f"bench-c{classes}-{i}", path=str(directory)))
    return tuple(refs)


def dataset(texts: list[str], labels: list[int]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({"sentence": texts, "label": labels, "row": list(range(len(texts)))})

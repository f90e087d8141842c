"""The Trainer's ``checkpoint-<step>`` folders: which one to resume from, and removing those cut off while saving.

The Trainer writes a checkpoint in place, its ``trainer_state.json`` last: a run killed while saving leaves a
folder without it (or with a cut one). Resuming first removes such folders (:func:`remove_broken_checkpoints`),
then starts from the newest complete one (:func:`newest_complete_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kdkit.runtime import warn


def _checkpoints_newest_first(directory: Path) -> list[Path]:
    found = []
    for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


def _is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def newest_complete_checkpoint(directory: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` folder in ``directory`` that was written completely, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    return next((str(path) for path in _checkpoints_newest_first(directory) if _is_complete(path)), None)


def remove_broken_checkpoints(directory: str | Path, console: Any = None) -> None:
    """Remove (and report) the checkpoint folders newer than the newest complete one: they were cut off while
    saving, and resuming from one would fail."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in _checkpoints_newest_first(directory):
        if _is_complete(path):
            return
        warn(console, f"checkpoint {path} was not written completely (stopped while saving); removing it")
        shutil.rmtree(path, ignore_errors=True)


def remove_all_checkpoints(directory: str | Path) -> None:
    """Remove every ``checkpoint-<step>`` folder (a finished run keeps only its final model)."""
    for checkpoint in Path(directory).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)

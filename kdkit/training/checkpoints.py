"""The Trainer's ``checkpoint-<step>`` folders: which one to resume from, and removing those cut off while saving.

The Trainer writes a checkpoint in place, its ``trainer_state.json`` last: a run killed while saving leaves a
folder without it (or with a cut one). Resuming (:func:`checkpoint_to_resume`) first removes such folders
(:func:`remove_broken_checkpoints`), then the checkpoints written when training had already ended (its last step,
or early stopping's patience used up: the Trainer checks for the end only after a step, so resuming from one of
those takes one step more than the run it continues), then starts from the newest complete one left.
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


def _training_ended(checkpoint: Path) -> bool:
    """Whether training had ended when ``checkpoint`` was written: its step is the last one (``max_steps``), or
    the early-stopping callback's patience was used up (its counter and patience are saved in the checkpoint)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    max_steps = state.get("max_steps") or 0
    if max_steps > 0 and state.get("global_step", 0) >= max_steps:
        return True
    saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback", [])
    for callback in saved if isinstance(saved, list) else [saved]:
        patience = callback.get("args", {}).get("early_stopping_patience")
        counter = callback.get("attributes", {}).get("early_stopping_patience_counter", 0)
        if patience is not None and counter >= patience:
            return True
    return False


def checkpoint_to_resume(directory: str | Path, console: Any = None) -> str | None:
    """The checkpoint an interrupted run resumes from, or None to start again: the newest complete one written
    while training had not ended. Newer ones are removed first (and reported): those cut off while saving, and
    those of a run killed after its last step but before it was recorded as finished, which the Trainer would
    continue by one step too many (resuming from the one before repeats the last steps exactly instead)."""
    remove_broken_checkpoints(directory, console)
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in _checkpoints_newest_first(directory):
        if not _is_complete(path):
            continue
        if not _training_ended(path):
            return str(path)
        warn(console, f"checkpoint {path} was written after the last training step, but the run was not recorded as "
                      "finished; removing it and repeating the steps since the checkpoint before it")
        shutil.rmtree(path, ignore_errors=True)
    return None


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

"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdkitError(Exception):
    """Base class of every error caused by user input (a recipe, data, a plugin, a checkpoint)."""

    exit_code = 2


class KdkitWarning(UserWarning):
    """Base class of kdkit's warnings (a cache entry rebuilt, remote code allowed, a degenerate result). The CLI
    prints each one once, on its console; a library caller gets them as Python warnings."""


class RecipeError(KdkitError):
    """A recipe is invalid. ``problems`` lists ``(dotted.key.path, message)`` pairs; an empty path means the file
    as a whole (missing, empty, not TOML)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1 and not self.problems[0][0]:
            text = f"{source}: {self.problems[0][1]}"
        else:
            count = len(self.problems)
            lines = [f"{source}: {count} problem{'s' if count != 1 else ''}"]
            lines += [f"  {path or '(file)'}: {message}" for path, message in self.problems]
            text = "\n".join(lines)
        super().__init__(text)


class PluginError(KdkitError):
    """A plugin is missing, broken, blocked, duplicated or misused."""


class DataError(KdkitError):
    """Input data is unusable (missing columns, labels outside the label set, empty split, ...)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class ModelError(KdkitError):
    """A model or checkpoint cannot be found or does not fit the data."""


class NonFiniteLogitsError(KdkitError):
    """A model produced NaN or infinite logits."""


class NonFiniteLossError(KdkitError):
    """The training loss became NaN or infinite."""

"""Formatting experiment figures: percent cells (``mean ± std``), Markdown, CSV and rich tables."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdkit.stages.results import mean_std
from kdkit.store.files import atomic_write_text

def pct(value: float | None, digits: int = 2, scale: float = 100.0) -> str:
    """A figure as shown: a share in percent (``scale`` 100), or as it is (``scale`` 1: perplexity)."""
    return "" if value is None else f"{scale * value:.{digits}f}"


def cell(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± std`` in percent (``scale`` 1: as they are); one value: the value alone."""
    if not values:
        return ""
    mean, std = mean_std(values)
    return pct(mean, scale=scale) if len(values) == 1 else f"{pct(mean, scale=scale)} ± {pct(std, scale=scale)}"


def steps_text(steps: Iterable[Any]) -> str:
    unique = list(dict.fromkeys(s for s in steps if s is not None))
    return "/".join(str(s) for s in unique)


def p_text(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def esc(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def rich_table(header: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    return table


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically (a reader sees the old file or the new one) and return the path."""
    atomic_write_text(path, text)
    return Path(path)


def value_text(value: Any) -> str:
    """A recipe value as a recipe would write it (``true``, ``0.5``, ``[1,2]``); strings as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))

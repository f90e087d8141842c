"""Advisory file locks, so that runs sharing a cache never build one entry twice at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path, poll: float = 0.2) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), so that two runs sharing a cache do not
    build the same entry at once. The second waits and then finds the entry complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, writes stay atomic
        yield
        return
    with open(path, "a+b") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

"""Small shared helpers: stable hashing, atomic writes, checksummed directories, file locks, devices."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

#: Bumped whenever the layout or meaning of a cached artefact changes, so that old caches are not reused.
CACHE_FORMAT = 1

#: Name of the marker file that says a cached directory was written completely; it holds the files' checksums.
COMPLETE_MARKER = ".complete"


# --------------------------------------------------------------------------- hashing
def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return _canonical(obj.model_dump(mode="json"))
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot hash a value of type {type(obj).__name__}")


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def hash_json(obj: Any, length: int = 16) -> str:
    """Hex SHA-256 of :func:`stable_json` of ``obj``, shortened to ``length`` characters."""
    return hashlib.sha256(stable_json(obj).encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_columns(columns: Iterable[Iterable[Any]], length: int = 16) -> str:
    """Hash of several equally long columns of str / int values, row by row (order matters)."""
    digest = hashlib.sha256()
    for values in columns:
        digest.update(b"\x1ecol")
        for value in values:
            digest.update(b"\x1f")
            digest.update(str(value).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:length]


# --------------------------------------------------------------------------- atomic writes
def _temp_sibling(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- checksummed directories
def directory_checksums(directory: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``directory`` except the marker."""
    directory = Path(directory)
    sums = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if rel != COMPLETE_MARKER:
            sums[rel] = sha256_file(file)
    return sums


def write_complete_marker(directory: str | Path, info: Mapping[str, Any] | None = None) -> None:
    """Record the checksum of every file in ``directory`` in its ``.complete`` marker (written last)."""
    directory = Path(directory)
    payload = {"format": CACHE_FORMAT, "files": directory_checksums(directory), **dict(info or {})}
    atomic_write_json(directory / COMPLETE_MARKER, payload)


def verify_complete_marker(directory: str | Path) -> str | None:
    """``None`` if ``directory`` is complete and every file matches its checksum, else what is wrong."""
    directory = Path(directory)
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        return "no .complete marker (the write was interrupted)"
    try:
        payload = read_json(marker)
        expected: dict[str, str] = payload["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the .complete marker is unreadable"
    if payload.get("format") != CACHE_FORMAT:
        return f"written by cache format {payload.get('format')}, this kdkit uses {CACHE_FORMAT}"
    for rel, digest in expected.items():
        file = directory / rel
        if not file.is_file():
            return f"{rel} is missing"
        if sha256_file(file) != digest:
            return f"{rel} does not match its checksum"
    return None


def commit_directory(tmp: Path, final: Path) -> Path:
    """Move a fully written temporary directory to ``final`` (a rename, atomic on one file system).

    If ``final`` exists already (an older, invalid copy), it is moved aside first and then removed.
    """
    if final.exists():
        trash = _temp_sibling(final, ".old")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def staging_directory(final: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``final``; removed if the block fails, left for the caller otherwise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(directory: str | Path, name: str) -> None:
    """Remove leftovers of interrupted writes of ``name`` in ``directory`` (call while holding its lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for stale in directory.glob(f".tmp-{name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# --------------------------------------------------------------------------- locks
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


# --------------------------------------------------------------------------- several processes
def world_size() -> int:
    """How many processes run the recipe together (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the process of rank 0 (or when running alone): the one that writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed() -> None:
    """Start torch.distributed's default process group when several processes run together, so that
    :func:`barrier` works before the first Trainer exists (the Trainer then uses the same group)."""
    if world_size() <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=1800)  # the Trainer's own default (ddp_timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl", timeout=timeout)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)


def barrier() -> None:
    """Wait until every process of the run reaches this point (nothing when running alone)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    init_distributed()
    dist.barrier()


# --------------------------------------------------------------------------- devices and precision
def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU that supports it, else ``fp32``; anything else is returned as is."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def default_device() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- console output
def say(console: Any, message: str, *, style: str | None = None) -> None:
    """Print a line of progress to ``console`` (if any), as plain text: names and paths are never read as
    rich markup, and long lines are not broken."""
    if console is not None:
        console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def warn(console: Any, message: str) -> None:
    if console is not None:
        from rich.text import Text

        console.print(Text("warning: ", style="yellow") + Text(message), highlight=False, soft_wrap=True)

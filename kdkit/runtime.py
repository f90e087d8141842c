"""What a run needs to know about where it runs: processes, devices, precision, and the console.

Several processes (``torchrun`` / ``accelerate launch``) run one recipe together; the environment variables
they set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) are read here and nowhere else.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

#: The Trainer's own default of ``ddp_timeout``, used for the process group kdkit starts before any Trainer.
DDP_TIMEOUT = datetime.timedelta(seconds=1800)
#: How long :func:`wait_for_all` waits: processes that each train whole teachers alone meet again only when the
#: slowest has finished its share, hours later on real data (a plain barrier gives up after ``DDP_TIMEOUT``).
LONG_WAIT = datetime.timedelta(days=7)
#: The environment variables by which torchrun / accelerate tell a process that it is one of several.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
_host_group_handle: list[Any] = []  #: the gloo group of :func:`_host_group`, once made


# --------------------------------------------------------------------------- several processes
def world_size() -> int:
    """How many processes run the recipe together (``torchrun`` / ``accelerate launch`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among :func:`world_size` processes (0 when running alone)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True in the process of rank 0 (or when running alone): the one that writes shared files."""
    return rank() == 0


def init_distributed() -> None:
    """Start torch.distributed's default process group when several processes run together, so that
    :func:`barrier` works before the first Trainer exists (the Trainer then uses the same group)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl", timeout=DDP_TIMEOUT)
    else:
        dist.init_process_group(backend="gloo", timeout=DDP_TIMEOUT)


def barrier() -> None:
    """Wait until every process of the run reaches this point (nothing when running alone)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    init_distributed()
    dist.barrier()


def _host_group() -> Any:
    """A gloo group over every process, for host (CPU) tensors whatever the main backend is (NCCL on GPUs);
    the default group itself when that is gloo already. Made on first use, which every process reaches at the
    same collective call."""
    import torch.distributed as dist

    init_distributed()
    if dist.get_backend() == "gloo":
        return None
    if not _host_group_handle:
        _host_group_handle.append(dist.new_group(backend="gloo"))
    return _host_group_handle[0]


def wait_for_all() -> None:
    """A barrier that waits up to :data:`LONG_WAIT`: where the processes did unequal amounts of work alone
    (teachers trained one per process). A process that fails ends the run (torchrun stops the others)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    dist.monitored_barrier(group=_host_group(), timeout=LONG_WAIT, wait_all_ranks=True)


def broadcast_flags(flags: Sequence[bool]) -> list[bool]:
    """The main process's ``flags`` on every process: a decision (which cache entries are missing) taken once,
    by the process that holds the cache lock, so that every process acts on the same answer. Every process
    passes as many flags."""
    if world_size() <= 1:
        return [bool(f) for f in flags]
    import torch.distributed as dist

    tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64)
    dist.broadcast(tensor, src=0, group=_host_group())
    return [bool(v) for v in tensor.tolist()]


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (a CPU tensor), in rank order, on every process. The first dimension may
    differ between processes; the others and the dtype must agree. Running alone: ``[tensor]``."""
    if world_size() <= 1:
        return [tensor]
    import torch.distributed as dist

    group = _host_group()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(max(sizes), 1), *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return [part[:size] for part, size in zip(gathered, sizes, strict=True)]


@contextlib.contextmanager
def as_single_process() -> Iterator[None]:
    """Within the block, this process looks like a run of its own to everything that reads the launcher's
    environment (:func:`world_size`, :func:`rank`, transformers, accelerate): for a model this process trains
    alone while the others train other models. The process group stays as it is."""
    saved = {name: os.environ.pop(name) for name in _LAUNCHER_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- memory
def release_freed_memory() -> None:
    """Hand the memory freed by this process back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A forward pass on the CPU allocates and frees large blocks of a new size at every batch of another length;
    glibc keeps the freed blocks, fragmented, and the resident size grows (by ~85 MB over a 100,000-row
    prediction of a tiny model, docs/PERFORMANCE.md). Trimming every few batches keeps it flat at no measurable
    cost; after every batch it costs ~50% of the time (the pages are faulted in again).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# --------------------------------------------------------------------------- devices and precision
def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU that supports it, else ``fp32``; anything else is returned as is."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for inference on a CUDA GPU that supports it; nothing elsewhere (fp32 on a CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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

"""Sums over data-parallel ranks, for batch statistics that plugins reduce (:meth:`kdkit.KDBatch.mean_over_ranks`).

Under DDP every process sees its own part of the global batch. A statistic of the whole batch (AE-KD's mean
gradient) must be reduced over the processes before it is used, or K processes at global batch B optimise
another objective than one process at batch B (NeMo-RL issue 2797 is what happens otherwise).

A reduction is a collective: every rank must call it, the same number of times, in the same order, with tensors
of the same shape. :meth:`kdkit.DistillationLoss.weights` therefore asks the plugins about every stream on every
rank when several ranks run (with an empty view where a rank's local batch lacks the stream).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_size() -> int:
    """How many processes share each batch: torch.distributed's world size once a process group is started,
    else 1 (a process group is what a reduction needs, whatever ``WORLD_SIZE`` says)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed element-wise over every data-parallel rank (a new tensor; ``tensor`` itself when alone).

    A collective: when several ranks run, every one of them must call it with a tensor of the same shape and
    dtype, or the run hangs.
    """
    if data_parallel_size() <= 1:
        return tensor
    total = tensor.detach().clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total

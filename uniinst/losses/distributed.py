"""Cross-worker averaging of loss normalisers (spec §4)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of workers in the default process group; 1 when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over all workers (all-reduce SUM / world size).

    Without an initialised process group the tensor itself is returned. The input is never
    modified: the all-reduce runs on a copy.
    """
    if not dist.is_available() or not dist.is_initialized():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def global_mean(values: Tensor) -> Tensor:
    """Mean of ``values`` over the elements of every worker: the local sum divided by the
    element count averaged over workers (the world size cancels against DDP's gradient
    averaging). Without a process group this is ``values.mean()`` (0 when empty).

    Every worker must call it at the same point, even with no elements, because the count
    is all-reduced.
    """
    count = reduce_mean(values.new_tensor(float(values.numel()))).clamp(min=1.0)
    return values.sum() / count

"""Linear warm-up followed by step decay (spec §7)."""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_multistep_factor(
    iteration: int,
    *,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
    steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """LR multiplier at ``iteration``: linear from ``warmup_factor`` to 1 over the warm-up,
    times ``gamma`` for every step boundary passed."""
    factor = gamma ** bisect_right(list(steps), iteration)
    if iteration < warmup_iters:
        a = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - a) + a
    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
    steps: Sequence[int] = (),
    gamma: float = 0.1,
) -> LambdaLR:
    """A scheduler stepped once per iteration."""
    steps = tuple(steps)
    return LambdaLR(
        optimizer,
        lambda it: warmup_multistep_factor(
            it, warmup_iters=warmup_iters, warmup_factor=warmup_factor, steps=steps, gamma=gamma
        ),
    )


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 16) -> float:
    """The linear scaling rule: the LR grows with the global batch."""
    return base_lr * global_batch / reference_batch

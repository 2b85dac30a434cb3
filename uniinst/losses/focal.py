"""Sigmoid focal loss, on probabilities (DeFCN's joint score) and on logits (spec §4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

_REDUCTIONS = ("none", "sum", "mean")

# Keeps log(p) and log(1 − p) finite; the computation runs in at least float32 so that 1 − eps
# stays below 1.
_PROB_EPS = 1e-6


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"focal loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def focal_loss_on_probs(
    probs: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> Tensor:
    """Focal loss of probabilities ``probs`` against 0/1 ``targets`` (same shape).

    ``ce = −(t·log p + (1 − t)·log(1 − p))`` with ``p`` clamped to ``[eps, 1 − eps]`` inside the
    logarithms, ``p_t = p·t + (1 − p)(1 − t)``, ``loss = α_t·(1 − p_t)^γ·ce`` with
    ``α_t = α·t + (1 − α)(1 − t)``; a negative ``alpha`` disables the α weighting.
    """
    _check_reduction(reduction)
    dtype = torch.promote_types(probs.dtype, torch.float32)
    probs = probs.to(dtype)
    targets = targets.to(dtype)
    clamped = probs.clamp(_PROB_EPS, 1.0 - _PROB_EPS)
    ce = -(targets * torch.log(clamped) + (1.0 - targets) * torch.log1p(-clamped))
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return _reduce(loss, reduction)


def focal_loss_on_logits(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> Tensor:
    """Sigmoid focal loss of ``logits`` against 0/1 ``targets`` (same shape), as RetinaNet."""
    _check_reduction(reduction)
    return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction=reduction)

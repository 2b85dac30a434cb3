"""Sigmoid focal loss, on the joint probability (DeFCN's σ(cls)·σ(filter)) and on logits (spec §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

_REDUCTIONS = ("none", "sum", "mean")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"focal loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def focal_loss_on_joint_logits(
    cls_logits: Tensor,
    filter_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """Focal loss of the joint probability ``p = σ(a)·σ(b)`` against 0/1 ``targets``.

    ``a = cls_logits`` and ``b = filter_logits`` broadcast against ``targets``.
    ``ce = −(t·log p + (1 − t)·log(1 − p))``, ``loss = α_t·(1 − p_t)^γ·ce`` with
    ``p_t = p·t + (1 − p)(1 − t)`` and ``α_t = α·t + (1 − α)(1 − t)``; a negative ``alpha``
    disables the α weighting. This is the authors' focal loss on ``F.binary_cross_entropy`` of
    ``p``, but with both logarithms taken from the logits, ``log p = logσ(a) + logσ(b)`` and
    ``log(1 − p) = log(σ(−a) + σ(a)·σ(−b))``, so that the gradient survives where ``p`` is too
    close to 0 or 1 for float32 (a clamp of ``p`` at 1e-6 would zero it: a positive at
    ``p = 5e-7`` keeps ``dL/dp ≈ −5e5``, not −6.9).
    """
    _check_reduction(reduction)
    dtype = torch.promote_types(torch.promote_types(cls_logits.dtype, filter_logits.dtype), torch.float32)
    a, b, t = cls_logits.to(dtype), filter_logits.to(dtype), targets.to(dtype)
    log_sig_a = F.logsigmoid(a)
    log_p = log_sig_a + F.logsigmoid(b)
    log_1mp = torch.logaddexp(F.logsigmoid(-a), log_sig_a + F.logsigmoid(-b))
    ce = -(t * log_p + (1.0 - t) * log_1mp)
    # 1 − p_t = p·(1 − t) + (1 − p)·t, with 1 − p from its log: no cancellation near p = 1.
    loss = ce * (log_p.exp() * (1.0 - t) + log_1mp.exp() * t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return _reduce(loss, reduction)


def focal_loss_on_logits(
    logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> Tensor:
    """Sigmoid focal loss of ``logits`` against 0/1 ``targets`` (same shape), as RetinaNet."""
    _check_reduction(reduction)
    return sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction=reduction)

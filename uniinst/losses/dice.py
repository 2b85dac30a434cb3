"""Dice coefficient, Dice loss and mask IoU between per-instance masks (spec §2, §4)."""

from __future__ import annotations

from torch import Tensor


def dice_coefficient(pred: Tensor, target: Tensor, *, eps: float = 1e-5) -> Tensor:
    """``2·Σ pred·target / (Σ pred² + Σ target² + eps)`` over all but the first dim.

    Pass probabilities for the soft Dice (spec Eq. 3) and a 0/1 prediction for the binarised one.

    Args:
        pred: ``[n, ...]``.
        target: ``[n, ...]`` with the same shape.

    Returns:
        ``[n]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"dice_coefficient: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.flatten(1)
    target = target.flatten(1).to(pred.dtype)
    intersection = (pred * target).sum(dim=1)
    denominator = (pred * pred).sum(dim=1) + (target * target).sum(dim=1) + eps
    return 2.0 * intersection / denominator


def dice_loss(probs: Tensor, target: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Per-instance soft Dice loss ``1 − Dice(probs, target)``, ``[n]``."""
    return 1.0 - dice_coefficient(probs, target, eps=eps)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Per-instance ``|pred ∩ target| / |pred ∪ target|``, 0 where the union is empty.

    Args:
        pred: bool ``[n, ...]``.
        target: ``[n, ...]``; a floating target counts as foreground where it exceeds 0.5.

    Returns:
        float ``[n]``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"mask_iou: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.flatten(1).bool()
    target = target.flatten(1)
    target = target > 0.5 if target.is_floating_point() else target.bool()
    intersection = (pred & target).sum(dim=1).float()
    union = (pred | target).sum(dim=1).float()
    return intersection / union.clamp(min=1.0)

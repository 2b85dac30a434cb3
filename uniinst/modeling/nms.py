"""Mask-IoU NMS and Matrix NMS for the many-to-one baseline (spec §6)."""

from __future__ import annotations

import torch
from torch import Tensor

# Pixels per matmul when intersecting flattened masks: bounds the float copy to n × this.
_IOU_CHUNK_PIXELS = 1 << 20


def mask_iou_matrix(masks: Tensor) -> Tensor:
    """Pairwise IoU ``[n, n]`` of bool masks ``[n, H, W]``; two empty masks have IoU 0."""
    return mask_ious(masks, masks)


def mask_ious(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[n, m]`` of each bool mask of ``a`` ``[n, H, W]`` with each of ``b`` ``[m, H, W]``;
    two empty masks have IoU 0.

    Intersections come from matmuls of the flattened masks over pixel chunks, each exact in
    float32, accumulated in float64 so large masks still count exactly.
    """
    for name, masks in (("a", a), ("b", b)):
        if masks.dim() != 3:
            raise ValueError(f"{name} must be masks [n, H, W], got {tuple(masks.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks of sizes {tuple(a.shape[1:])} and {tuple(b.shape[1:])} cannot be compared")
    flat_a, flat_b = a.reshape(a.shape[0], -1).bool(), b.reshape(b.shape[0], -1).bool()
    inter = torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float64, device=a.device)
    for start in range(0, flat_a.shape[1], _IOU_CHUNK_PIXELS):
        part_a = flat_a[:, start : start + _IOU_CHUNK_PIXELS].float()
        part_b = flat_b[:, start : start + _IOU_CHUNK_PIXELS].float()
        inter += (part_a @ part_b.T).double()
    union = flat_a.sum(dim=1).double()[:, None] + flat_b.sum(dim=1).double()[None, :] - inter
    return (inter / union.clamp(min=1)).float()


def _check_inputs(masks: Tensor, scores: Tensor, labels: Tensor) -> None:
    n = masks.shape[0] if masks.dim() == 3 else -1
    if n < 0 or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"expected masks [n, H, W], scores [n], labels [n]; got {tuple(masks.shape)}, "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}"
        )


def mask_nms(masks: Tensor, scores: Tensor, labels: Tensor, *, iou_threshold: float = 0.5) -> Tensor:
    """Class-aware greedy NMS on mask IoU.

    Visits masks by descending score and drops every lower-scored mask of the same class whose
    IoU with a kept one exceeds ``iou_threshold``. Returns the kept indices (int64, into the
    inputs), by descending score.
    """
    _check_inputs(masks, scores, labels)
    order = scores.argsort(descending=True, stable=True)
    if order.numel() == 0:
        return order
    iou = mask_iou_matrix(masks[order])
    sorted_labels = labels[order]
    same_class = sorted_labels[:, None] == sorted_labels[None, :]
    # suppress[i, j]: a kept i removes j; only lower-scored j (upper triangle) can be removed.
    suppress = ((iou > iou_threshold) & same_class).triu(diagonal=1).cpu()
    n = order.numel()
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        if keep[i]:
            keep &= ~suppress[i]
    return order[keep.to(order.device)]


def matrix_nms(
    masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> Tensor:
    """SOLOv2's Matrix NMS: decayed scores ``[n]``, in the input order.

    For masks sorted by score, ``iou[i, j]`` (i scored above j, same class) and the
    compensation ``comp[i]`` = the largest such IoU of mask i with any mask scored above it.
    Mask j's decay is the minimum over higher-scored i of ``f(iou[i, j]) / f(comp[i])``, at
    most 1, with ``exp(-sigma·(iou² − comp²))`` for the gaussian kernel and
    ``(1 − iou) / (1 − comp)`` for the linear one.
    """
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    _check_inputs(masks, scores, labels)
    n = scores.numel()
    if n == 0:
        return scores.clone()
    order = scores.argsort(descending=True, stable=True)
    sorted_labels = labels[order]
    same_class = (sorted_labels[:, None] == sorted_labels[None, :]).triu(diagonal=1)
    iou = mask_iou_matrix(masks[order]).to(scores.device) * same_class
    comp = iou.amax(dim=0)[:, None]
    if kernel == "gaussian":
        ratio = torch.exp(-sigma * (iou**2 - comp**2))
    else:
        # A mask identical to a higher one has comp = 1; the clamp keeps its ratio finite.
        ratio = (1 - iou) / (1 - comp).clamp(min=1e-6)
    # Pairs that are not (higher, lower) of one class have iou = 0 and a ratio >= 1, and the
    # top mask (comp = 0) gives a ratio <= 1 to every other, so they never lower the minimum.
    decay = ratio.amin(dim=0)
    decayed = torch.empty_like(scores)
    decayed[order] = scores[order] * decay.to(scores.dtype)
    return decayed

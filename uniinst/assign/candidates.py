"""Centre-region candidates Ψ_g and the per-candidate tests built on them (spec §2, §4)."""

from __future__ import annotations

import torch
from torch import Tensor


def center_region_candidates(
    locations: Tensor, strides: Tensor, centers: Tensor, boxes: Tensor, *, radius: float = 1.5
) -> tuple[Tensor, Tensor]:
    """All (location, GT) pairs whose location lies in the GT's centre region.

    The region of GT ``g`` for a location of stride ``s`` is the square of half-side
    ``radius * s`` around ``centers[g]`` (the mask's centre of mass), clipped to ``boxes[g]``
    (x1, y1, x2, y2). Every level is considered (no scale ranges). Comparisons are strict, as in
    FCOS/DeFCN centre sampling, so a location on the region's border is not a candidate.

    Args:
        locations: float ``[N, 2]`` (x, y) pixel positions of all locations of one image.
        strides: ``[N]`` stride of each location's level.
        centers: float ``[G, 2]`` (x, y) centres of mass.
        boxes: float ``[G, 4]`` GT boxes.

    Returns:
        ``(loc_idx, gt_idx)``, long ``[C]`` each, ordered by GT, then by location.
    """
    half = radius * strides.to(locations.dtype)[:, None]
    xs = locations[:, 0:1]
    ys = locations[:, 1:2]
    inside = (
        (xs > centers[None, :, 0] - half)
        & (xs < centers[None, :, 0] + half)
        & (ys > centers[None, :, 1] - half)
        & (ys < centers[None, :, 1] + half)
        & (xs > boxes[None, :, 0])
        & (ys > boxes[None, :, 1])
        & (xs < boxes[None, :, 2])
        & (ys < boxes[None, :, 3])
    )
    gt_idx, loc_idx = inside.t().nonzero(as_tuple=True)
    return loc_idx, gt_idx


def locations_inside_masks(
    locations: Tensor, masks: Tensor, loc_idx: Tensor, gt_idx: Tensor, *, mask_stride: int = 4
) -> Tensor:
    """Whether each candidate's location falls inside its GT mask, read at its own pixel.

    ``masks`` holds the masks at the pixels ``(s·j, s·i)`` (``s = mask_stride``: the padded
    full-size masks sampled at ``[0::s, 0::s]``; ``s = 1`` is the full-size mask). A location
    (x, y) reads cell ``(floor(y / s), floor(x / s))``, clamped to the grid: pixel (x, y) itself
    whenever ``s`` divides its coordinates, as 4 does for every FPN location ``j·t + t/2`` of a
    stride ``t`` multiple of 8. A cell is inside when its value exceeds 0.5. (A grid sampled at
    ``[2::4, 2::4]``, the stride-4 Dice targets, would be read 2 px off, at (x + 2, y + 2).)

    Args:
        locations: float ``[N, 2]`` (x, y).
        masks: ``[G, h, w]`` GT masks sampled at ``[0::mask_stride, 0::mask_stride]``.
        loc_idx, gt_idx: long ``[C]`` candidate pairs.

    Returns:
        bool ``[C]``.
    """
    _, height, width = masks.shape
    points = locations[loc_idx]
    cols = torch.div(points[:, 0], mask_stride, rounding_mode="floor").long().clamp(0, width - 1)
    rows = torch.div(points[:, 1], mask_stride, rounding_mode="floor").long().clamp(0, height - 1)
    return masks[gt_idx, rows, cols] > 0.5


def rank_within_groups(groups: Tensor, scores: Tensor) -> Tensor:
    """0-based rank of every element by descending score among the elements of its group.

    Ties keep the input order. Used for the per-GT (and per-GT-per-level) top-k selections.

    Args:
        groups: long ``[C]`` group id of each element.
        scores: ``[C]`` scores.

    Returns:
        long ``[C]``.
    """
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_ranks = torch.arange(order.numel(), device=groups.device) - torch.repeat_interleave(starts, counts)
    ranks = torch.empty_like(sorted_ranks)
    ranks[order] = sorted_ranks
    return ranks

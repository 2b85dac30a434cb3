"""The CondInst/FCOS many-to-one assignment of the baseline (spec §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def fcos_assign(
    locations: Tensor,
    levels: Tensor,
    strides: Tensor,
    boxes: Tensor,
    centers: Tensor,
    *,
    sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
    radius: float = 1.5,
) -> Tensor:
    """Matched GT index of every location, or −1 for background.

    A location is a positive of GT ``g`` when it lies strictly inside the centre region (the
    square of half-side ``radius·stride`` around ``centers[g]``, the mask's centre of mass as in
    AdelaiDet with masks, clipped to the box, hence strictly inside the box too) and the largest
    of its distances (l, t, r, b) to the box falls in its level's range ``[lo, hi]``, with ranges
    ``[−1, s0], [s0, s1], ..., [s_last, ∞]`` built from ``sizes_of_interest``. Among several such
    GTs the one with the smallest box area wins (the lower index on equal areas).

    Args:
        locations: float ``[N, 2]`` (x, y).
        levels: long ``[N]`` level index of each location (0 for P3).
        strides: ``[N]``.
        boxes: float ``[G, 4]`` (x1, y1, x2, y2).
        centers: float ``[G, 2]`` (x, y) centres of mass of the GT masks.

    Returns:
        long ``[N]``.
    """
    num_levels = len(sizes_of_interest) + 1
    if levels.numel() and int(levels.max().item()) >= num_levels:
        raise ValueError(
            f"fcos_assign: level {int(levels.max().item())} has no size range "
            f"({len(sizes_of_interest)} sizes_of_interest give {num_levels} levels)"
        )
    if boxes.shape[0] == 0:
        return torch.full((locations.shape[0],), -1, dtype=torch.long, device=locations.device)
    bounds = torch.tensor([-1.0, *sizes_of_interest, math.inf], dtype=locations.dtype, device=locations.device)
    lower = bounds[levels][:, None]
    upper = bounds[levels + 1][:, None]

    xs = locations[:, 0:1]
    ys = locations[:, 1:2]
    x1, y1, x2, y2 = (boxes[None, :, i] for i in range(4))
    max_distance = torch.stack((xs - x1, ys - y1, x2 - xs, y2 - ys), dim=-1).amax(dim=-1)
    in_range = (max_distance >= lower) & (max_distance <= upper)

    cx, cy = centers[None, :, 0], centers[None, :, 1]
    half = radius * strides.to(locations.dtype)[:, None]
    in_center = (
        (xs > torch.maximum(cx - half, x1))
        & (xs < torch.minimum(cx + half, x2))
        & (ys > torch.maximum(cy - half, y1))
        & (ys < torch.minimum(cy + half, y2))
    )

    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None, :].expand(locations.shape[0], -1)
    areas = torch.where(in_range & in_center, areas, torch.full_like(areas, math.inf))
    min_area, matched = areas.min(dim=1)
    return torch.where(torch.isfinite(min_area), matched, torch.full_like(matched, -1))

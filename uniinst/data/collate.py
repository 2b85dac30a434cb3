"""Batching: zero-pad images to a common size divisible by 32 and build per-image training targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from uniinst.structures import Batch, Sample, Targets


def make_targets(masks: Tensor, labels: Tensor, padded_size: tuple[int, int], *, mask_stride: int = 4) -> Targets:
    """Targets of one image from its uint8 ``[G, h, w]`` masks, in a ``padded_size`` input frame.

    Masks are zero-padded bottom/right to ``padded_size`` and sampled at
    ``[s//2::s, s//2::s]`` (cell ``(i, j)`` stands for pixel ``(s*j + s//2, s*i + s//2)``), and
    at ``[0::s, 0::s]`` for the point masks (cell ``(i, j)`` is pixel ``(s*j, s*i)``).
    Boxes span the full-size mask in continuous pixel coordinates (x2 = last column + 1);
    centres are the mask's centre of mass, each pixel counted at its centre ``(col + 0.5, row + 0.5)``.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [G, h, w], got shape {tuple(masks.shape)}")
    num, h, w = masks.shape
    hp, wp = padded_size
    if labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
    if hp < h or wp < w:
        raise ValueError(f"padded size {padded_size} is smaller than the masks' size {(h, w)}")
    if hp % mask_stride or wp % mask_stride:
        raise ValueError(f"padded size {padded_size} must be a multiple of mask_stride={mask_stride}")

    padded = masks.new_zeros((num, hp, wp))
    padded[:, :h, :w] = masks
    offset = mask_stride // 2
    strided = padded[:, offset::mask_stride, offset::mask_stride].float()
    points = padded[:, ::mask_stride, ::mask_stride].bool()

    # int64 sums: per-row / per-column pixel counts of every mask.
    col_counts = masks.sum(dim=1, dtype=torch.int64)  # [G, w]
    row_counts = masks.sum(dim=2, dtype=torch.int64)  # [G, h]
    area = col_counts.sum(dim=1)
    if bool((area == 0).any()):
        empty = torch.nonzero(area == 0).flatten().tolist()
        raise ValueError(f"masks {empty} are empty; drop empty instances before building targets")

    cols = torch.arange(w, device=masks.device, dtype=torch.float64)
    rows = torch.arange(h, device=masks.device, dtype=torch.float64)
    col_any, row_any = col_counts > 0, row_counts > 0
    x1 = torch.where(col_any, cols, float(w)).amin(dim=1)
    x2 = torch.where(col_any, cols, -1.0).amax(dim=1) + 1
    y1 = torch.where(row_any, rows, float(h)).amin(dim=1)
    y2 = torch.where(row_any, rows, -1.0).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()

    cx = (col_counts.double() * (cols + 0.5)).sum(dim=1) / area
    cy = (row_counts.double() * (rows + 0.5)).sum(dim=1) / area
    centers = torch.stack([cx, cy], dim=1).float()

    return Targets(
        labels=labels.to(torch.int64), masks=strided, point_masks=points, boxes=boxes.reshape(num, 4),
        centers=centers.reshape(num, 2),
    )


def padded_size(
    samples: Sequence[Any], *, size_divisibility: int = 32, mask_stride: int = 4
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The ``(height, width)`` of each sample's ``[3, H, W]`` image, and the padded batch size:
    the largest height and width rounded up to ``size_divisibility``."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if size_divisibility <= 0 or size_divisibility % mask_stride:
        raise ValueError(
            f"size_divisibility must be a positive multiple of mask_stride={mask_stride}, got {size_divisibility}"
        )
    sizes = [(int(s.image.shape[1]), int(s.image.shape[2])) for s in samples]
    hp = -(-max(h for h, _ in sizes) // size_divisibility) * size_divisibility
    wp = -(-max(w for _, w in sizes) // size_divisibility) * size_divisibility
    return sizes, (hp, wp)


def collate(samples: list[Sample], *, size_divisibility: int = 32, mask_stride: int = 4) -> Batch:
    """Pad the samples' images (zeros, bottom/right) to the batch's largest height and width,
    rounded up to ``size_divisibility``, and build their :class:`Targets`."""
    sizes, (hp, wp) = padded_size(samples, size_divisibility=size_divisibility, mask_stride=mask_stride)
    first = samples[0].image
    images = first.new_zeros((len(samples), 3, hp, wp))
    targets = []
    for i, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = sample.image
        targets.append(make_targets(sample.masks, sample.labels, (hp, wp), mask_stride=mask_stride))
    return Batch(
        images=images,
        image_sizes=sizes,
        orig_sizes=[tuple(s.orig_size) for s in samples],
        image_ids=[int(s.image_id) for s in samples],
        targets=targets,
    )

"""CondInst's ``aligned_bilinear``: integer-factor bilinear upsampling that keeps the
feature-map cell centres on the output grid (spec §1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``x`` ``[B, C, H, W]`` by an integer ``factor`` to ``[B, C, f·H, f·W]``.

    Replicate-pad one pixel right and bottom, bilinear-interpolate to ``(f·H+1, f·W+1)`` with
    ``align_corners=True``, replicate-pad ``f//2`` left and top, crop to ``(f·H, f·W)``. The
    input cell ``j`` then lands exactly on output index ``f·j + f//2``, values in between are
    linear interpolations, and the borders (before ``f//2`` and after ``f·(W−1) + f//2``) repeat
    the edge values.
    """
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"aligned_bilinear: factor must be a positive int, got {factor!r}")
    if x.dim() != 4:
        raise ValueError(f"aligned_bilinear: expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]

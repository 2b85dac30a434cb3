"""Input-pixel position of every cell of a feature map (the location convention of
docs/architecture.md)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_locations(
    height: int,
    width: int,
    stride: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[H·W, 2]`` (x, y) positions ``(j·stride + stride//2, i·stride + stride//2)`` of the
    cells of an ``H × W`` map, row-major (row ``i`` outer, column ``j`` inner)."""
    shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.int64, device=device)
    shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.int64, device=device)
    ys, xs = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    return (torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1) + stride // 2).to(dtype)

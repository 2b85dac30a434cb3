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
    # Row and column from the flat index, not a meshgrid: reshaping a broadcast grid makes an
    # exported program branch on maps of one row or column.
    index = torch.arange(height * width, dtype=torch.int64, device=device)
    rows = index // width
    return (torch.stack((index - rows * width, rows), dim=1) * stride + stride // 2).to(dtype)

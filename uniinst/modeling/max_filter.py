"""DeFCN's 3D max filtering across neighbouring FPN levels (spec §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaxFiltering3D(nn.Module):
    """3D max filtering: a max over a spatial ``kernel_size × kernel_size`` window and over the
    levels ``l − tau//2 … l + tau//2``, residual-added to the input of level ``l``.

    A shared 3×3 conv runs on every level; for level ``l`` the conv outputs of the neighbouring
    levels that exist are bilinearly resized to level ``l``'s size, stacked along a depth axis
    and max-pooled (depth kernel ``tau + 1``, spatial kernel ``kernel_size``, stride 1, same
    padding), keeping the slice of level ``l``. Output = ReLU(GroupNorm(pooled + input of
    level ``l``)). At the first and last levels the stack is shorter and the max covers only
    the existing levels.
    """

    def __init__(self, channels: int = 256, kernel_size: int = 3, tau: int = 2, num_groups: int = 32) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MaxFiltering3D: kernel_size must be odd and positive, got {kernel_size!r}")
        if tau < 0 or tau % 2 == 1:
            raise ValueError(f"MaxFiltering3D: tau must be even and non-negative, got {tau!r}")
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(num_groups, channels)
        self.kernel_size = kernel_size
        self.margin = tau // 2
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, 0.0)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        convolved = [self.conv(x) for x in features]
        pad = self.kernel_size // 2
        outputs = []
        for level, x in enumerate(features):
            size = x.shape[-2:]
            first = max(0, level - self.margin)
            last = min(len(features), level + self.margin + 1)
            # The depth window centred on level l spans exactly the stacked levels, so the 3D max
            # equals an elementwise max over the levels followed by a 2D spatial max pool; that
            # avoids materialising the depth stack.
            depth_max = convolved[level]
            for k in range(first, last):
                if k != level:
                    other = F.interpolate(convolved[k], size=size, mode="bilinear", align_corners=False)
                    depth_max = torch.maximum(depth_max, other)
            pooled = F.max_pool2d(depth_max, kernel_size=self.kernel_size, stride=1, padding=pad)
            outputs.append(F.relu(self.norm(pooled + x)))
        return outputs

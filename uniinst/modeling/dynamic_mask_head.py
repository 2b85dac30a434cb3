"""CondInst's dynamic mask head: per-instance 1×1 convs whose weights the controller
predicts, applied to the mask features plus relative coordinates (spec §1)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniinst.modeling.aligned_bilinear import aligned_bilinear
from uniinst.modeling.locations import compute_locations


def _layer_shapes(in_channels: int, channels: int, num_layers: int) -> list[tuple[int, int]]:
    """(out, in) of every dynamic layer; the first also takes the 2 relative-coordinate channels."""
    ins = [in_channels + 2] + [channels] * (num_layers - 1)
    outs = [channels] * (num_layers - 1) + [1]
    return list(zip(outs, ins))


def parse_dynamic_params(
    params: Tensor, in_channels: int, channels: int, num_layers: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``params`` ``[n, P]`` into per-layer weights ``[n, out, in]`` and biases ``[n, out]``.

    Layout (CondInst's): the weights of all layers first, layer after layer, each ``[out, in]``
    row-major, then the biases of all layers.
    """
    shapes = _layer_shapes(in_channels, channels, num_layers)
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]
    if params.dim() != 2 or params.shape[1] != sum(sizes):
        raise ValueError(
            f"parse_dynamic_params: expected params of shape [n, {sum(sizes)}], got {tuple(params.shape)}"
        )
    chunks = torch.split(params, sizes, dim=1)
    n = params.shape[0]
    weights = [w.reshape(n, o, i) for w, (o, i) in zip(chunks[:num_layers], shapes)]
    biases = list(chunks[num_layers:])
    return weights, biases


class DynamicMaskHead(nn.Module):
    """Mask logits of instances from their controller outputs.

    ``forward(mask_feats, params, locations, levels, image_idx)``: ``mask_feats``
    ``[B, in_channels, H, W]`` at ``mask_feat_stride``; for ``n`` instances, ``params``
    ``[n, num_params]``, ``locations`` ``[n, 2]`` (x, y input pixels), ``levels`` ``[n]``
    (FPN level 0..4) and ``image_idx`` ``[n]`` (which image of the batch). Returns mask
    logits ``[n, H·f, W·f]`` at ``mask_out_stride`` (f = mask_feat_stride / mask_out_stride).

    Relative coordinates (instance − pixel, x then y) are divided by the FPN stride of the
    instance's level (``rel_coord_norm="stride"``) or, as CondInst's code, by its size of
    interest (``"soi"``).
    """

    def __init__(
        self,
        in_channels: int = 8,
        channels: int = 8,
        num_layers: int = 3,
        *,
        rel_coord_norm: str = "stride",
        sizes_of_interest: Sequence[int] = (64, 128, 256, 512, 1024),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        mask_feat_stride: int = 8,
        mask_out_stride: int = 4,
    ) -> None:
        super().__init__()
        if rel_coord_norm not in ("stride", "soi"):
            raise ValueError(f"DynamicMaskHead: rel_coord_norm must be 'stride' or 'soi', got {rel_coord_norm!r}")
        if num_layers < 1:
            raise ValueError(f"DynamicMaskHead: num_layers must be >= 1, got {num_layers!r}")
        if len(sizes_of_interest) != len(strides):
            raise ValueError(
                f"DynamicMaskHead: sizes_of_interest {tuple(sizes_of_interest)} and strides {tuple(strides)} "
                "need one value per level"
            )
        if mask_feat_stride % mask_out_stride != 0:
            raise ValueError(
                f"DynamicMaskHead: mask_feat_stride {mask_feat_stride} is not a multiple of mask_out_stride {mask_out_stride}"
            )
        self.in_channels = in_channels
        self.channels = channels
        self.num_layers = num_layers
        self.rel_coord_norm = rel_coord_norm
        self.mask_feat_stride = mask_feat_stride
        self.mask_out_stride = mask_out_stride
        scales = strides if rel_coord_norm == "stride" else sizes_of_interest
        self.register_buffer("level_scales", torch.tensor(scales, dtype=torch.float32), persistent=False)

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in _layer_shapes(self.in_channels, self.channels, self.num_layers))

    def forward(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor, image_idx: Tensor) -> Tensor:
        B, C, H, W = mask_feats.shape
        if C != self.in_channels:
            raise ValueError(f"DynamicMaskHead: mask_feats has {C} channels, expected {self.in_channels}")
        n = params.shape[0]
        weights, biases = parse_dynamic_params(params, self.in_channels, self.channels, self.num_layers)

        pixels = compute_locations(H, W, self.mask_feat_stride, device=mask_feats.device, dtype=locations.dtype)
        scale = self.level_scales.to(locations.dtype)[levels]
        rel = (locations[:, None, :] - pixels[None, :, :]) / scale[:, None, None]
        # All instances of the batch run as one batched matmul: instance k sees its own image.
        x = torch.cat([rel.transpose(1, 2).to(mask_feats.dtype), mask_feats.reshape(B, C, H * W)[image_idx]], dim=1)
        for k, (w, b) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(b.unsqueeze(2), w, x)
            if k < self.num_layers - 1:
                x = F.relu(x)
        logits = x.reshape(n, 1, H, W)
        return aligned_bilinear(logits, self.mask_feat_stride // self.mask_out_stride).squeeze(1)

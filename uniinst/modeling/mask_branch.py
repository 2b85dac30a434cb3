"""CondInst's mask branch: P3–P5 fused into a few mask-feature channels at stride 8 (spec §1)."""

from __future__ import annotations

from torch import Tensor, nn

from uniinst.modeling.aligned_bilinear import aligned_bilinear


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    # "SyncBN" builds BatchNorm2d: the Ray trainer converts it to SyncBatchNorm with several GPU
    # workers (uniinst.modeling.sync_batchnorm); one process trains it as BatchNorm2d.
    norm_layer = nn.GroupNorm(32, out_channels) if norm == "GN" else nn.BatchNorm2d(out_channels)
    return nn.Sequential(conv, norm_layer, nn.ReLU())


class MaskBranch(nn.Module):
    """Refines P3, P4, P5 (``features[0:3]``) with a 3×3 conv each, upsamples P4 and P5 to
    P3 with :func:`aligned_bilinear` and sums them, then ``num_convs`` 3×3 convs and a 1×1
    conv to ``out_channels``. Output ``[B, out_channels, H3, W3]``, stride 8."""

    def __init__(
        self,
        in_channels: int = 256,
        channels: int = 128,
        num_convs: int = 4,
        out_channels: int = 8,
        norm: str = "BN",
    ) -> None:
        super().__init__()
        if norm not in ("BN", "SyncBN", "GN"):
            raise ValueError(f"MaskBranch: norm must be 'BN', 'SyncBN' or 'GN', got {norm!r}")
        self.refine = nn.ModuleList(_conv_norm_relu(in_channels, channels, norm) for _ in range(3))
        self.tower = nn.Sequential(*(_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)))
        self.predictor = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.predictor.weight, a=1)
        nn.init.constant_(self.predictor.bias, 0.0)

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) < 3:
            raise ValueError(f"MaskBranch: needs at least P3, P4, P5, got {len(features)} feature maps")
        x = self.refine[0](features[0])
        # P4 and P5 are P3 downscaled by 2 and 4 (the input is padded to a multiple of 32), so
        # the factors are constants: an exported program keeps them at any input size.
        for factor, refine, feature in zip((2, 4), self.refine[1:], features[1:3]):
            x = x + aligned_bilinear(refine(feature), factor)
        return self.predictor(self.tower(x))

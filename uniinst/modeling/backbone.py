"""ResNet + FPN backbone giving P3–P7 (spec §1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

# depth -> (block, blocks per stage, torchvision's ImageNet weights).
_RESNETS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...], torchvision.models.WeightsEnum]] = {
    18: (BasicBlock, (2, 2, 2, 2), torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    34: (BasicBlock, (3, 4, 6, 3), torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    50: (Bottleneck, (3, 4, 6, 3), torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    101: (Bottleneck, (3, 4, 23, 3), torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
}


# style -> (channel order, pixel mean, pixel std) of the input its ImageNet weights expect, in
# that order and 0-255: torchvision's take RGB divided by ImageNet's std, detectron2's MSRA
# weights (caffe style) take BGR with only the mean removed.
INPUT_FORMATS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "pytorch": ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "caffe": ("BGR", (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)),
}


def _group_norm(num_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, num_channels)


# "SyncBN" builds plain BatchNorm2d: uniinst.modeling.sync_batchnorm converts it in a run of
# several GPU workers (the Ray trainer refuses several CPU workers: torch's SyncBatchNorm needs
# GPU tensors); one process trains it as BatchNorm2d.
_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "FrozenBN": FrozenBatchNorm2d,
    "BN": nn.BatchNorm2d,
    "SyncBN": nn.BatchNorm2d,
    "GN": _group_norm,
}


def _freeze(module: nn.Module) -> None:
    """Stop gradients into ``module`` and turn its BatchNorm layers into FrozenBatchNorm2d,
    so that a frozen stage also keeps its running statistics (detectron2's freeze)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            _freeze(child)


def _stage(
    block: type[BasicBlock | Bottleneck], in_channels: int, planes: int, blocks: int, stride: int, norm: Callable
) -> nn.Sequential:
    """One ResNet stage, named as torchvision names it so that its ImageNet weights load."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels))
    layers = [block(in_channels, planes, stride, downsample, norm_layer=norm)]
    layers += [block(out_channels, planes, norm_layer=norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _stride_in_1x1(stage: nn.Sequential) -> None:
    """Caffe style (detectron2's ``STRIDE_IN_1X1``, the MSRA ResNets): a downsampling
    bottleneck strides in its first 1x1 convolution instead of its 3x3. No shape changes."""
    for block in stage:
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _init_resnet(module: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal convolutions, unit-scale norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetFPN(nn.Module):
    """ResNet-18/34/50/101 (torchvision's blocks and parameter names) with an FPN on C3–C5 and
    P6/P7 from P5.

    ``forward`` returns ``[P3, P4, P5, P6, P7]`` with ``out_channels`` channels each, at
    ``strides`` 8, 16, 32, 64, 128. ``norm`` is the ResNet's normalisation: ``"FrozenBN"``,
    ``"BN"``, ``"SyncBN"`` (built as BatchNorm2d, converted by the Ray trainer with several
    GPU workers) or ``"GN"`` (GroupNorm with 32 groups, only from scratch). ``freeze_at``
    freezes nothing (0), the stem (1), or the stem and res2 (2), as detectron2's FREEZE_AT.
    ``width`` is the stem's and res2's channels (64 in every published ResNet; each later stage
    doubles it): a narrower ResNet trains from scratch in a fraction of the time (32: a third,
    for the CPU benchmark of ``configs/reproduce/synth.yaml``). ``style="caffe"`` (ResNet-50/101
    only) strides in each downsampling bottleneck's first 1x1 convolution, as the MSRA weights
    that the authors' models start from; its input is :data:`INPUT_FORMATS`' ``"caffe"``.
    """

    strides = (8, 16, 32, 64, 128)

    def __init__(
        self,
        depth: int = 50,
        *,
        pretrained: bool = False,
        norm: str = "FrozenBN",
        freeze_at: int = 2,
        out_channels: int = 256,
        width: int = 64,
        style: str = "pytorch",
    ) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNetFPN: depth must be one of {sorted(_RESNETS)}, got {depth!r}")
        if norm not in _NORMS:
            raise ValueError(f"ResNetFPN: norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if freeze_at not in (0, 1, 2):
            raise ValueError(f"ResNetFPN: freeze_at must be 0, 1 or 2, got {freeze_at!r}")
        if pretrained and norm == "GN":
            raise ValueError("ResNetFPN: ImageNet weights need a BatchNorm variant, not norm='GN'")
        if width <= 0 or (norm == "GN" and width % 32):
            raise ValueError(f"ResNetFPN: width must be positive (a multiple of 32 with GN), got {width!r}")
        if pretrained and width != 64:
            raise ValueError(f"ResNetFPN: ImageNet weights are for width 64, got {width!r}")
        if style not in INPUT_FORMATS:
            raise ValueError(f"ResNetFPN: style must be one of {sorted(INPUT_FORMATS)}, got {style!r}")
        block, blocks, weights = _RESNETS[depth]
        if style == "caffe" and block is not Bottleneck:
            raise ValueError(f"ResNetFPN: style 'caffe' is for bottleneck ResNets (50, 101), got depth {depth}")
        if style == "caffe" and pretrained:
            raise ValueError("ResNetFPN: torchvision's ImageNet weights are pytorch style, not style 'caffe'")
        norm_layer = _NORMS[norm]
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, width, 7, 2, 3, bias=False),
                bn1=norm_layer(width),
                relu=nn.ReLU(inplace=True),
                maxpool=nn.MaxPool2d(3, 2, 1),
            )
        )
        channels = [width * 2**i for i in range(4)]
        in_channels = [width] + [c * block.expansion for c in channels[:3]]
        stages = [
            _stage(block, in_channels[i], channels[i], blocks[i], 1 if i == 0 else 2, norm_layer) for i in range(4)
        ]
        if style == "caffe":
            for stage in stages:
                _stride_in_1x1(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        _init_resnet(self)
        # LastLevelP6P7 takes P5 (not C5) only when its in_channels equal out_channels.
        self.fpn = FeaturePyramidNetwork(
            [c * block.expansion for c in channels[1:]],
            out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels),
        )
        self.depth = depth
        self.style = style
        self.out_channels = out_channels
        if pretrained:
            self.load_torchvision_trunk(weights.get_state_dict(progress=False))
        # Frozen last: freezing turns BatchNorm2d into FrozenBatchNorm2d, keeping loaded statistics.
        for stage in (self.stem, self.layer1)[:freeze_at]:
            _freeze(stage)

    def load_torchvision_trunk(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision ResNet's ``state_dict`` into the stem and stages (its ``fc`` is
        dropped); every trunk weight must be there, the FPN keeps its own."""
        trunk = {(f"stem.{k}" if k.startswith(("conv1.", "bn1.")) else k): v for k, v in state.items()}
        result = self.load_state_dict({k: v for k, v in trunk.items() if not k.startswith("fc.")}, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fpn.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"ResNetFPN: not a ResNet-{self.depth} trunk: missing {missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return list(self.fpn(OrderedDict(c3=c3, c4=c4, c5=c5)).values())

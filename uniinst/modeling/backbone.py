"""ResNet + FPN backbone giving P3–P7 (spec §1)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

_RESNETS: dict[int, tuple[Callable[..., torchvision.models.ResNet], torchvision.models.WeightsEnum, int]] = {
    18: (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 1),
    34: (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 1),
    50: (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 4),
    101: (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1, 4),
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


class ResNetFPN(nn.Module):
    """torchvision ResNet (18/34/50/101) with an FPN on C3–C5 and P6/P7 from P5.

    ``forward`` returns ``[P3, P4, P5, P6, P7]`` with ``out_channels`` channels each, at
    ``strides`` 8, 16, 32, 64, 128. ``norm`` is the ResNet's normalisation: ``"FrozenBN"``,
    ``"BN"``, ``"SyncBN"`` (built as BatchNorm2d, converted by the Ray trainer with several
    GPU workers) or ``"GN"`` (GroupNorm with 32 groups, only from scratch). ``freeze_at``
    freezes nothing (0), the stem (1), or the stem and res2 (2), as detectron2's FREEZE_AT.
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
        builder, weights, expansion = _RESNETS[depth]
        resnet = builder(weights=weights if pretrained else None, norm_layer=_NORMS[norm])

        self.stem = nn.Sequential(
            OrderedDict(conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool)
        )
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        for stage in (self.stem, self.layer1)[:freeze_at]:
            _freeze(stage)

        # LastLevelP6P7 takes P5 (not C5) only when its in_channels equal out_channels.
        self.fpn = FeaturePyramidNetwork(
            [128 * expansion, 256 * expansion, 512 * expansion],
            out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels),
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return list(self.fpn(OrderedDict(c3=c3, c4=c4, c5=c5)).values())

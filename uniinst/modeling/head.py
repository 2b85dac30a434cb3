"""The per-location prediction head shared across FPN levels (spec §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from uniinst.modeling.max_filter import MaxFiltering3D


@dataclass
class HeadOutputs:
    """Per-level head outputs, each ``[B, C, H_l, W_l]``: ``cls_logits`` (C = K),
    ``controllers`` (C = number of dynamic parameters), ``iou_preds`` (C = 1, raw re-ranking
    output, or None) and ``filters`` (C = 1, the 3DMF filter logits, or None)."""

    cls_logits: list[Tensor]
    controllers: list[Tensor]
    iou_preds: list[Tensor] | None
    filters: list[Tensor] | None


def _tower(channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(num_groups, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class UniInstHead(nn.Module):
    """Classification and instance towers with the ``cls_logits``, ``controller``,
    ``iou_pred`` (re-ranking) and ``filter`` (after 3D max filtering) predictors.

    ``use_filter=False`` (the CondInst baseline) drops the filter branch and its 3DMF;
    ``use_max_filter=False`` keeps the filter conv but feeds it the instance tower directly;
    ``use_iou=False`` drops the re-ranking head.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        *,
        num_convs: int = 4,
        num_params: int = 169,
        prior_prob: float = 0.01,
        num_groups: int = 32,
        use_filter: bool = True,
        use_max_filter: bool = True,
        max_filter_kernel: int = 3,
        max_filter_tau: int = 2,
        use_iou: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"UniInstHead: prior_prob must be in (0, 1), got {prior_prob!r}")
        self.cls_tower = _tower(in_channels, num_convs, num_groups)
        self.instance_tower = _tower(in_channels, num_convs, num_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.controller = nn.Conv2d(in_channels, num_params, 3, padding=1)
        self.iou_pred = nn.Conv2d(in_channels, 1, 3, padding=1) if use_iou else None
        self.max_filter = (
            MaxFiltering3D(in_channels, max_filter_kernel, max_filter_tau, num_groups)
            if use_filter and use_max_filter
            else None
        )
        self.filter = nn.Conv2d(in_channels, 1, 3, padding=1) if use_filter else None

        for module in (self.cls_tower, self.instance_tower, self.cls_logits, self.iou_pred, self.filter):
            if module is None:
                continue
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.constant_(m.bias, 0.0)
        # The controller's outputs are the dynamic mask head's weights, and its mask logits scale
        # with their product over three layers: the authors' std of 0.01 is for 256 channels, and
        # a narrower head keeps that output scale (at 32 channels the unscaled init left the mask
        # loss flat for hundreds of iterations, docs/reproduction.md).
        nn.init.normal_(self.controller.weight, std=0.01 * math.sqrt(256 / in_channels))
        nn.init.constant_(self.controller.bias, 0.0)
        # Focal-loss prior: every location starts as background with probability 1 - prior_prob.
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        cls_feats = [self.cls_tower(x) for x in features]
        inst_feats = [self.instance_tower(x) for x in features]
        filters = None
        if self.filter is not None:
            filter_feats = inst_feats if self.max_filter is None else self.max_filter(inst_feats)
            filters = [self.filter(x) for x in filter_feats]
        return HeadOutputs(
            cls_logits=[self.cls_logits(x) for x in cls_feats],
            controllers=[self.controller(x) for x in inst_feats],
            iou_preds=None if self.iou_pred is None else [self.iou_pred(x) for x in inst_feats],
            filters=filters,
        )

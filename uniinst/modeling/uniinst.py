"""The UniInst model (and the CondInst-style baseline sharing its code)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from uniinst.config import ModelConfig
from uniinst.modeling.backbone import INPUT_FORMATS, ResNetFPN
from uniinst.modeling.criterion import CondInstCriterion, FlatOutputs, UniInstCriterion
from uniinst.modeling.dynamic_mask_head import DynamicMaskHead
from uniinst.modeling.head import UniInstHead
from uniinst.modeling.locations import compute_locations
from uniinst.modeling.mask_branch import MaskBranch
from uniinst.modeling.nms import mask_nms, matrix_nms
from uniinst.modeling.postprocess import masks_to_boxes, paste_masks, top_candidates
from uniinst.structures import Instances, Targets


def _flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """``[B, C, H_l, W_l]`` per level to ``[B, sum H_l·W_l, C]``."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class UniInst(nn.Module):
    """Box-free instance segmentation with a dynamic mask head.

    ``arch="uniinst"``: one-to-one OYOR training, NMS-free inference scored by
    σ(cls)·σ(filter)·clamp(iou). ``arch="condinst"``: the many-to-one baseline scored by
    σ(cls), optionally followed by mask NMS or Matrix NMS.

    Inputs are uint8 RGB images ``[B, 3, Hp, Wp]`` padded to a multiple of 32, with the
    ``image_sizes`` (h, w) of the content. Training (``targets`` given) returns a dict of
    losses; inference returns one :class:`Instances` per image at ``orig_sizes``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: UniInstHead,
        mask_branch: MaskBranch,
        mask_head: DynamicMaskHead,
        criterion: nn.Module,
        *,
        arch: str = "uniinst",
        input_format: str = "RGB",
        pixel_mean: Sequence[float] = INPUT_FORMATS["pytorch"][1],
        pixel_std: Sequence[float] = INPUT_FORMATS["pytorch"][2],
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        topk_per_level: int = 100,
        score_thresh: float = 0.025,
        max_detections: int = 100,
        mask_thresh: float = 0.5,
        nms: str = "none",
        nms_iou: float = 0.5,
    ) -> None:
        super().__init__()
        if arch not in ("uniinst", "condinst"):
            raise ValueError(f"arch must be 'uniinst' or 'condinst', got {arch!r}")
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if nms not in ("none", "mask", "matrix"):
            raise ValueError(f"nms must be 'none', 'mask' or 'matrix', got {nms!r}")
        self.backbone = backbone
        self.head = head
        self.mask_branch = mask_branch
        self.mask_head = mask_head
        self.criterion = criterion
        self.arch = arch
        self.input_format = input_format
        self.strides = tuple(strides)
        self.topk_per_level = topk_per_level
        self.score_thresh = score_thresh
        self.max_detections = max_detections
        self.mask_thresh = mask_thresh
        self.nms = nms
        self.nms_iou = nms_iou
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def standardize(self, images: Tensor) -> Tensor:
        """RGB images (as every data path gives them) in the backbone's channel order, less the
        pixel mean, over the pixel std."""
        if self.input_format == "BGR":
            images = images.flip(1)
        return (images.float() - self.pixel_mean) / self.pixel_std

    def normalize(self, images: Tensor, image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """:meth:`standardize` and zero in the padding."""
        x = self.standardize(images)
        _, _, H, W = x.shape
        rows = torch.arange(H, device=x.device).view(1, H, 1)
        cols = torch.arange(W, device=x.device).view(1, 1, W)
        sizes = torch.as_tensor(image_sizes, device=x.device).view(-1, 2, 1, 1)
        valid = (rows < sizes[:, 0]) & (cols < sizes[:, 1])
        # Padding must be zero after normalisation, as in detectron2, not -mean/std.
        return x * valid.unsqueeze(1)

    def features(self, images: Tensor, image_sizes: Sequence[tuple[int, int]]) -> tuple[FlatOutputs, Tensor, list[int]]:
        """Backbone, head and mask branch on the padded uint8 ``images``: see :meth:`dense_outputs`."""
        return self.dense_outputs(self.normalize(images, image_sizes))

    def dense_outputs(self, x: Tensor) -> tuple[FlatOutputs, Tensor, list[int]]:
        """Backbone, head and mask branch on normalised input ``x``: the flattened per-location
        outputs, the mask features at stride 8 and the number of locations of each level."""
        feats = self.backbone(x)
        head = self.head(feats)
        mask_feats = self.mask_branch(feats)
        locations, levels, strides, sizes = [], [], [], []
        for level, (m, stride) in enumerate(zip(head.cls_logits, self.strides)):
            h, w = m.shape[-2:]
            loc = compute_locations(h, w, stride, device=m.device)
            locations.append(loc)
            levels.append(torch.full((loc.shape[0],), level, dtype=torch.long, device=m.device))
            strides.append(torch.full((loc.shape[0],), float(stride), device=m.device))
            sizes.append(loc.shape[0])
        out = FlatOutputs(
            cls_logits=_flatten_levels(head.cls_logits),
            controllers=_flatten_levels(head.controllers),
            iou_preds=None if head.iou_preds is None else _flatten_levels(head.iou_preds).squeeze(-1),
            filters=None if head.filters is None else _flatten_levels(head.filters).squeeze(-1),
            locations=torch.cat(locations),
            levels=torch.cat(levels),
            strides=torch.cat(strides),
        )
        return out, mask_feats, sizes

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        targets: list[Targets] | None = None,
        orig_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[Instances]:
        out, mask_feats, level_sizes = self.features(images, image_sizes)
        if targets is not None:
            return self.criterion(self.mask_head, mask_feats, out, targets)
        return self.postprocess(out, mask_feats, level_sizes, image_sizes, orig_sizes or image_sizes)

    def scores(self, out: FlatOutputs) -> Tensor:
        """Per-location, per-class inference score ``[B, N, K]`` (spec §5)."""
        s = out.cls_logits.float().sigmoid()
        if self.arch == "uniinst":
            if out.filters is not None:
                s = s * out.filters.float().sigmoid().unsqueeze(-1)
            if out.iou_preds is not None:
                s = s * out.iou_preds.float().clamp(0.0, 1.0).unsqueeze(-1)
        return s

    def candidates(
        self, scores: Tensor, out: FlatOutputs, mask_feats: Tensor, level_sizes: list[int], b: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``max_detections`` best (location, class) pairs of image ``b`` by its ``scores``
        ``[N, K]`` (:func:`top_candidates`, a fixed number whatever the score): their labels,
        scores and mask logits ``[max_detections, h, w]`` at the mask output
        stride over the padded input."""
        loc_idx, labels, top = top_candidates(
            list(scores.split(level_sizes)), topk_per_level=self.topk_per_level, max_detections=self.max_detections
        )
        logits = self.mask_head(
            mask_feats,
            out.controllers[b, loc_idx],
            out.locations[loc_idx],
            out.levels[loc_idx],
            torch.full_like(loc_idx, b),
        )
        return labels, top, logits

    @torch.no_grad()
    def postprocess(
        self,
        out: FlatOutputs,
        mask_feats: Tensor,
        level_sizes: list[int],
        image_sizes: Sequence[tuple[int, int]],
        orig_sizes: Sequence[tuple[int, int]],
    ) -> list[Instances]:
        scores = self.scores(out)
        results = []
        for b in range(scores.shape[0]):
            labels, kept_scores, logits = self.candidates(scores[b], out, mask_feats, level_sizes, b)
            keep = kept_scores > self.score_thresh
            labels, kept_scores = labels[keep], kept_scores[keep]
            masks = paste_masks(
                logits[keep].float(),
                image_size=tuple(image_sizes[b]),
                orig_size=tuple(orig_sizes[b]),
                mask_out_stride=self.mask_head.mask_out_stride,
                threshold=self.mask_thresh,
            )
            if self.nms == "mask" and len(kept_scores) > 0:
                keep = mask_nms(masks, kept_scores, labels, iou_threshold=self.nms_iou)
                masks, labels, kept_scores = masks[keep], labels[keep], kept_scores[keep]
            elif self.nms == "matrix" and len(kept_scores) > 0:
                kept_scores = matrix_nms(masks, kept_scores, labels)
                keep = torch.nonzero(kept_scores > self.score_thresh).squeeze(1)
                keep = keep[kept_scores[keep].argsort(descending=True)][: self.max_detections]
                masks, labels, kept_scores = masks[keep], labels[keep], kept_scores[keep]
            results.append(Instances(masks=masks, scores=kept_scores, labels=labels, boxes=masks_to_boxes(masks)))
        return results


def build_model(cfg: ModelConfig) -> UniInst:
    """Build the model described by ``cfg`` (``cfg.arch`` selects UniInst or the baseline)."""
    uniinst = cfg.arch == "uniinst"
    backbone = ResNetFPN(
        cfg.backbone.depth,
        pretrained=cfg.backbone.pretrained,
        norm=cfg.backbone.norm,
        freeze_at=cfg.backbone.freeze_at,
        out_channels=cfg.fpn_channels,
        width=cfg.backbone.width,
        style=cfg.backbone.style,
    )
    mask_head = DynamicMaskHead(
        in_channels=cfg.mask_branch.out_channels,
        channels=cfg.mask_head.channels,
        num_layers=cfg.mask_head.num_layers,
        rel_coord_norm=cfg.mask_head.rel_coord_norm,
        sizes_of_interest=tuple(cfg.mask_head.sizes_of_interest),
        mask_out_stride=cfg.mask_head.mask_out_stride,
    )
    head = UniInstHead(
        cfg.fpn_channels,
        cfg.num_classes,
        num_convs=cfg.head.num_convs,
        num_params=mask_head.num_params,
        prior_prob=cfg.head.prior_prob,
        num_groups=cfg.head.num_groups,
        use_filter=uniinst,
        use_max_filter=uniinst and cfg.max_filter.enabled,
        max_filter_kernel=cfg.max_filter.kernel,
        max_filter_tau=cfg.max_filter.tau,
        use_iou=uniinst and cfg.rerank,
    )
    mask_branch = MaskBranch(
        cfg.fpn_channels,
        cfg.mask_branch.channels,
        num_convs=cfg.mask_branch.num_convs,
        out_channels=cfg.mask_branch.out_channels,
        norm=cfg.mask_branch.norm,
    )
    loss = cfg.loss
    criterion: nn.Module
    if uniinst:
        criterion = UniInstCriterion(
            alpha=cfg.oyor.alpha,
            radius=cfg.oyor.radius,
            dice=cfg.oyor.dice,
            max_candidates=cfg.oyor.max_candidates,
            use_aux=cfg.aux.enabled,
            aux_topk=cfg.aux.topk,
            aux_threshold=cfg.aux.threshold,
            focal_alpha=loss.focal_alpha,
            focal_gamma=loss.focal_gamma,
            max_mask_instances=cfg.mask_head.max_instances,
            weight_cls=loss.cls,
            weight_mask=loss.mask,
            weight_rank=loss.rank,
            weight_aux=loss.aux,
        )
    else:
        criterion = CondInstCriterion(
            sizes_of_interest=tuple(cfg.fcos.sizes_of_interest),
            radius=cfg.fcos.radius,
            focal_alpha=loss.focal_alpha,
            focal_gamma=loss.focal_gamma,
            max_mask_instances=cfg.mask_head.max_instances,
            weight_cls=loss.cls,
            weight_mask=loss.mask,
        )
    inf = cfg.inference
    input_format, style_mean, style_std = INPUT_FORMATS[cfg.backbone.style]
    return UniInst(
        backbone,
        head,
        mask_branch,
        mask_head,
        criterion,
        arch=cfg.arch,
        input_format=input_format,
        pixel_mean=cfg.pixel_mean or style_mean,
        pixel_std=cfg.pixel_std or style_std,
        topk_per_level=inf.topk_per_level,
        score_thresh=inf.score_thresh,
        max_detections=inf.max_detections,
        mask_thresh=inf.mask_thresh,
        nms=inf.nms,
        nms_iou=inf.nms_iou,
    )

"""The training losses of one forward pass (spec §4 and, for the baseline, §6).

Both criteria take the flattened head outputs of a batch and return a dict of weighted loss
terms. Assignment runs without gradient; only the matched (or positive) instances' masks are
recomputed with gradient for the mask loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from uniinst.assign.aux import AuxThreshold, aux_many_to_one
from uniinst.assign.fcos import fcos_assign
from uniinst.assign.oyor import OYORAssignment, OYORMatcher
from uniinst.losses.dice import dice_loss
from uniinst.losses.distributed import global_mean, reduce_mean
from uniinst.losses.focal import focal_loss_on_joint_logits, focal_loss_on_logits
from uniinst.modeling.dynamic_mask_head import DynamicMaskHead
from uniinst.structures import Targets


@dataclass
class FlatOutputs:
    """Head outputs of a batch with the levels concatenated: ``cls_logits`` ``[B, N, K]``,
    ``controllers`` ``[B, N, P]``, ``iou_preds`` / ``filters`` ``[B, N]`` (or None), and the
    per-location ``locations`` ``[N, 2]``, ``levels`` ``[N]``, ``strides`` ``[N]``."""

    cls_logits: Tensor
    controllers: Tensor
    iou_preds: Tensor | None
    filters: Tensor | None
    locations: Tensor
    levels: Tensor
    strides: Tensor


def _positives_mask_loss(
    mask_head: DynamicMaskHead,
    mask_feats: Tensor,
    out: FlatOutputs,
    image_idx: Tensor,
    loc_idx: Tensor,
    gt_masks: Tensor,
    max_instances: int,
) -> Tensor:
    """Dice loss of each given (image, location) instance against its GT mask, for at most
    ``max_instances`` of them sampled at random (as CondInst); empty without instances."""
    if loc_idx.numel() == 0:
        return mask_feats.new_zeros(0)
    if loc_idx.numel() > max_instances:
        keep = torch.randperm(loc_idx.numel(), device=loc_idx.device)[:max_instances]
        image_idx, loc_idx, gt_masks = image_idx[keep], loc_idx[keep], gt_masks[keep]
    logits = mask_head(
        mask_feats,
        out.controllers[image_idx, loc_idx],
        out.locations[loc_idx],
        out.levels[loc_idx],
        image_idx,
    )
    return dice_loss(logits.float().sigmoid(), gt_masks)


def _touch(*tensors: Tensor | None) -> Tensor:
    """Zero that depends on every output, so that DDP sees a gradient for every parameter
    even in a batch without any instance."""
    return sum(t.sum() * 0.0 for t in tensors if t is not None)  # type: ignore[return-value]


class UniInstCriterion(nn.Module):
    """OYOR one-to-one losses: focal on the joint probability, Dice, re-ranking L1, and the
    auxiliary many-to-one focal loss."""

    def __init__(
        self,
        *,
        alpha: float = 0.9,
        radius: float = 1.5,
        dice: str = "binary",
        max_candidates: int = 4096,
        use_aux: bool = True,
        aux_topk: int = 9,
        aux_threshold: AuxThreshold = "authors",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_mask_instances: int = 500,
        weight_cls: float = 1.0,
        weight_mask: float = 1.0,
        weight_rank: float = 1.0,
        weight_aux: float = 1.0,
    ) -> None:
        super().__init__()
        self.matcher = OYORMatcher(alpha=alpha, radius=radius, dice=dice, max_candidates=max_candidates)
        self.alpha = alpha
        self.use_aux = use_aux
        self.aux_topk = aux_topk
        self.aux_threshold = aux_threshold
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.max_mask_instances = max_mask_instances
        self.weights = {"cls": weight_cls, "mask": weight_mask, "rank": weight_rank, "aux": weight_aux}

    def assign(
        self, mask_head: DynamicMaskHead, mask_feats: Tensor, out: FlatOutputs, targets: list[Targets]
    ) -> list[OYORAssignment]:
        assert out.filters is not None, "UniInst needs the filter branch"
        assignments = []
        for b, tgt in enumerate(targets):
            image_idx = torch.full((1,), b, dtype=torch.long, device=mask_feats.device)

            def mask_logits_fn(loc_idx: Tensor, b: int = b, image_idx: Tensor = image_idx) -> Tensor:
                return mask_head(
                    mask_feats,
                    out.controllers[b, loc_idx],
                    out.locations[loc_idx],
                    out.levels[loc_idx],
                    image_idx.expand(loc_idx.numel()),
                ).float()

            assignments.append(
                self.matcher(out.cls_logits[b], out.filters[b], out.locations, out.strides, tgt, mask_logits_fn)
            )
        return assignments

    def forward(
        self, mask_head: DynamicMaskHead, mask_feats: Tensor, out: FlatOutputs, targets: list[Targets]
    ) -> dict[str, Tensor]:
        B, N, K = out.cls_logits.shape
        device = out.cls_logits.device
        assignments = self.assign(mask_head, mask_feats, out, targets)

        cls_target = torch.zeros(B, N, K, device=device)
        aux_target = torch.zeros(B, N, K, device=device)
        m_img, m_loc, m_masks, m_iou = [], [], [], []
        c_img, c_loc, c_iou = [], [], []
        num_aux = 0
        for b, (tgt, a) in enumerate(zip(targets, assignments)):
            cls_target[b, a.matched_locs, tgt.labels[a.matched_gts]] = 1.0
            m_img.append(torch.full_like(a.matched_locs, b))
            m_loc.append(a.matched_locs)
            m_masks.append(tgt.masks[a.matched_gts])
            m_iou.append(_matched_candidate_values(a, N))
            c_img.append(torch.full_like(a.cand_locs, b))
            c_loc.append(a.cand_locs)
            c_iou.append(a.cand_iou)
            if self.use_aux:
                pos_locs, pos_gts = aux_many_to_one(
                    out.cls_logits[b].detach(),
                    out.levels,
                    tgt.labels,
                    a.cand_locs,
                    a.cand_gts,
                    a.cand_dice,
                    a.cand_inside,
                    alpha=self.alpha,
                    topk=self.aux_topk,
                    threshold=self.aux_threshold,
                )
                aux_target[b, pos_locs, tgt.labels[pos_gts]] = 1.0
                num_aux += pos_locs.numel()

        num_matched = sum(a.matched_locs.numel() for a in assignments)
        norm_cls = reduce_mean(torch.tensor(float(num_matched), device=device)).clamp(min=1.0)
        loss_cls = (
            focal_loss_on_joint_logits(
                out.cls_logits, out.filters.unsqueeze(-1), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
            / norm_cls
        )

        # Mask and rank terms are means over the instances of the global batch (global_mean),
        # so that splitting a batch over workers does not change the gradient.
        zero = _touch(out.controllers, mask_feats, out.iou_preds)
        dice = _positives_mask_loss(
            mask_head, mask_feats, out, torch.cat(m_img), torch.cat(m_loc), torch.cat(m_masks), self.max_mask_instances
        )
        loss_mask = global_mean(dice) + zero

        losses = {"loss_cls": self.weights["cls"] * loss_cls, "loss_mask": self.weights["mask"] * loss_mask}

        if out.iou_preds is not None:
            pred = out.iou_preds[torch.cat(m_img), torch.cat(m_loc)].float()
            loss_rank = global_mean((pred - torch.cat(m_iou)).abs())
            pred = out.iou_preds[torch.cat(c_img), torch.cat(c_loc)].float()
            loss_rank = loss_rank + global_mean((pred - torch.cat(c_iou)).abs())
            losses["loss_rank"] = self.weights["rank"] * (loss_rank + zero)

        if self.use_aux:
            norm_aux = reduce_mean(torch.tensor(float(num_aux), device=device)).clamp(min=1.0)
            loss_aux = (
                focal_loss_on_logits(
                    out.cls_logits.float(), aux_target, alpha=self.focal_alpha, gamma=self.focal_gamma
                )
                / norm_aux
            )
            losses["loss_aux"] = self.weights["aux"] * loss_aux
        return losses


def _matched_candidate_values(a: OYORAssignment, num_locations: int) -> Tensor:
    """The re-ranking target (mask IoU) of each matched pair, looked up among the candidates."""
    if a.matched_locs.numel() == 0:
        return a.cand_iou.new_zeros(0)
    cand_key = a.cand_gts * num_locations + a.cand_locs
    order = torch.argsort(cand_key)
    sorted_key = cand_key[order]
    pos = torch.searchsorted(sorted_key, a.matched_gts * num_locations + a.matched_locs)
    return a.cand_iou[order[pos]]


class CondInstCriterion(nn.Module):
    """The many-to-one baseline: FCOS positives, focal loss on logits, Dice on every positive."""

    def __init__(
        self,
        *,
        sizes_of_interest: tuple[float, ...] = (64, 128, 256, 512),
        radius: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_mask_instances: int = 500,
        weight_cls: float = 1.0,
        weight_mask: float = 1.0,
    ) -> None:
        super().__init__()
        self.sizes_of_interest = tuple(sizes_of_interest)
        self.radius = radius
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.max_mask_instances = max_mask_instances
        self.weights = {"cls": weight_cls, "mask": weight_mask}

    def assign(self, out: FlatOutputs, targets: list[Targets]) -> list[Tensor]:
        """Matched GT index of every location (−1: background), long ``[N]`` per image."""
        return [
            fcos_assign(
                out.locations,
                out.levels,
                out.strides,
                tgt.boxes,
                tgt.centers,
                sizes_of_interest=self.sizes_of_interest,
                radius=self.radius,
            )
            for tgt in targets
        ]

    def forward(
        self, mask_head: DynamicMaskHead, mask_feats: Tensor, out: FlatOutputs, targets: list[Targets]
    ) -> dict[str, Tensor]:
        B, N, K = out.cls_logits.shape
        device = out.cls_logits.device
        cls_target = torch.zeros(B, N, K, device=device)
        p_img, p_loc, p_masks = [], [], []
        for b, (tgt, gt_of_loc) in enumerate(zip(targets, self.assign(out, targets))):
            pos = torch.nonzero(gt_of_loc >= 0).squeeze(1)
            gts = gt_of_loc[pos]
            cls_target[b, pos, tgt.labels[gts]] = 1.0
            p_img.append(torch.full_like(pos, b))
            p_loc.append(pos)
            p_masks.append(tgt.masks[gts])
        num_pos = sum(p.numel() for p in p_loc)
        norm = reduce_mean(torch.tensor(float(num_pos), device=device)).clamp(min=1.0)
        loss_cls = (
            focal_loss_on_logits(out.cls_logits.float(), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma)
            / norm
        )
        zero = _touch(out.controllers, mask_feats)
        dice = _positives_mask_loss(
            mask_head, mask_feats, out, torch.cat(p_img), torch.cat(p_loc), torch.cat(p_masks), self.max_mask_instances
        )
        loss_mask = global_mean(dice) + zero
        return {"loss_cls": self.weights["cls"] * loss_cls, "loss_mask": self.weights["mask"] * loss_mask}

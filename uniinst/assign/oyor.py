"""OYOR: the one-to-one assignment of GT instances to locations by mask quality (spec §2)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from uniinst.assign.candidates import center_region_candidates, locations_inside_masks, rank_within_groups
from uniinst.losses.dice import dice_coefficient, mask_iou
from uniinst.structures import Targets

logger = logging.getLogger(__name__)

_DICE_MODES = ("binary", "soft")

# Bounds the [pairs, h, w] gathers of predicted and GT masks to this many elements at a time.
_PAIR_CHUNK_ELEMENTS = 1 << 24


@dataclass
class OYORAssignment:
    """Result of OYOR for one image.

    ``matched_locs`` / ``matched_gts``: long ``[M]`` one-to-one pairs, sorted by GT.
    ``cand_locs`` / ``cand_gts``: long ``[C]`` every evaluated candidate pair (ordered by GT,
    then location), with ``cand_dice`` (the Dice used in Q), ``cand_iou`` (mask IoU of the
    prediction thresholded at 0.5, the re-ranking target) and ``cand_inside`` (the location lies
    inside its GT mask, for the auxiliary rule).
    """

    matched_locs: Tensor
    matched_gts: Tensor
    cand_locs: Tensor
    cand_gts: Tensor
    cand_dice: Tensor
    cand_iou: Tensor
    cand_inside: Tensor


class OYORMatcher:
    """Matches each GT to at most one location maximising ``Q = p^(1−α)·D^α`` (Hungarian).

    ``p[n, g] = σ(cls[n, c_g])·σ(filter[n])``; ``D`` is the Dice between location ``n``'s
    predicted mask and GT ``g`` at stride 4, binarised at 0.5 (``dice="binary"``, the authors'
    code) or soft (``dice="soft"``, the paper's Eq. 3). Only centre-region candidates Ψ_g are
    eligible (``Q = −1`` elsewhere).

    All candidate masks of an image come from one ``mask_logits_fn`` call. When an image has
    more than ``max_candidates`` distinct candidate locations, each GT keeps only its
    ``max(1, max_candidates // G)`` best candidates by ``p``, so every GT keeps some and the
    evaluated set stays bounded; the dropped pairs are absent from the returned candidates too.
    """

    def __init__(self, *, alpha: float = 0.9, radius: float = 1.5, dice: str = "binary", max_candidates: int = 4096):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"OYORMatcher: alpha must be in [0, 1], got {alpha}")
        if radius <= 0:
            raise ValueError(f"OYORMatcher: radius must be positive, got {radius}")
        if dice not in _DICE_MODES:
            raise ValueError(f"OYORMatcher: dice must be one of {_DICE_MODES}, got {dice!r}")
        if max_candidates < 1:
            raise ValueError(f"OYORMatcher: max_candidates must be >= 1, got {max_candidates}")
        self.alpha = alpha
        self.radius = radius
        self.dice = dice
        self.max_candidates = max_candidates

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: Tensor,
        filter_logits: Tensor,
        locations: Tensor,
        strides: Tensor,
        targets: Targets,
        mask_logits_fn: Callable[[Tensor], Tensor],
    ) -> OYORAssignment:
        """Assign the GTs of one image.

        Args:
            cls_logits: ``[N, K]``.
            filter_logits: ``[N]``.
            locations: float ``[N, 2]`` (x, y).
            strides: ``[N]``.
            targets: the image's targets; ``targets.masks`` is the stride-4 grid.
            mask_logits_fn: maps long ``[m]`` location indices to mask logits ``[m, h4, w4]`` on
                the grid of ``targets.masks``. Called once with the distinct candidate locations,
                and not at all when there are none.
        """
        device = cls_logits.device
        cand_locs, cand_gts = center_region_candidates(
            locations, strides, targets.centers, targets.boxes, radius=self.radius
        )
        scores = (
            torch.sigmoid(cls_logits[cand_locs, targets.labels[cand_gts]].float())
            * torch.sigmoid(filter_logits[cand_locs].float())
        )
        unique_locs = torch.unique(cand_locs)
        if unique_locs.numel() > self.max_candidates:
            per_gt = max(1, self.max_candidates // len(targets))
            keep = rank_within_groups(cand_gts, scores) < per_gt
            logger.debug(
                "OYOR: %d candidate locations exceed max_candidates=%d; keeping %d per GT",
                unique_locs.numel(), self.max_candidates, per_gt,
            )
            cand_locs, cand_gts, scores = cand_locs[keep], cand_gts[keep], scores[keep]
            unique_locs = torch.unique(cand_locs)
        if cand_locs.numel() == 0:
            empty_long = torch.zeros(0, dtype=torch.long, device=device)
            empty_float = torch.zeros(0, dtype=torch.float32, device=device)
            return OYORAssignment(
                empty_long, empty_long.clone(), empty_long.clone(), empty_long.clone(),
                empty_float, empty_float.clone(), torch.zeros(0, dtype=torch.bool, device=device),
            )

        columns = torch.searchsorted(unique_locs, cand_locs)
        mask_logits = mask_logits_fn(unique_locs)
        expected = (unique_locs.numel(), *targets.masks.shape[1:])
        if tuple(mask_logits.shape) != expected:
            raise ValueError(
                f"OYORMatcher: mask_logits_fn returned shape {tuple(mask_logits.shape)}, expected {expected}"
            )
        cand_dice, cand_iou = self._pair_dice_and_iou(mask_logits, targets.masks, columns, cand_gts)
        quality = scores ** (1.0 - self.alpha) * cand_dice ** self.alpha

        matched_cols, matched_gts = _match(quality, cand_gts, columns, len(targets), unique_locs.numel())
        matched_locs = unique_locs[matched_cols.to(device)]
        cand_inside = locations_inside_masks(locations, targets.point_masks, cand_locs, cand_gts)
        return OYORAssignment(
            matched_locs=matched_locs,
            matched_gts=matched_gts.to(device),
            cand_locs=cand_locs,
            cand_gts=cand_gts,
            cand_dice=cand_dice,
            cand_iou=cand_iou,
            cand_inside=cand_inside,
        )

    def _pair_dice_and_iou(
        self, mask_logits: Tensor, gt_masks: Tensor, columns: Tensor, gts: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Dice (per the configured mode) and mask IoU of every candidate pair, in chunks."""
        pixels = max(1, gt_masks[0].numel())
        chunk = max(1, _PAIR_CHUNK_ELEMENTS // pixels)
        dices, ious = [], []
        for start in range(0, columns.numel(), chunk):
            probs = torch.sigmoid(mask_logits[columns[start:start + chunk]].float())
            target = gt_masks[gts[start:start + chunk]].float()
            binary = probs > 0.5
            pred = binary.float() if self.dice == "binary" else probs
            dices.append(dice_coefficient(pred, target))
            ious.append(mask_iou(binary, target))
        return torch.cat(dices), torch.cat(ious)


def _match(quality: Tensor, gts: Tensor, columns: Tensor, num_gts: int, num_columns: int) -> tuple[Tensor, Tensor]:
    """Hungarian matching on the ``G × (distinct candidate locations)`` quality matrix.

    Non-candidate cells hold −1. Restricting the columns to candidate locations gives the same
    pairs as the full ``G × N`` problem, because every other column is −1 for all GTs. GTs
    without candidates are left out; GTs the optimum pairs with a −1 cell (or leaves unpaired)
    are dropped and the rest solved again, until every pair is a candidate pair.

    Returns:
        ``(columns, gts)`` long CPU tensors of the matched pairs, sorted by GT.
    """
    table = np.full((num_gts, num_columns), -1.0, dtype=np.float64)
    table[gts.cpu().numpy(), columns.cpu().numpy()] = quality.double().cpu().numpy()
    rows = np.unique(gts.cpu().numpy())
    while rows.size:
        row_ind, col_ind = linear_sum_assignment(table[rows], maximize=True)
        valid = table[rows[row_ind], col_ind] >= 0
        if valid.all() and row_ind.size == rows.size:
            return torch.from_numpy(col_ind.astype(np.int64)), torch.from_numpy(rows[row_ind].astype(np.int64))
        rows = rows[row_ind[valid]]
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)

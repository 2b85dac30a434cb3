"""The auxiliary many-to-one assignment of the aux loss: per-level top-k, ≥ mean (spec §4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from uniinst.assign.candidates import rank_within_groups

AuxThreshold = Literal["authors", "valid_mean"]
_THRESHOLDS = ("authors", "valid_mean")


@torch.no_grad()
def aux_many_to_one(
    cls_logits: Tensor,
    levels: Tensor,
    gt_labels: Tensor,
    cand_locs: Tensor,
    cand_gts: Tensor,
    cand_dice: Tensor,
    cand_inside: Tensor,
    *,
    alpha: float = 0.9,
    topk: int = 9,
    threshold: AuxThreshold = "authors",
) -> tuple[Tensor, Tensor]:
    """Positive (location, GT) pairs of the auxiliary loss.

    Quality ``Q_aux = σ(cls[n, c_g])^(1−α)·D[n, g]^α`` (no filter term) over the valid
    candidates: those of Ψ_g that lie inside the GT mask. For each GT, every level contributes
    its ``topk`` best locations and the positives are the valid candidates among them with
    ``Q_aux`` at least the mean of the pooled slots. ``threshold`` sets what the mean is over:

    - ``"authors"`` (the authors' code): every location that is not a valid candidate holds
      ``Q = −1`` in the per-level top-k, so a level contributes ``min(topk, its location count)``
      slots and those its valid candidates leave empty count −1:
      ``(Σ Q_valid − n_empty) / n_slots``. (The authors' ``torch.topk`` fails on a level with
      fewer than ``topk`` locations, which COCO-sized inputs never have; taking all of them is
      its natural reading.)
    - ``"valid_mean"`` (the paper's "above average"): the mean of the pooled valid candidates.

    A location claimed by several GTs goes to the one with the highest ``Q_aux`` (on ties, the
    pair that comes first in the candidate order, i.e. the lower GT index for candidates ordered
    by GT).

    Args:
        cls_logits: ``[N, K]``.
        levels: long ``[N]`` FPN level index of each location.
        gt_labels: long ``[G]``.
        cand_locs, cand_gts: long ``[C]`` candidate pairs (Ψ).
        cand_dice: ``[C]`` Dice of each pair.
        cand_inside: bool ``[C]`` whether the pair's location is inside its GT mask.

    Returns:
        ``(pos_locs, pos_gts)``, long ``[P]``, sorted by location.
    """
    if topk < 1:
        raise ValueError(f"aux_many_to_one: topk must be >= 1, got {topk}")
    if threshold not in _THRESHOLDS:
        raise ValueError(f"aux_many_to_one: threshold must be one of {_THRESHOLDS}, got {threshold!r}")
    locs = cand_locs[cand_inside]
    gts = cand_gts[cand_inside]
    if locs.numel() == 0:
        return locs, gts
    probs = torch.sigmoid(cls_logits[locs, gt_labels[gts]].float())
    quality = probs ** (1.0 - alpha) * cand_dice[cand_inside].float() ** alpha

    num_levels = int(levels.max().item()) + 1
    in_topk = rank_within_groups(gts * num_levels + levels[locs], quality) < topk
    num_gts = int(gt_labels.numel())
    sums = torch.zeros(num_gts, dtype=quality.dtype, device=quality.device)
    sums.index_add_(0, gts[in_topk], quality[in_topk])
    counts = torch.bincount(gts[in_topk], minlength=num_gts)
    if threshold == "authors":
        slots = torch.bincount(levels, minlength=num_levels).clamp(max=topk).sum()
        mean = (sums - (slots - counts)) / slots
    else:
        mean = sums / counts.clamp(min=1)
    positive = in_topk & (quality >= mean[gts])
    locs, gts, quality = locs[positive], gts[positive], quality[positive]

    winner = rank_within_groups(locs, quality) == 0
    locs, gts = locs[winner], gts[winner]
    order = torch.argsort(locs)
    return locs[order], gts[order]

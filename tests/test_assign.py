"""Tests for the assignment rules: candidates, OYOR, the auxiliary rule and the FCOS baseline."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from uniinst.assign.aux import aux_many_to_one
from uniinst.assign.candidates import center_region_candidates, locations_inside_masks, rank_within_groups
from uniinst.assign.fcos import fcos_assign
from uniinst.assign.oyor import OYORAssignment, OYORMatcher
from uniinst.data.collate import make_targets as collate_targets
from uniinst.modeling.criterion import CondInstCriterion, FlatOutputs
from uniinst.structures import Targets


def grid_locations(
    shape_per_level: list[tuple[int, int]], strides: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locations, strides and levels of row-major per-level grids, level after level."""
    locs, strs, levs = [], [], []
    for level, ((h, w), s) in enumerate(zip(shape_per_level, strides)):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        locs.append(torch.stack((xs.flatten() * s + s // 2, ys.flatten() * s + s // 2), dim=1).float())
        strs.append(torch.full((h * w,), s))
        levs.append(torch.full((h * w,), level))
    return torch.cat(locs), torch.cat(strs), torch.cat(levs)


# ---------------------------------------------------------------- candidates


def test_center_region_candidates_hand_case():
    # Level 0: stride 8, 3x3 grid at 4, 12, 20. Level 1: stride 16, 2x2 grid at 8, 24.
    locations, strides, _ = grid_locations([(3, 3), (2, 2)], [8, 16])
    centers = torch.tensor([[12.0, 12.0], [20.0, 20.0]])
    boxes = torch.tensor([[6.0, 0.0, 40.0, 40.0], [16.0, 16.0, 40.0, 40.0]])
    loc_idx, gt_idx = center_region_candidates(locations, strides, centers, boxes)
    # GT 0: stride 8 square (0, 24)^2 clipped to x > 6 keeps x in {12, 20}; stride 16 square
    # (-12, 36)^2 keeps all four. GT 1: stride 8 square (8, 32)^2 clipped to (16, 40) keeps
    # (20, 20) only; stride 16 keeps (24, 24) only.
    assert loc_idx.tolist() == [1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 8, 12]
    assert gt_idx.tolist() == [0] * 10 + [1] * 2
    assert loc_idx.dtype == torch.long and gt_idx.dtype == torch.long


def test_center_region_candidates_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    locations, strides, _ = grid_locations([(8, 8), (4, 4), (2, 2)], [8, 16, 32])
    for _ in range(5):
        g = 4
        xy1 = torch.rand(g, 2, generator=gen) * 40
        wh = torch.rand(g, 2, generator=gen) * 30 + 2
        boxes = torch.cat((xy1, xy1 + wh), dim=1)
        centers = xy1 + wh * torch.rand(g, 2, generator=gen)
        radius = 1.0 + torch.rand(1, generator=gen).item()
        loc_idx, gt_idx = center_region_candidates(locations, strides, centers, boxes, radius=radius)
        expected = []
        for gi in range(g):
            cx, cy = centers[gi].tolist()
            x1, y1, x2, y2 = boxes[gi].tolist()
            for n in range(locations.shape[0]):
                x, y = locations[n].tolist()
                half = radius * strides[n].item()
                if max(cx - half, x1) < x < min(cx + half, x2) and max(cy - half, y1) < y < min(cy + half, y2):
                    expected.append((n, gi))
        assert list(zip(loc_idx.tolist(), gt_idx.tolist())) == expected


def test_center_region_candidates_without_gts():
    locations, strides, _ = grid_locations([(2, 2)], [8])
    loc_idx, gt_idx = center_region_candidates(locations, strides, torch.zeros(0, 2), torch.zeros(0, 4))
    assert loc_idx.numel() == 0 and gt_idx.numel() == 0


def test_locations_inside_masks_reads_clamped_stride4_cell():
    masks = torch.zeros(2, 4, 4)
    masks[0, 1, 2] = 1.0  # stands for pixel (10, 6)
    masks[1, 3, 3] = 1.0
    masks[1, 0, 0] = 1.0
    locations = torch.tensor([[9.0, 5.0], [100.0, 100.0], [0.0, 0.0], [12.0, 4.0]])
    loc_idx = torch.tensor([0, 3, 1, 2, 0])
    gt_idx = torch.tensor([0, 0, 1, 1, 1])
    inside = locations_inside_masks(locations, masks, loc_idx, gt_idx)
    assert inside.dtype == torch.bool
    assert inside.tolist() == [True, False, True, True, False]


def test_locations_inside_masks_reads_the_locations_own_pixel():
    # One GT whose full-size 32x32 mask is the single pixel (12, 20), the location of stride 8
    # at (1, 2). Neighbouring locations and pixels 1 or 2 px away are outside.
    full = torch.zeros(1, 32, 32)
    full[0, 20, 12] = 1.0
    locations, _, _ = grid_locations([(4, 4)], [8])
    loc_idx = torch.arange(16)
    gt_idx = torch.zeros(16, dtype=torch.long)
    expected = [n == 9 for n in range(16)]
    assert locations_inside_masks(locations, full, loc_idx, gt_idx, mask_stride=1).tolist() == expected
    # The stride-4 grid at [0::4, 0::4] holds the same pixels of every location.
    assert locations_inside_masks(locations, full[:, 0::4, 0::4], loc_idx, gt_idx).tolist() == expected
    shifted = torch.zeros(1, 32, 32)
    shifted[0, 21, 13] = shifted[0, 19, 11] = shifted[0, 22, 14] = 1.0
    assert not locations_inside_masks(locations, shifted, loc_idx, gt_idx, mask_stride=1).any()


def test_rank_within_groups():
    groups = torch.tensor([0, 1, 0, 1, 0, 2])
    scores = torch.tensor([0.1, 0.5, 0.9, 0.7, 0.9, 0.3])
    # group 0: 0.9 (idx 2), 0.9 (idx 4, later on ties), 0.1; group 1: 0.7, 0.5; group 2: 0.3.
    assert rank_within_groups(groups, scores).tolist() == [2, 1, 0, 0, 1, 0]


# ---------------------------------------------------------------- OYOR

GRID = [(4, 4)]  # one level of stride 8 on a 32x32 input: locations at 4, 12, 20, 28
STRIDES = [8]


def make_targets(
    boxes: list[list[float]], centers: list[list[float]], masks: torch.Tensor, labels: list[int]
) -> Targets:
    return Targets(
        labels=torch.tensor(labels, dtype=torch.long),
        masks=masks.float(),
        point_masks=masks > 0.5,  # the same grid read as each location's own pixel
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        centers=torch.tensor(centers, dtype=torch.float32).reshape(-1, 2),
    )


class CountingMaskFn:
    """A fixed bank of per-location mask logits, counting calls."""

    def __init__(self, bank: torch.Tensor):
        self.bank = bank
        self.calls: list[torch.Tensor] = []

    def __call__(self, loc_idx: torch.Tensor) -> torch.Tensor:
        self.calls.append(loc_idx.clone())
        return self.bank[loc_idx]


def reference_quality(cls_logits, filter_logits, locations, strides, targets, bank, alpha, dice, radius=1.5):
    """Q for every candidate pair by explicit loops over the spec's formulas."""
    quality = {}
    for g in range(len(targets)):
        cx, cy = targets.centers[g].tolist()
        x1, y1, x2, y2 = targets.boxes[g].tolist()
        gt = targets.masks[g].double()
        for n in range(locations.shape[0]):
            x, y = locations[n].tolist()
            half = radius * strides[n].item()
            if not (max(cx - half, x1) < x < min(cx + half, x2) and max(cy - half, y1) < y < min(cy + half, y2)):
                continue
            p = torch.sigmoid(cls_logits[n, targets.labels[g]].double()) * torch.sigmoid(filter_logits[n].double())
            prob = torch.sigmoid(bank[n].double())
            pred = (prob > 0.5).double() if dice == "binary" else prob
            d = 2 * (pred * gt).sum() / ((pred * pred).sum() + (gt * gt).sum() + 1e-5)
            quality[(n, g)] = (p ** (1 - alpha) * d ** alpha).item()
    return quality


def brute_force_match(quality: dict, num_gts: int, num_locations: int) -> set:
    """Spec §2 matching on the full G x N matrix, by exhaustive search over injective maps."""
    rows = sorted({g for (_, g) in quality})
    while rows:
        best, best_total = None, -math.inf
        for cols in itertools.permutations(range(num_locations), len(rows)):
            total = sum(quality.get((n, g), -1.0) for g, n in zip(rows, cols))
            if total > best_total:
                best, best_total = cols, total
        bad = [g for g, n in zip(rows, best) if (n, g) not in quality]
        if not bad:
            return {(n, g) for g, n in zip(rows, best)}
        rows = [g for g in rows if g not in bad]
    return set()


def random_oyor_case(gen: torch.Generator, num_gts: int, num_classes: int = 3):
    locations, strides, _ = grid_locations(GRID, STRIDES)
    n = locations.shape[0]
    cls_logits = torch.randn(n, num_classes, generator=gen) * 2
    filter_logits = torch.randn(n, generator=gen) * 2
    bank = torch.randn(n, 8, 8, generator=gen) * 3
    masks = (torch.rand(num_gts, 8, 8, generator=gen) > 0.5).float()
    xy1 = torch.rand(num_gts, 2, generator=gen) * 12
    wh = torch.rand(num_gts, 2, generator=gen) * 14 + 8
    boxes = torch.cat((xy1, xy1 + wh), dim=1)
    centers = xy1 + wh * (0.25 + 0.5 * torch.rand(num_gts, 2, generator=gen))
    labels = torch.randint(0, num_classes, (num_gts,), generator=gen)
    targets = Targets(labels=labels, masks=masks, point_masks=masks > 0.5, boxes=boxes, centers=centers)
    return cls_logits, filter_logits, locations, strides, targets, bank


def check_against_brute_force(
    cls_logits, filter_logits, locations, strides, targets, bank, *, alpha=0.9, dice="binary"
):
    matcher = OYORMatcher(alpha=alpha, dice=dice)
    mask_fn = CountingMaskFn(bank)
    result = matcher(cls_logits, filter_logits, locations, strides, targets, mask_fn)
    quality = reference_quality(cls_logits, filter_logits, locations, strides, targets, bank, alpha, dice)
    expected = brute_force_match(quality, len(targets), locations.shape[0])
    got = set(zip(result.matched_locs.tolist(), result.matched_gts.tolist()))
    assert got == expected
    candidates = set(zip(result.cand_locs.tolist(), result.cand_gts.tolist()))
    assert candidates == set(quality)
    assert got <= candidates
    if quality:
        assert len(mask_fn.calls) == 1
        assert mask_fn.calls[0].tolist() == sorted(set(result.cand_locs.tolist()))
    return result


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dice", ["binary", "soft"])
def test_oyor_matches_brute_force_on_random_cases(seed, dice):
    gen = torch.Generator().manual_seed(seed)
    case = random_oyor_case(gen, num_gts=1 + seed % 3)
    check_against_brute_force(*case, dice=dice)


def test_oyor_gt_without_candidates_is_dropped():
    gen = torch.Generator().manual_seed(11)
    cls_logits, filter_logits, locations, strides, targets, bank = random_oyor_case(gen, num_gts=3)
    # GT 1 gets a box that contains no location strictly inside it.
    targets.boxes[1] = torch.tensor([0.0, 0.0, 3.0, 3.0])
    targets.centers[1] = torch.tensor([1.5, 1.5])
    result = check_against_brute_force(cls_logits, filter_logits, locations, strides, targets, bank)
    assert 1 not in result.matched_gts.tolist()
    assert 1 not in result.cand_gts.tolist()
    assert sorted(result.matched_gts.tolist()) == [0, 2]


def test_oyor_two_gts_sharing_one_candidate_keeps_the_better():
    gen = torch.Generator().manual_seed(5)
    cls_logits, filter_logits, locations, strides, _, bank = random_oyor_case(gen, num_gts=2)
    masks = (torch.rand(2, 8, 8, generator=gen) > 0.5).float()
    # Both boxes contain only the location (12, 12), index 5.
    targets = make_targets([[10, 10, 14, 14], [11, 11, 13.5, 13.5]], [[12, 12], [12, 12]], masks, [0, 1])
    result = check_against_brute_force(cls_logits, filter_logits, locations, strides, targets, bank)
    assert result.cand_locs.tolist() == [5, 5]
    quality = reference_quality(cls_logits, filter_logits, locations, strides, targets, bank, 0.9, "binary")
    winner = max((0, 1), key=lambda g: quality[(5, g)])
    assert result.matched_locs.tolist() == [5]
    assert result.matched_gts.tolist() == [winner]


def test_oyor_three_gts_on_two_candidate_locations():
    gen = torch.Generator().manual_seed(9)
    cls_logits, filter_logits, locations, strides, _, bank = random_oyor_case(gen, num_gts=3)
    masks = (torch.rand(3, 8, 8, generator=gen) > 0.5).float()
    # Every box contains only the locations (12, 12) and (20, 12), indices 5 and 6.
    boxes = [[10, 10, 22, 14], [9, 9, 23, 15], [11, 8, 21, 16]]
    targets = make_targets(boxes, [[16, 12], [15, 12], [17, 12]], masks, [0, 1, 2])
    result = check_against_brute_force(cls_logits, filter_logits, locations, strides, targets, bank)
    assert sorted(result.matched_locs.tolist()) == [5, 6]
    assert result.matched_gts.numel() == 2


def one_gt_two_candidates(p_logits: tuple[float, float]):
    """Locations 5 and 6 (x = 12, 20; y = 12) are the only candidates of one GT.

    GT mask on the 8x8 grid: 4 pixels. Location 5 predicts 4 pixels overlapping 2 of them
    (binary Dice 2·2/8), location 6 predicts 2 pixels overlapping 2 (binary Dice 2·2/6).
    """
    locations, strides, _ = grid_locations(GRID, STRIDES)
    n = locations.shape[0]
    masks = torch.zeros(1, 8, 8)
    masks[0, 0, 0:4] = 1.0
    bank = torch.full((n, 8, 8), -5.0)
    bank[5, 0, 0:2] = 5.0
    bank[5, 1, 0:2] = 5.0
    bank[6, 0, 2:4] = 5.0
    cls_logits = torch.full((n, 2), -4.0)
    cls_logits[5, 1] = p_logits[0]
    cls_logits[6, 1] = p_logits[1]
    filter_logits = torch.zeros(n)
    targets = make_targets([[8, 6, 24, 18]], [[16, 12]], masks, [1])
    return cls_logits, filter_logits, locations, strides, targets, bank


def test_oyor_quality_hand_case_and_alpha():
    cls_logits, filter_logits, locations, strides, targets, bank = one_gt_two_candidates((3.0, -5.0))
    p5 = 1 / (1 + math.exp(-3.0)) * 0.5
    p6 = 1 / (1 + math.exp(5.0)) * 0.5
    d5 = 2 * 2 / (4 + 4 + 1e-5)
    d6 = 2 * 2 / (2 + 4 + 1e-5)
    for alpha in (0.9, 1.0, 0.5):
        q5 = p5 ** (1 - alpha) * d5 ** alpha
        q6 = p6 ** (1 - alpha) * d6 ** alpha
        result = OYORMatcher(alpha=alpha)(cls_logits, filter_logits, locations, strides, targets, CountingMaskFn(bank))
        assert result.cand_locs.tolist() == [5, 6]
        torch.testing.assert_close(result.cand_dice, torch.tensor([d5, d6]))
        torch.testing.assert_close(result.cand_iou, torch.tensor([2 / 6, 2 / 4]))
        assert result.matched_locs.tolist() == [5 if q5 > q6 else 6]
    # The hand values make the decision depend on alpha: p wins at 0.9, Dice alone at 1.0.
    assert p5 ** 0.1 * d5 ** 0.9 > p6 ** 0.1 * d6 ** 0.9
    assert d6 > d5


def test_oyor_binary_versus_soft_dice():
    locations, strides, _ = grid_locations(GRID, STRIDES)
    n = locations.shape[0]
    masks = torch.zeros(1, 8, 8)
    masks[0, 0, 0:2] = 1.0
    bank = torch.full((n, 8, 8), -30.0)
    bank[5, 0, 0:4] = torch.tensor([2.0, -1.0, 1.0, -3.0])
    cls_logits = torch.zeros(n, 1)
    filter_logits = torch.zeros(n)
    targets = make_targets([[10, 10, 14, 14]], [[12, 12]], masks, [0])
    binary = OYORMatcher(dice="binary")(cls_logits, filter_logits, locations, strides, targets, CountingMaskFn(bank))
    soft = OYORMatcher(dice="soft")(cls_logits, filter_logits, locations, strides, targets, CountingMaskFn(bank))
    probs = torch.sigmoid(bank[5].double())
    gt = masks[0].double()
    soft_expected = 2 * (probs * gt).sum() / ((probs**2).sum() + 2 + 1e-5)
    # Binarised prediction: pixels 0 and 2 of the first row, overlapping the GT at pixel 0.
    torch.testing.assert_close(binary.cand_dice, torch.tensor([2 * 1 / (2 + 2 + 1e-5)]))
    torch.testing.assert_close(soft.cand_dice, soft_expected.float().reshape(1))
    torch.testing.assert_close(binary.cand_iou, torch.tensor([1 / 3]))
    torch.testing.assert_close(soft.cand_iou, torch.tensor([1 / 3]))


def test_oyor_calls_mask_fn_once_for_shared_candidates():
    gen = torch.Generator().manual_seed(3)
    cls_logits, filter_logits, locations, strides, _, bank = random_oyor_case(gen, num_gts=3)
    masks = (torch.rand(3, 8, 8, generator=gen) > 0.5).float()
    targets = make_targets(
        [[0, 0, 32, 32], [4, 4, 28, 28], [0, 0, 20, 20]], [[16, 16], [14, 15], [10, 10]], masks, [0, 1, 2]
    )
    mask_fn = CountingMaskFn(bank)
    result = OYORMatcher()(cls_logits, filter_logits, locations, strides, targets, mask_fn)
    assert len(mask_fn.calls) == 1
    assert mask_fn.calls[0].tolist() == sorted(set(result.cand_locs.tolist()))
    assert len(set(result.cand_locs.tolist())) < result.cand_locs.numel()


def test_oyor_candidate_cap_keeps_best_by_score_per_gt():
    gen = torch.Generator().manual_seed(7)
    cls_logits, filter_logits, locations, strides, _, bank = random_oyor_case(gen, num_gts=2)
    masks = (torch.rand(2, 8, 8, generator=gen) > 0.5).float()
    targets = make_targets([[0, 0, 32, 32], [0, 0, 32, 32]], [[12, 12], [20, 20]], masks, [0, 1])
    full = OYORMatcher()(cls_logits, filter_logits, locations, strides, targets, CountingMaskFn(bank))
    assert len(set(full.cand_locs.tolist())) > 4
    mask_fn = CountingMaskFn(bank)
    capped = OYORMatcher(max_candidates=4)(cls_logits, filter_logits, locations, strides, targets, mask_fn)
    assert mask_fn.calls[0].numel() <= 4
    for g in range(2):
        locs = full.cand_locs[full.cand_gts == g]
        scores = torch.sigmoid(cls_logits[locs, g]) * torch.sigmoid(filter_logits[locs])
        best = set(locs[scores.argsort(descending=True)[:2]].tolist())
        assert set(capped.cand_locs[capped.cand_gts == g].tolist()) == best
    assert sorted(capped.matched_gts.tolist()) == [0, 1]


def test_oyor_without_gts_returns_empty_tensors():
    locations, strides, _ = grid_locations(GRID, STRIDES)
    n = locations.shape[0]
    targets = Targets(
        labels=torch.zeros(0, dtype=torch.long), masks=torch.zeros(0, 8, 8),
        point_masks=torch.zeros(0, 8, 8, dtype=torch.bool), boxes=torch.zeros(0, 4), centers=torch.zeros(0, 2),
    )
    mask_fn = CountingMaskFn(torch.zeros(n, 8, 8))
    result = OYORMatcher()(torch.zeros(n, 3), torch.zeros(n), locations, strides, targets, mask_fn)
    assert isinstance(result, OYORAssignment)
    assert mask_fn.calls == []
    for name in ("matched_locs", "matched_gts", "cand_locs", "cand_gts"):
        assert getattr(result, name).dtype == torch.long and getattr(result, name).numel() == 0
    assert result.cand_dice.dtype == torch.float32 and result.cand_iou.dtype == torch.float32
    assert result.cand_inside.dtype == torch.bool and result.cand_inside.numel() == 0


def test_oyor_cand_inside_and_bad_mask_shape():
    cls_logits, filter_logits, locations, strides, targets, bank = one_gt_two_candidates((0.0, 0.0))
    # Location 5 is (12, 12) -> cell (3, 3); location 6 is (20, 12) -> cell (3, 5).
    targets.point_masks[0, 3, 3] = True
    result = OYORMatcher()(cls_logits, filter_logits, locations, strides, targets, CountingMaskFn(bank))
    assert result.cand_inside.tolist() == [True, False]
    with pytest.raises(ValueError, match="mask_logits_fn"):
        OYORMatcher()(cls_logits, filter_logits, locations, strides, targets, lambda idx: bank[idx][:, :4])
    with pytest.raises(ValueError, match="dice"):
        OYORMatcher(dice="hard")


# ---------------------------------------------------------------- auxiliary rule


def aux_reference(cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside, alpha, topk, threshold):
    """The authors' procedure on the dense G x N quality matrix (−1 off the valid candidates),
    by loops; ``valid_mean`` averages the valid slots only."""
    n = levels.numel()
    quality = [[-1.0] * n for _ in range(len(gt_labels))]
    for loc, g, d, inside in zip(cand_locs.tolist(), cand_gts.tolist(), cand_dice.tolist(), cand_inside.tolist()):
        if inside:
            p = torch.sigmoid(cls_logits[loc, gt_labels[g]].double()).item()
            quality[g][loc] = p ** (1 - alpha) * d ** alpha
    claims = {}
    for g, row in enumerate(quality):
        if max(row) < 0:
            continue
        pooled = []
        for level in sorted(set(levels.tolist())):
            slots = [(row[loc], -loc) for loc in range(n) if levels[loc].item() == level]
            pooled += [(q, -neg) for q, neg in sorted(slots, reverse=True)[:topk]]
        valid = [q for q, _ in pooled if q >= 0]
        mean = sum(q for q, _ in pooled) / len(pooled) if threshold == "authors" else sum(valid) / len(valid)
        for q, loc in pooled:
            if q >= 0 and q >= mean and (loc not in claims or q > claims[loc][0]):
                claims[loc] = (q, g)
    return {(loc, g) for loc, (_, g) in claims.items()}


@pytest.mark.parametrize("threshold", ["authors", "valid_mean"])
@pytest.mark.parametrize("seed", range(3))
def test_aux_matches_loop_reference_with_dense_candidates(seed, threshold):
    gen = torch.Generator().manual_seed(seed)
    _, _, levels = grid_locations([(5, 5), (5, 5)], [8, 16])
    n, k, g = levels.numel(), 4, 3
    cls_logits = torch.randn(n, k, generator=gen) * 2
    gt_labels = torch.tensor([0, 2, 2])
    pairs = [(loc, gi) for gi in range(g) for loc in range(n) if torch.rand(1, generator=gen).item() < 0.8]
    cand_locs = torch.tensor([loc for loc, _ in pairs])
    cand_gts = torch.tensor([gi for _, gi in pairs])
    # Lower Dice on level 0 puts some of level 1's candidates beyond its top 9 above the mean:
    # they must still not be positives.
    cand_dice = torch.rand(len(pairs), generator=gen) * torch.where(levels[cand_locs] == 0, 0.4, 1.0)
    cand_inside = torch.rand(len(pairs), generator=gen) < 0.85
    for gi in range(g):
        for level in range(2):
            sel = (cand_gts == gi) & (levels[cand_locs] == level) & cand_inside
            assert int(sel.sum()) > 9
    pos_locs, pos_gts = aux_many_to_one(
        cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside, threshold=threshold
    )
    expected = aux_reference(
        cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside, 0.9, 9, threshold
    )
    assert set(zip(pos_locs.tolist(), pos_gts.tolist())) == expected
    assert pos_locs.tolist() == sorted(pos_locs.tolist())
    assert len(set(pos_locs.tolist())) == pos_locs.numel()
    assert 0 < len(expected) < int(cand_inside.sum())


@pytest.mark.parametrize("threshold", ["authors", "valid_mean"])
@pytest.mark.parametrize("seed", range(4))
def test_aux_matches_loop_reference_with_sparse_candidates(seed, threshold):
    # Centre regions as in training: a few candidates a level, some levels without any, and a
    # last level with fewer locations than k.
    gen = torch.Generator().manual_seed(seed)
    _, _, levels = grid_locations([(6, 6), (4, 4), (2, 2), (1, 2)], [8, 16, 32, 64])
    n, g = levels.numel(), 4
    cls_logits = torch.randn(n, 3, generator=gen) * 2
    gt_labels = torch.randint(0, 3, (g,), generator=gen)
    pairs = [(loc, gi) for gi in range(g) for loc in range(n) if torch.rand(1, generator=gen).item() < 0.15]
    cand_locs = torch.tensor([loc for loc, _ in pairs])
    cand_gts = torch.tensor([gi for _, gi in pairs])
    cand_dice = torch.rand(len(pairs), generator=gen)
    cand_inside = torch.rand(len(pairs), generator=gen) < 0.8
    pos_locs, pos_gts = aux_many_to_one(
        cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside, threshold=threshold
    )
    expected = aux_reference(
        cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside, 0.9, 9, threshold
    )
    assert expected
    assert set(zip(pos_locs.tolist(), pos_gts.tolist())) == expected


def test_aux_threshold_hand_case():
    # Levels of 4, 4 and 1 locations, k = 2: 2 + 2 + 1 = 5 slots per GT. alpha = 1 makes Q the Dice.
    _, _, levels = grid_locations([(2, 2), (2, 2), (1, 1)], [8, 16, 32])
    cls_logits = torch.zeros(9, 2)
    gt_labels = torch.tensor([0, 1])
    cand_locs = torch.tensor([0, 1, 2, 4, 5, 2, 3, 6, 7])
    cand_gts = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    cand_dice = torch.tensor([0.75, 0.5, 0.25, 0.25, 1.0, 1.0, 1.0, 1.0, 0.25])
    cand_inside = torch.tensor([True, True, True, True, False, True, True, True, True])
    # GT 0: top-2 slots hold 0.75, 0.5 | 0.25, −1 (location 5 is outside the mask) | −1:
    # threshold (1.5 − 2) / 5 = −0.1, so locations 0, 1, 4 are positives (2 is beyond its level's
    # top 2). The mean of the valid ones, 1.5 / 3 = 0.5, keeps 0 and 1 (Q ≥ mean).
    # GT 1: 1, 1 | 1, 0.25 | −1: threshold (3.25 − 1) / 5 = 0.45 keeps 2, 3, 6, not 7 (it would
    # with k slots on the 1-location level: 1.25 / 6 < 0.25); the valid mean 0.8125 too.
    args = (cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside)
    pos_locs, pos_gts = aux_many_to_one(*args, alpha=1.0, topk=2)
    assert list(zip(pos_locs.tolist(), pos_gts.tolist())) == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 0), (6, 1)]
    pos_locs, pos_gts = aux_many_to_one(*args, alpha=1.0, topk=2, threshold="valid_mean")
    assert list(zip(pos_locs.tolist(), pos_gts.tolist())) == [(0, 0), (1, 0), (2, 1), (3, 1), (6, 1)]
    with pytest.raises(ValueError, match="threshold"):
        aux_many_to_one(*args, threshold="mean_std")


def test_aux_conflict_goes_to_higher_quality_and_outside_mask_never_positive():
    _, _, levels = grid_locations([(2, 2)], [8])
    cls_logits = torch.zeros(4, 2)
    gt_labels = torch.tensor([0, 1])
    # Location 0 is a candidate of both GTs, with the higher Dice for GT 1. Location 3 has the
    # best Dice of GT 0 but lies outside its mask.
    cand_locs = torch.tensor([0, 1, 3, 0, 2])
    cand_gts = torch.tensor([0, 0, 0, 1, 1])
    cand_dice = torch.tensor([0.6, 0.5, 0.99, 0.8, 0.7])
    cand_inside = torch.tensor([True, True, False, True, True])
    args = (cls_logits, levels, gt_labels, cand_locs, cand_gts, cand_dice, cand_inside)
    # p is equal everywhere, so Q follows the Dice. Mean of the valid candidates: GT 0 pools
    # {0, 1} and only 0 reaches it; GT 1 pools {0, 2} and only 0 reaches it. Location 0 goes to
    # GT 1 (higher quality); location 3 never appears.
    pos_locs, pos_gts = aux_many_to_one(*args, threshold="valid_mean")
    assert list(zip(pos_locs.tolist(), pos_gts.tolist())) == [(0, 1)]
    # The authors' mean has 2 empty slots of 4 per GT: negative, so every valid candidate passes.
    pos_locs, pos_gts = aux_many_to_one(*args)
    assert list(zip(pos_locs.tolist(), pos_gts.tolist())) == [(0, 1), (1, 0), (2, 1)]


def test_aux_without_candidates():
    _, _, levels = grid_locations([(2, 2)], [8])
    empty = torch.zeros(0, dtype=torch.long)
    pos_locs, pos_gts = aux_many_to_one(
        torch.zeros(4, 1), levels, torch.zeros(0, dtype=torch.long), empty, empty,
        torch.zeros(0), torch.zeros(0, dtype=torch.bool),
    )
    assert pos_locs.numel() == 0 and pos_gts.numel() == 0 and pos_locs.dtype == torch.long


# ---------------------------------------------------------------- FCOS baseline


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def test_fcos_scale_ranges():
    locations = torch.tensor([[100.0, 100.0]] * 3)
    levels = torch.tensor([0, 1, 2])
    strides = torch.tensor([8, 16, 32])
    # max(l, t, r, b) = 70: only level 1's range [64, 128] accepts it.
    boxes = torch.tensor([[30.0, 30.0, 170.0, 170.0]])
    assert fcos_assign(locations, levels, strides, boxes, box_centers(boxes)).tolist() == [-1, 0, -1]
    # max(l, t, r, b) = 64 lies on the border of levels 0 and 1: both accept it.
    boxes = torch.tensor([[36.0, 36.0, 164.0, 164.0]])
    assert fcos_assign(locations, levels, strides, boxes, box_centers(boxes)).tolist() == [0, 0, -1]


def test_fcos_smaller_area_wins():
    locations = torch.tensor([[100.0, 100.0]])
    levels = torch.tensor([0])
    strides = torch.tensor([8])
    boxes = torch.tensor([[60.0, 60.0, 140.0, 140.0], [70.0, 70.0, 130.0, 130.0]])
    assert fcos_assign(locations, levels, strides, boxes, box_centers(boxes)).tolist() == [1]
    assert fcos_assign(locations, levels, strides, boxes.flip(0), box_centers(boxes.flip(0))).tolist() == [0]
    same = torch.tensor([[70.0, 70.0, 130.0, 130.0], [70.0, 70.0, 130.0, 130.0]])
    assert fcos_assign(locations, levels, strides, same, box_centers(same)).tolist() == [0]


def test_fcos_center_sampling_radius():
    locations = torch.tensor(
        [[111.0, 100.0], [113.0, 100.0], [100.0, 100.0], [140.0, 150.0], [199.0, 100.0], [205.0, 100.0]]
    )
    levels = torch.zeros(6, dtype=torch.long)
    strides = torch.full((6,), 8)
    boxes = torch.tensor([[0.0, 0.0, 200.0, 200.0]])
    # One level with the range [-1, inf], so only the centre region and the box matter.
    centers = torch.tensor([[100.0, 100.0]])
    assign = fcos_assign(locations, levels, strides, boxes, centers, sizes_of_interest=())
    assert assign.tolist() == [0, -1, 0, -1, -1, -1]
    assign = fcos_assign(locations, levels, strides, boxes, centers, sizes_of_interest=(), radius=2.0)
    assert assign.tolist() == [0, 0, 0, -1, -1, -1]
    centers = torch.tensor([[150.0, 150.0]])
    assign = fcos_assign(locations, levels, strides, boxes, centers, sizes_of_interest=())
    assert assign.tolist() == [-1, -1, -1, 0, -1, -1]
    # Centre near the right edge: the square is clipped to the box.
    centers = torch.tensor([[195.0, 100.0]])
    assign = fcos_assign(locations, levels, strides, boxes, centers, sizes_of_interest=())
    assert assign.tolist() == [-1, -1, -1, -1, 0, -1]


def test_condinst_centre_sampling_is_around_the_mask_centre_of_mass():
    # An L-shaped mask: box (0, 16, 64, 64), box centre (32, 40). Its 64x16 bottom bar (1024 px,
    # centre (32, 56)) and 16x32 left bar (512 px, centre (8, 32)) put the centre of mass at
    # (24, 48).
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 48:, :] = 1
    masks[0, 16:48, :16] = 1
    targets = collate_targets(masks, torch.tensor([0]), (64, 64))
    torch.testing.assert_close(targets.centers, torch.tensor([[24.0, 48.0]]))
    locations, strides, levels = grid_locations([(8, 8)], [8])
    n = locations.shape[0]
    out = FlatOutputs(
        cls_logits=torch.zeros(1, n, 1), controllers=torch.zeros(1, n, 1), iou_preds=None, filters=None,
        locations=locations, levels=levels, strides=strides,
    )
    (assign,) = CondInstCriterion(sizes_of_interest=()).assign(out, [targets])
    # Half-side 12 around (24, 48), strict: x in {20, 28}, y in {44, 52} (around the box centre
    # it would be x in {28, 36}, y in {36, 44}).
    expected = [n for n, (x, y) in enumerate(locations.tolist()) if x in (20, 28) and y in (44, 52)]
    assert torch.nonzero(assign >= 0).flatten().tolist() == expected
    assert set(assign[expected].tolist()) == {0}


def test_fcos_without_boxes_and_bad_level():
    locations = torch.tensor([[4.0, 4.0]])
    assign = fcos_assign(locations, torch.tensor([0]), torch.tensor([8]), torch.zeros(0, 4), torch.zeros(0, 2))
    assert assign.tolist() == [-1]
    with pytest.raises(ValueError, match="level"):
        fcos_assign(locations, torch.tensor([5]), torch.tensor([8]), torch.zeros(1, 4), torch.zeros(1, 2))


def test_inside_the_mask_is_read_at_the_locations_own_pixel():
    # A one-pixel GT at (12, 12), the pixel of the stride-8 location (1, 1), and its neighbour
    # location (20, 12): only the first is inside. The Dice targets' grid ([2::4]) stands for
    # pixel (14, 14) in that cell and would call neither inside.
    mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
    mask[0, 12, 12] = 1
    targets = collate_targets(mask, torch.tensor([0]), (32, 32))
    locations = torch.tensor([[12.0, 12.0], [20.0, 12.0]])
    pairs = (torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert locations_inside_masks(locations, targets.point_masks, *pairs).tolist() == [True, False]
    assert locations_inside_masks(locations, targets.masks, *pairs).tolist() == [False, False]

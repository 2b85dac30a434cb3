"""NMS-free post-processing (spec §5) and the baseline's NMS (spec §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniinst.modeling import nms as nms_module
from uniinst.modeling.nms import mask_iou_matrix, mask_ious, mask_nms, matrix_nms
from uniinst.modeling.postprocess import masks_to_boxes, paste_masks, select_top_locations


def _hand_levels() -> list[torch.Tensor]:
    # Level 0: locations 0-2, level 1: 3-4, level 2: 5; K = 2 classes.
    return [
        torch.tensor([[0.9, 0.01], [0.02, 0.5], [0.3, 0.8]]),
        torch.tensor([[0.7, 0.6], [0.024, 0.026]]),
        torch.tensor([[0.4, 0.95]]),
    ]


def test_select_top_locations_threshold_and_level_offsets():
    loc, labels, scores = select_top_locations(_hand_levels(), topk_per_level=3, score_thresh=0.025)
    # (location, class, score); 0.024 at (4, 0) falls under the threshold.
    expected = [(5, 1, 0.95), (0, 0, 0.9), (2, 1, 0.8), (3, 0, 0.7), (3, 1, 0.6), (1, 1, 0.5), (5, 0, 0.4)]
    expected.append((4, 1, 0.026))
    assert loc.tolist() == [e[0] for e in expected]
    assert labels.tolist() == [e[1] for e in expected]
    assert scores.tolist() == pytest.approx([e[2] for e in expected])
    assert loc.dtype == torch.long and labels.dtype == torch.long


def test_select_top_locations_per_level_topk_and_global_cap():
    loc, labels, scores = select_top_locations(_hand_levels(), topk_per_level=2, score_thresh=0.025, max_detections=4)
    # Level 0 loses (1, 1, 0.5) to its top-2; the cap of 4 then drops 0.6 and 0.4.
    assert list(zip(loc.tolist(), labels.tolist())) == [(5, 1), (0, 0), (2, 1), (3, 0)]
    assert scores.tolist() == pytest.approx([0.95, 0.9, 0.8, 0.7])


def test_select_top_locations_nothing_above_threshold():
    loc, labels, scores = select_top_locations([torch.full((4, 3), 0.01), torch.full((2, 3), 0.02)])
    assert loc.shape == labels.shape == scores.shape == (0,)


def test_select_top_locations_matches_global_topk_on_random_scores():
    g = torch.Generator().manual_seed(0)
    sizes = [1600, 400, 100, 25, 9]
    levels = [torch.rand(n, 20, generator=g) for n in sizes]
    loc, labels, scores = select_top_locations(levels)
    assert len(scores) == 100
    # With distinct scores every global top-100 pair is in its level's top 100.
    flat = torch.cat(levels).reshape(-1)
    ref_scores, ref_idx = flat.topk(100)
    assert torch.equal(scores, ref_scores)
    assert torch.equal(loc, ref_idx // 20)
    assert torch.equal(labels, ref_idx % 20)
    assert torch.equal(torch.cat(levels)[loc, labels], scores)


def test_select_top_locations_rejects_mismatched_levels():
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        select_top_locations([torch.rand(4, 3), torch.rand(4, 2)])


def test_paste_masks_rectangle_is_cropped_and_resized():
    logits = torch.full((1, 8, 10), -10.0)
    # Cells y 1..3, x 2..5 stand for input pixels y 6..14, x 10..22 (cell i at 4i + 2): the
    # 0.5 crossings fall on pixels y 4 and 16, x 8 and 24, i.e. the rectangle's edges lie at
    # y 4.5..16.5, x 8.5..24.5 in continuous input coordinates.
    logits[0, 1:4, 2:6] = 10.0
    logits[0, 7, :] = 10.0  # lies in the padding only: must be cropped away
    masks = paste_masks(logits, image_size=(28, 36), orig_size=(56, 72), mask_out_stride=4)
    assert masks.shape == (1, 56, 72) and masks.dtype == torch.bool
    box = masks_to_boxes(masks)[0]
    # The original image is the input crop scaled by 2 in both directions.
    assert box.tolist() == pytest.approx([17.0, 9.0, 49.0, 33.0], abs=1.0)
    assert not masks[0, 40:].any()
    assert masks[0, 12:30, 20:46].all()  # bilinear blending rounds only the corners


def test_paste_masks_empty_and_chunked(monkeypatch):
    empty = paste_masks(torch.zeros(0, 8, 10), image_size=(30, 40), orig_size=(15, 20))
    assert empty.shape == (0, 15, 20) and empty.dtype == torch.bool
    logits = torch.randn(5, 8, 10, generator=torch.Generator().manual_seed(1))
    whole = paste_masks(logits, image_size=(30, 37), orig_size=(45, 50))
    monkeypatch.setattr("uniinst.modeling.postprocess._PASTE_CHUNK_ELEMENTS", 1)
    assert torch.equal(paste_masks(logits, image_size=(30, 37), orig_size=(45, 50)), whole)


def test_paste_masks_rejects_image_larger_than_padding():
    with pytest.raises(ValueError, match="padded size"):
        paste_masks(torch.zeros(1, 8, 10), image_size=(33, 40), orig_size=(33, 40))


def test_masks_to_boxes_hand_case():
    masks = torch.zeros(3, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:5] = True
    masks[1, 5, 6] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 5, 4], [6, 5, 7, 6], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, 6, 7, dtype=torch.bool)).shape == (0, 4)


def _random_masks(n: int, seed: int, size: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlapping random rectangles, distinct scores, three classes."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        x1, y1 = rng.integers(0, size - 4, 2)
        w, h = rng.integers(3, 10, 2)
        masks[i, y1 : y1 + h, x1 : x1 + w] = True
    masks[n - 1] = False  # an empty mask must not break anything
    scores = torch.from_numpy(rng.permutation(n) / n + 0.01).float()
    labels = torch.from_numpy(rng.integers(0, 3, n))
    return torch.from_numpy(masks), scores, labels


def _naive_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def test_mask_iou_matrix_matches_pairwise_and_chunks(monkeypatch):
    masks, _, _ = _random_masks(12, seed=3)
    m = masks.numpy()
    ref = torch.tensor([[_naive_iou(m[i], m[j]) for j in range(12)] for i in range(12)])
    assert torch.allclose(mask_iou_matrix(masks), ref, atol=1e-6)
    monkeypatch.setattr(nms_module, "_IOU_CHUNK_PIXELS", 7)
    assert torch.allclose(mask_iou_matrix(masks), ref, atol=1e-6)
    assert torch.allclose(mask_ious(masks[:5], masks[5:]), ref[:5, 5:], atol=1e-6)  # two sets: [5, 7]
    with pytest.raises(ValueError, match="cannot be compared"):
        mask_ious(masks, masks[:, :-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresh", [0.3, 0.5])
def test_mask_nms_matches_greedy_loop(seed, thresh):
    masks, scores, labels = _random_masks(40, seed)
    m = masks.numpy()
    kept_ref: list[int] = []
    for i in np.argsort(-scores.numpy(), kind="stable"):
        if all(labels[k] != labels[i] or _naive_iou(m[k], m[i]) <= thresh for k in kept_ref):
            kept_ref.append(int(i))
    keep = mask_nms(masks, scores, labels, iou_threshold=thresh)
    assert keep.tolist() == kept_ref
    assert 0 < len(kept_ref) < 40  # the case really suppresses something


def test_mask_nms_empty():
    keep = mask_nms(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.shape == (0,) and keep.dtype == torch.long


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_matches_formula_loop(kernel):
    sigma = 2.0
    masks, scores, labels = _random_masks(30, seed=5)
    m = masks.numpy()
    order = np.argsort(-scores.numpy(), kind="stable")

    def f(x: float) -> float:
        return float(np.exp(-sigma * x * x)) if kernel == "gaussian" else 1.0 - x

    comp = {}
    for pos, i in enumerate(order):
        higher = [k for k in order[:pos] if labels[k] == labels[i]]
        comp[i] = max((_naive_iou(m[k], m[i]) for k in higher), default=0.0)
    expected = np.zeros(30)
    for pos, j in enumerate(order):
        decay = 1.0
        for i in order[:pos]:
            if labels[i] == labels[j]:
                decay = min(decay, f(_naive_iou(m[i], m[j])) / f(comp[i]))
        expected[j] = scores[j].item() * decay

    out = matrix_nms(masks, scores, labels, kernel=kernel, sigma=sigma)
    assert torch.allclose(out, torch.from_numpy(expected).float(), atol=1e-5)
    assert (out <= scores + 1e-7).all() and (out < scores - 1e-3).any()
    assert out[order[0]] == scores[order[0]]


def test_matrix_nms_rejects_unknown_kernel():
    masks, scores, labels = _random_masks(3, seed=0)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(masks, scores, labels, kernel="box")

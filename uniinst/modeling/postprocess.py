"""NMS-free inference post-processing (spec §5): top locations, masks at the original size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from uniinst.modeling.aligned_bilinear import aligned_bilinear

# Elements of the float mask stack held at once while pasting. On CPU, 16 MiB blocks stay
# in the allocator's reused heap, whereas larger ones are mapped afresh (and page-faulted)
# for every chunk, which made pasting several times slower; GPU caching allocators have no
# such cost, and fewer, larger kernels win there.
_PASTE_CHUNK_ELEMENTS_CPU = 1 << 22
_PASTE_CHUNK_ELEMENTS = 1 << 26


def top_candidates(
    scores: list[Tensor],
    *,
    topk_per_level: int = 100,
    max_detections: int = 100,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``max_detections`` best (location, class) pairs of one image, always that many.

    ``scores[l]`` is ``[N_l, K]`` for level ``l``. Per level, the ``topk_per_level`` best pairs;
    across levels the best ``max_detections`` of those. Returns ``(loc_idx, labels, scores)``,
    each ``[max_detections]`` and sorted by descending score, where ``loc_idx`` indexes the
    concatenation of all levels' locations. Where a level (or the image) has fewer pairs, the
    missing slots score -1 at location 0.

    Every top-k has a size fixed by its arguments, not the input, so the same code runs in the
    exported program at any image size.
    """
    if len(scores) == 0:
        raise ValueError("top_candidates needs at least one level of scores")
    num_classes = scores[0].shape[-1]
    for level, s in enumerate(scores):
        if s.dim() != 2 or s.shape[1] != num_classes:
            raise ValueError(f"scores[{level}] must be [N, {num_classes}] like scores[0], got {tuple(s.shape)}")

    cand_scores, cand_flat = [], []
    offset = 0
    for s in scores:
        numel = s.shape[0] * num_classes
        # Padding with -1 keeps topk_per_level slots at any map size; a padded slot's index is
        # clamped onto the level's last real pair (its score of -1 marks it).
        flat = torch.cat([s.reshape(-1), s.new_full((topk_per_level,), -1.0)])
        top, idx = flat.topk(topk_per_level)
        cand_scores.append(top)
        cand_flat.append(idx.clamp(max=numel - 1) + offset * num_classes)
        offset += s.shape[0]
    cand_scores.append(scores[0].new_full((max_detections,), -1.0))
    cand_flat.append(torch.zeros(max_detections, dtype=cand_flat[0].dtype, device=cand_flat[0].device))
    all_scores = torch.cat(cand_scores)
    all_flat = torch.cat(cand_flat)
    top, order = all_scores.topk(max_detections)
    flat = all_flat[order]
    return flat // num_classes, flat % num_classes, top


def select_top_locations(
    scores: list[Tensor],
    *,
    topk_per_level: int = 100,
    score_thresh: float = 0.025,
    max_detections: int = 100,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`top_candidates` scoring above ``score_thresh``: ``(loc_idx, labels, scores)``,
    each ``[n]`` with ``n <= max_detections``, sorted by descending score. Any score above the
    threshold outranks every score below it, so thresholding the final top-k equals
    thresholding first."""
    loc_idx, labels, top = top_candidates(scores, topk_per_level=topk_per_level, max_detections=max_detections)
    keep = top > score_thresh
    return loc_idx[keep], labels[keep], top[keep]


def paste_masks(
    mask_logits: Tensor,
    *,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_out_stride: int = 4,
    threshold: float = 0.5,
) -> Tensor:
    """Binary masks at the original image size from stride-``mask_out_stride`` logits.

    ``mask_logits`` is ``[n, h, w]`` over the padded input; ``image_size`` is the (h, w) of the
    resized image inside the padding, ``orig_size`` the (h, w) of the image as stored. Returns
    bool ``[n, H0, W0]``: sigmoid, ``aligned_bilinear`` up to the padded size, crop to
    ``image_size``, bilinear resize to ``orig_size``, ``> threshold``.
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [n, h, w], got {tuple(mask_logits.shape)}")
    n, h, w = mask_logits.shape
    img_h, img_w = (int(v) for v in image_size)
    out_h, out_w = (int(v) for v in orig_size)
    if img_h > h * mask_out_stride or img_w > w * mask_out_stride:
        raise ValueError(
            f"image_size {(img_h, img_w)} exceeds the padded size {(h * mask_out_stride, w * mask_out_stride)} "
            f"of the mask logits"
        )
    out = torch.empty((n, out_h, out_w), dtype=torch.bool, device=mask_logits.device)
    if n == 0:
        return out
    padded = h * w * mask_out_stride**2
    budget = _PASTE_CHUNK_ELEMENTS_CPU if mask_logits.device.type == "cpu" else _PASTE_CHUNK_ELEMENTS
    chunk = max(1, budget // max(padded, out_h * out_w))
    # A same-size bilinear resize (align_corners=False) is the identity, so it is skipped.
    resize = (img_h, img_w) != (out_h, out_w)
    for start in range(0, n, chunk):
        probs = mask_probabilities(mask_logits[start : start + chunk], mask_out_stride, (img_h, img_w))
        if resize:
            probs = F.interpolate(probs, size=(out_h, out_w), mode="bilinear", align_corners=False)
        out[start : start + chunk] = probs[:, 0] > threshold
    return out


def mask_probabilities(mask_logits: Tensor, mask_out_stride: int, image_size: tuple[int, int]) -> Tensor:
    """Mask probabilities ``[n, 1, h, w]`` over the resized image ``image_size`` (h, w) from
    stride-``mask_out_stride`` logits ``[n, h', w']`` over its padding: sigmoid, then
    ``aligned_bilinear``, then the crop."""
    probs = aligned_bilinear(mask_logits[:, None].float().sigmoid(), mask_out_stride)
    return probs[:, :, : image_size[0], : image_size[1]]


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes ``[n, 4]`` (x1, y1, x2, y2) of bool masks ``[n, H, W]``; x2 and y2 are one
    past the last pixel, so a single pixel at (x, y) gives (x, y, x + 1, y + 1). Empty masks
    give all-zero boxes."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [n, H, W], got {tuple(masks.shape)}")
    n, h, w = masks.shape
    if masks.numel() == 0:
        return torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    masks = masks.bool()
    cols = masks.any(dim=1)
    rows = masks.any(dim=2)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    boxes = torch.stack(
        [
            torch.where(cols, xs, w).amin(dim=1),
            torch.where(rows, ys, h).amin(dim=1),
            torch.where(cols, xs + 1, 0).amax(dim=1),
            torch.where(rows, ys + 1, 0).amax(dim=1),
        ],
        dim=1,
    ).float()
    nonempty = cols.any(dim=1, keepdim=True)
    return torch.where(nonempty, boxes, torch.zeros_like(boxes))

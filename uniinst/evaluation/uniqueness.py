"""Duplicates per instance: how far a model's predictions are from one per object.

The paper's claim is a property of the predictions themselves: a one-to-one model predicts
each object once, so NMS has nothing to remove. The measure counts what NMS *would* remove:
the predictions scoring at least ``score_threshold`` that class-aware mask NMS at
``iou_threshold`` suppresses, divided by the number of ground-truth instances. A model that
predicts each object exactly once scores 0; one that predicts each object twice above the
threshold scores about 1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util

from uniinst.modeling.nms import mask_nms

SCORE_THRESHOLD = 0.3
IOU_THRESHOLD = 0.5


def suppressed_count(results: Sequence[dict], *, score_threshold: float, iou_threshold: float) -> int:
    """How many of the COCO ``results`` (RLE masks) scoring ``>= score_threshold`` mask NMS
    at ``iou_threshold`` (per image and category) removes.

    Predictions below the threshold are left out first: greedy NMS visits by descending
    score, so a lower-scored prediction never removes a higher-scored one and leaving them
    out changes nothing above the threshold.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["score"] >= score_threshold:
            by_image[int(r["image_id"])].append(r)
    removed = 0
    for dets in by_image.values():
        masks = mask_util.decode([d["segmentation"] for d in dets])  # [H, W, n]
        keep = mask_nms(
            torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).bool(),
            torch.tensor([float(d["score"]) for d in dets]),
            torch.tensor([int(d["category_id"]) for d in dets]),
            iou_threshold=iou_threshold,
        )
        removed += len(dets) - keep.numel()
    return removed


def duplicates_per_instance(
    results: Sequence[dict],
    num_instances: int,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
) -> float:
    """:func:`suppressed_count` divided by ``num_instances`` (the ground truth's instances)."""
    if num_instances <= 0:
        raise ValueError(f"num_instances must be positive, got {num_instances}")
    removed = suppressed_count(results, score_threshold=score_threshold, iou_threshold=iou_threshold)
    return removed / num_instances

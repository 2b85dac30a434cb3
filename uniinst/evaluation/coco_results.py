"""Predictions as COCO results: compressed-RLE masks, JSON save and load."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from uniinst.structures import Instances

RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def instances_to_coco_results(
    instances: Instances, image_id: int, contiguous_to_cat_id: Sequence[int]
) -> list[dict]:
    """One COCO result dict per instance of one image.

    Each has ``image_id``, ``category_id`` (the dataset's id of the contiguous label),
    ``segmentation`` (compressed RLE with ``counts`` as str, so it is JSON-ready), ``score``
    and ``bbox`` ([x, y, w, h] of the mask).
    """
    n = len(instances)
    if n == 0:
        return []
    masks = instances.masks
    if masks.dim() != 3 or masks.shape[0] != n:
        raise ValueError(f"image {image_id}: instances.masks must be [{n}, H, W], got {tuple(masks.shape)}")
    labels = instances.labels.cpu().tolist()
    scores = instances.scores.cpu().tolist()
    for label in labels:
        if not 0 <= label < len(contiguous_to_cat_id):
            raise ValueError(
                f"image {image_id}: label {label} outside the {len(contiguous_to_cat_id)} known categories"
            )
    # pycocotools reads masks as [H, W, n] in column-major order.
    stacked = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_util.encode(stacked)
    boxes = mask_util.toBbox(rles)
    results = []
    for rle, box, label, score in zip(rles, boxes, labels, scores):
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(contiguous_to_cat_id[label]),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "score": float(score),
                "bbox": [float(v) for v in box],
            }
        )
    return results


def save_results(results: list[dict], path: str | Path) -> Path:
    """Write COCO results as a JSON list; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(results, f)
    return path


def validate_results(results: object, source: str) -> list[dict]:
    """Check that ``results`` is a list of COCO segmentation results; ``source`` names it in
    the error."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a JSON list, got {type(results).__name__}")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: result {i} must be an object, got {type(r).__name__}")
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            raise ValueError(f"{source}: result {i} lacks key(s) {', '.join(missing)}")
        seg = r["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise ValueError(f"{source}: result {i} segmentation must be an RLE with 'size' and 'counts'")
    return results


def load_results(path: str | Path) -> list[dict]:
    """Read COCO results written by :func:`save_results` (or any COCO segm results file)."""
    path = Path(path)
    try:
        with path.open() as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_results(results, str(path))

"""Predictions as COCO results: compressed-RLE masks, JSON save and load."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from uniinst.evaluation.categories import NOT_IN_GT
from uniinst.structures import Instances

RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def instances_to_coco_results(instances: Instances, image_id: int, label_to_cat: Sequence[int]) -> list[dict]:
    """One COCO result dict per instance of one image.

    Each has ``image_id``, ``category_id`` (``label_to_cat[label]``, see
    :func:`~uniinst.evaluation.categories.label_to_category_ids`; a label mapped to
    :data:`~uniinst.evaluation.categories.NOT_IN_GT` gives no result), ``segmentation``
    (compressed RLE with ``counts`` as str, so it is JSON-ready), ``score`` and ``bbox``
    ([x, y, w, h] of the mask).
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
        if not 0 <= label < len(label_to_cat):
            raise ValueError(f"image {image_id}: label {label} outside the {len(label_to_cat)} known categories")
    # pycocotools reads masks as [H, W, n] in column-major order.
    stacked = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_util.encode(stacked)
    boxes = mask_util.toBbox(rles)
    results = []
    for rle, box, label, score in zip(rles, boxes, labels, scores):
        if label_to_cat[label] == NOT_IN_GT:
            continue
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_cat[label]),
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


def validate_results(
    results: object,
    source: str,
    *,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    category_ids: Collection[int] | None = None,
) -> list[dict]:
    """Check that ``results`` is a list of COCO segmentation results, each with a finite score
    and an RLE whose runs fill its size; ``source`` names it in the error, with the result's
    index. Given the ground truth's ``image_sizes`` (id -> (height, width)) and
    ``category_ids``, each result must name one of them, at its image's size."""
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a JSON list, got {type(results).__name__}")
    for i, r in enumerate(results):
        problem = _result_problem(r, image_sizes, category_ids)
        if problem is not None:
            raise ValueError(f"{source}: result {i}: {problem}")
    return results


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _result_problem(
    r: object, image_sizes: Mapping[int, tuple[int, int]] | None, category_ids: Collection[int] | None
) -> str | None:
    if not isinstance(r, dict):
        return f"must be an object, got {type(r).__name__}"
    missing = [k for k in RESULT_KEYS if k not in r]
    if missing:
        return f"lacks key(s) {', '.join(missing)}"
    image_id, category_id, score, seg = r["image_id"], r["category_id"], r["score"], r["segmentation"]
    if not _is_int(image_id) or (image_sizes is not None and image_id not in image_sizes):
        return f"names image_id {image_id!r}, which is not in the ground truth"
    if not _is_int(category_id) or (category_ids is not None and category_id not in category_ids):
        return f"names category_id {category_id!r}, which is not in the ground truth"
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        return f"score {score!r} is not a finite number"
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        return "segmentation must be an RLE with 'size' and 'counts'"
    size = seg["size"]
    if not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
        return f"segmentation size must be [height, width], got {size!r}"
    if image_sizes is not None and tuple(size) != image_sizes[image_id]:
        height, width = image_sizes[image_id]
        return f"segmentation size {size} does not match image {image_id}, which is [{height}, {width}] (height, width)"
    return _counts_problem(seg["counts"], size[0] * size[1])


def _counts_problem(counts: object, num_pixels: int) -> str | None:
    """Why ``counts`` is not an RLE of ``num_pixels`` pixels, or None. Checked here because
    pycocotools' C decoder trusts its input: it reads past a truncated string and writes
    past the mask for runs longer than it."""
    if isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_runs(counts.decode("latin-1") if isinstance(counts, bytes) else counts)
        except ValueError as err:
            return f"segmentation counts are not a compressed RLE: {err}"
    elif isinstance(counts, list) and all(_is_int(c) for c in counts):
        runs = counts
    else:
        return "segmentation counts must be a compressed RLE string or a list of run lengths"
    if any(run < 0 for run in runs):
        return "segmentation counts hold a negative run length"
    if sum(runs) != num_pixels:
        return f"segmentation counts cover {sum(runs)} pixels, not the {num_pixels} of its size"
    return None


def rle_string_runs(counts: str) -> list[int]:
    """The run lengths of a compressed RLE string, decoded as pycocotools' ``rleFrString``
    does: 6-bit characters from ``'0'`` on, 5 value bits each, bit 6 continuing the number,
    each run after the third stored as the difference to the run two before it."""
    runs: list[int] = []
    value = shift = 0
    for char in counts:
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {char!r} is outside the RLE alphabet")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift  # sign extension
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("it ends inside a number")
    return runs


def load_results(
    path: str | Path,
    *,
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    category_ids: Collection[int] | None = None,
) -> list[dict]:
    """Read COCO results written by :func:`save_results` (or any COCO segm results file),
    checked by :func:`validate_results`."""
    path = Path(path)
    try:
        with path.open() as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_results(results, str(path), image_sizes=image_sizes, category_ids=category_ids)

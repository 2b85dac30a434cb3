"""Reader for COCO-format instance annotations: one JSON file plus a folder of images."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

logger = logging.getLogger(__name__)

_ON_ERROR_MODES = ("raise", "skip")
# Pixels a box may reach past the image border: COCO boxes come from float polygon extremes.
_BBOX_TOLERANCE = 1.0


@dataclass
class CocoRecord:
    """One decoded image with its annotations at the stored size.

    ``image`` is uint8 RGB ``[H, W, 3]``; ``masks`` uint8 ``[G, H, W]`` (0/1), one per
    non-crowd instance, with ``labels`` int64 ``[G]`` contiguous class ids; ``crowd_masks``
    uint8 ``[Gc, H, W]`` holds the crowd regions, which training ignores.
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    image_id: int
    file_name: str
    crowd_masks: np.ndarray


class _AnnotationError(Exception):
    """A single annotation is unusable; the reader raises it or skips the annotation."""


class CocoAnnotations:
    """The validated content of a COCO-format annotation file, without pixels.

    Fed an already decoded JSON object, so the file may come from anywhere (a local path, an
    object store). Images are sorted by id; each image's annotations keep the file's order.
    Categories sorted by id map to contiguous ids ``0..K-1``.

    Args:
        data: the decoded JSON.
        source: the file's path or URI, named in error messages.
        on_error: what to do with an invalid annotation (unknown image or category,
            malformed or degenerate segmentation, a box outside its image): ``"raise"`` a
            ValueError naming the annotation, or ``"skip"`` it, recording the message in
            :attr:`skipped`. Structural faults of the file itself (missing keys, duplicate
            image or category ids, invalid image entries) always raise.
        require_ids: every annotation needs a unique integer ``id`` (anything keyed on
            annotations, such as shards and their evaluation ground truth, needs one).
    """

    def __init__(self, data: Any, *, source: str, on_error: str = "raise", require_ids: bool = False) -> None:
        if on_error not in _ON_ERROR_MODES:
            raise ValueError(f"on_error must be one of {_ON_ERROR_MODES}, got {on_error!r}")
        _check_top_level(data, source)
        self.source = source
        self.require_ids = require_ids

        categories = sorted(_parse_categories(data["categories"], source), key=lambda c: c["id"])
        self.categories: list[dict] = categories
        self.class_names: list[str] = [c["name"] for c in categories]
        self.contiguous_to_cat_id: list[int] = [c["id"] for c in categories]
        self.cat_id_to_contiguous: dict[int, int] = {cat_id: i for i, cat_id in enumerate(self.contiguous_to_cat_id)}

        self.images: list[dict] = sorted(_parse_images(data["images"], source), key=lambda im: im["id"])
        self.image_ids: list[int] = [im["id"] for im in self.images]
        index_of_image = {image_id: i for i, image_id in enumerate(self.image_ids)}

        self.skipped: list[str] = []
        # Per image (in image_ids order): dicts with id, image_id, category_id, label, iscrowd, segmentation.
        self.annotations: list[list[dict]] = [[] for _ in self.images]
        seen_ids: set[int] = set()
        for position, ann in enumerate(data["annotations"]):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            ann_name = f"annotation {ann_id}" if ann_id is not None else f"annotation #{position}"
            try:
                parsed = self._parse_annotation(ann, index_of_image, seen_ids)
            except _AnnotationError as err:
                message = f"{ann_name} in {source}: {err}"
                if on_error == "raise":
                    raise ValueError(message) from None
                self.skipped.append(message)
                continue
            self.annotations[index_of_image[parsed["image_id"]]].append(parsed)
        if self.skipped:
            logger.warning("skipped %d invalid annotations of %s", len(self.skipped), source)

    def _parse_annotation(self, ann: Any, index_of_image: dict[int, int], seen_ids: set[int]) -> dict:
        if not isinstance(ann, dict):
            raise _AnnotationError(f"expected an object, got {type(ann).__name__}")
        ann_id = ann.get("id")
        if self.require_ids:
            if not isinstance(ann_id, int) or isinstance(ann_id, bool):
                raise _AnnotationError(f"needs an integer field 'id', got {ann_id!r}")
            if ann_id in seen_ids:
                raise _AnnotationError("its id appears twice")
            seen_ids.add(ann_id)
        for key in ("image_id", "category_id", "segmentation"):
            if key not in ann:
                raise _AnnotationError(f"missing field '{key}'")
        image_id, category_id = ann["image_id"], ann["category_id"]
        if not isinstance(image_id, int) or image_id not in index_of_image:
            raise _AnnotationError(f"field 'image_id' names unknown image {image_id!r}")
        if not isinstance(category_id, int) or category_id not in self.cat_id_to_contiguous:
            raise _AnnotationError(f"field 'category_id' names unknown category {category_id!r}")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise _AnnotationError(f"field 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        info = self.images[index_of_image[image_id]]
        segmentation = _check_segmentation(ann["segmentation"], info["height"], info["width"], image_id)
        if "bbox" in ann:
            _check_bbox(ann["bbox"], info["height"], info["width"])
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": category_id,
            "label": self.cat_id_to_contiguous[category_id],
            "iscrowd": bool(iscrowd),
            "segmentation": segmentation,
        }


class CocoDataset:
    """COCO-format instance segmentation annotations over an image folder.

    The JSON is parsed and validated once (by :class:`CocoAnnotations`); images and masks
    are decoded on :meth:`load`. Segmentations may be polygons, uncompressed RLE (``counts``
    a list) or compressed RLE (``counts`` a string). Categories sorted by id map to
    contiguous ids ``0..K-1``.

    Args:
        json_path: the COCO-format annotation file.
        image_root: the folder holding the images named by ``file_name``.
        on_error: what to do with an invalid annotation (unknown image or category,
            malformed or degenerate segmentation, a box outside its image): ``"raise"`` a
            ValueError naming the annotation, or ``"skip"`` it, recording the message in
            :attr:`skipped`. Structural faults of the file itself (missing keys, duplicate
            image or category ids, invalid image entries) always raise.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path, *, on_error: str = "raise") -> None:
        self.gt_json_path = Path(json_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder {self.image_root} (for {self.gt_json_path}) does not exist")
        index = CocoAnnotations(_read_json(self.gt_json_path), source=str(self.gt_json_path), on_error=on_error)
        self.categories: list[dict] = index.categories
        self.class_names: list[str] = index.class_names
        self.contiguous_to_cat_id: list[int] = index.contiguous_to_cat_id
        self.cat_id_to_contiguous: dict[int, int] = index.cat_id_to_contiguous
        self.image_ids: list[int] = index.image_ids
        self.skipped: list[str] = index.skipped
        self._images = index.images
        self._annotations = index.annotations

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_annotations(self) -> int:
        """Number of annotations read (crowd ones included, skipped ones not)."""
        return sum(len(anns) for anns in self._annotations)

    def num_instances(self, index: int) -> int:
        """Number of non-crowd annotations of image ``index``, read from the JSON alone."""
        return sum(1 for ann in self._annotations[index] if not ann["iscrowd"])

    def load(self, index: int) -> CocoRecord:
        """Decode image ``index`` (in :attr:`image_ids` order) and its masks."""
        if not 0 <= index < len(self._images):
            raise IndexError(f"image index {index} out of range for {len(self._images)} images of {self.gt_json_path}")
        info = self._images[index]
        height, width = info["height"], info["width"]
        image = self._read_image(info)
        annotations = self._annotations[index]
        if annotations:
            rles = [segmentation_to_rle(ann["segmentation"], height, width) for ann in annotations]
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        else:
            masks = np.zeros((0, height, width), dtype=np.uint8)
        crowd = np.array([ann["iscrowd"] for ann in annotations], dtype=bool)
        return CocoRecord(
            image=image,
            masks=masks[~crowd],
            labels=np.array([ann["label"] for ann in annotations if not ann["iscrowd"]], dtype=np.int64),
            image_id=info["id"],
            file_name=info["file_name"],
            crowd_masks=masks[crowd],
        )

    def _read_image(self, info: dict) -> np.ndarray:
        path = self.image_root / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (image id {info['id']}) does not exist")
        try:
            with Image.open(path) as pil:
                # COCO's width/height describe the stored pixels, so EXIF orientation is not applied.
                if pil.size != (info["width"], info["height"]):
                    raise ValueError(
                        f"image {path} (image id {info['id']}) is {pil.size[0]}x{pil.size[1]} (WxH) but "
                        f"{self.gt_json_path} says {info['width']}x{info['height']}"
                    )
                return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode image {path} (image id {info['id']}): {err}") from err


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err


def _check_top_level(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {source} must hold a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {source} has no '{key}' list")


def _parse_categories(entries: list, path: str) -> list[dict]:
    categories, seen = [], set()
    for position, cat in enumerate(entries):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise ValueError(f"category #{position} in {path} needs an integer 'id' and a string 'name'")
        if cat["id"] in seen:
            raise ValueError(f"category id {cat['id']} appears twice in {path}")
        seen.add(cat["id"])
        categories.append({"id": cat["id"], "name": cat["name"]})
    if not categories:
        raise ValueError(f"annotation file {path} defines no categories")
    return categories


def _parse_images(entries: list, path: str) -> list[dict]:
    images, seen = [], set()
    for position, im in enumerate(entries):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int):
            raise ValueError(f"image #{position} in {path} needs an integer 'id'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise ValueError(f"image {im['id']} in {path} needs a non-empty 'file_name'")
        for key in ("height", "width"):
            if not isinstance(im.get(key), int) or im[key] <= 0:
                raise ValueError(f"image {im['id']} in {path} needs a positive integer '{key}'")
        if im["id"] in seen:
            raise ValueError(f"image id {im['id']} appears twice in {path}")
        seen.add(im["id"])
        images.append({key: im[key] for key in ("id", "file_name", "height", "width")})
    return images


def _check_segmentation(segmentation: Any, height: int, width: int, image_id: int) -> list | dict:
    """Validate a segmentation against its image (``image_id``, of that size); return it in
    a form pycocotools takes."""
    if isinstance(segmentation, list):
        if not segmentation:
            raise _AnnotationError("field 'segmentation' is an empty polygon list")
        for k, polygon in enumerate(segmentation):
            _check_polygon(polygon, k, height, width, image_id)
        return [[float(v) for v in polygon] for polygon in segmentation]
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, list) or [*size] != [height, width]:
            raise _AnnotationError(
                f"field 'segmentation' RLE size {size!r} does not match the image's [{height}, {width}]"
            )
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise _AnnotationError(
                    f"field 'segmentation' RLE counts must be non-negative integers summing to {height * width}"
                )
            area = sum(counts[1::2])
        elif isinstance(counts, (str, bytes)):
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
            area = int(mask_utils.area({"size": [height, width], "counts": counts}))
        else:
            raise _AnnotationError("field 'segmentation' RLE needs 'counts' as a list or a string")
        if area == 0:
            raise _AnnotationError("field 'segmentation' RLE has zero area")
        return {"size": [height, width], "counts": counts}
    raise _AnnotationError(
        f"field 'segmentation' must be a polygon list or an RLE object, got {type(segmentation).__name__}"
    )


def _check_polygon(polygon: Any, k: int, height: int, width: int, image_id: int) -> None:
    if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon):
        raise _AnnotationError(f"field 'segmentation' polygon {k} must be a list of finite numbers")
    if len(polygon) < 6 or len(polygon) % 2:
        raise _AnnotationError(
            f"field 'segmentation' polygon {k} has {len(polygon)} coordinates (needs an even number, at least 6)"
        )
    xs, ys = np.asarray(polygon[0::2], dtype=np.float64), np.asarray(polygon[1::2], dtype=np.float64)
    shoelace = np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))
    if shoelace == 0:
        raise _AnnotationError(f"field 'segmentation' polygon {k} has zero area")
    # COCO polygons may reach a little past the border; only one covering no pixel of the
    # image is wrong. Rasterising is left to the few that reach past it at all.
    inside = xs.min() >= 0 and ys.min() >= 0 and xs.max() <= width and ys.max() <= height
    disjoint = xs.max() <= 0 or ys.max() <= 0 or xs.min() >= width or ys.min() >= height
    if not inside and (disjoint or mask_utils.area(mask_utils.frPyObjects([polygon], height, width))[0] == 0):
        raise _AnnotationError(
            f"field 'segmentation' polygon {k} lies outside image {image_id} ({width}x{height}, WxH): "
            "it covers none of its pixels"
        )


def _check_bbox(bbox: Any, height: int, width: int) -> None:
    """A box ``[x, y, w, h]`` must lie inside its image, give or take a pixel of rounding."""
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise _AnnotationError(f"field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise _AnnotationError(f"field 'bbox' {bbox} has a negative width or height")
    tol = _BBOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _AnnotationError(f"field 'bbox' {bbox} lies outside the {width}x{height} (WxH) image")


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A validated segmentation as one compressed RLE (a merged one for multi-part polygons)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation

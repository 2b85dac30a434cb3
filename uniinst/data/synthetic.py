"""Synthetic COCO-format dataset of overlapping, occluding shapes.

Each class is a shape drawn with a random colour, size and rotation over a lightly textured
background. Shapes are painted in z-order, so later ones occlude earlier ones, and every
annotation is the instance's *visible* mask (compressed RLE). ``occlusion="heavy"`` places
shapes on top of each other, in the spirit of OCHuman (paper Table 7): most instances overlap
another with box IoU > 0.5, which :func:`occlusion_stats` measures.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES = ("circle", "square", "triangle", "ellipse", "star", "ring", "cross", "hexagon")
OCCLUSION_MODES = ("normal", "heavy")
DEFAULT_SPLITS: Mapping[str, int] = MappingProxyType({"train": 64, "val": 16})

# An instance may lose at most this fraction of its pixels to later shapes ...
_MAX_HIDDEN_FRACTION = 0.8
# ... and must keep at least this many visible pixels.
_MIN_VISIBLE_PIXELS = 20
# Placement proposals per wanted instance before an image settles for fewer instances.
_PLACEMENT_TRIES = 25
# In the heavy split, the chance that a new shape is stacked on an existing one rather than
# starting a new group.
_HEAVY_STACK_PROB = 0.75
_MIN_COLOUR_DISTANCE = 70.0
_JPEG_QUALITY = 95


def check_shapes(shapes: Sequence[str], num_classes: int) -> None:
    """Raise ``ValueError`` unless ``shapes`` are distinct names of :data:`SHAPES`, at least
    ``num_classes`` (>= 1) of them."""
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or len(set(shapes)) != len(shapes):
        raise ValueError(f"shapes must be distinct names among {', '.join(SHAPES)}, got {list(shapes)}")
    if not 1 <= num_classes <= len(shapes):
        raise ValueError(f"num_classes must be between 1 and the {len(shapes)} shapes given, got {num_classes}")


def generate_synthetic_coco(
    out_dir: str | Path,
    *,
    splits: Mapping[str, int] = DEFAULT_SPLITS,
    image_size: int | tuple[int, int] = 256,
    num_classes: int = 4,
    shapes: Sequence[str] = SHAPES,
    min_instances: int = 2,
    max_instances: int = 6,
    occlusion: str = "normal",
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``out_dir/annotations/instances_<split>.json`` and ``out_dir/<split>/*.jpg``.

    Args:
        out_dir: output folder (created if needed).
        splits: number of images per split name.
        image_size: side of the square images, or their (height, width).
        num_classes: how many classes: category ``i + 1`` is ``shapes[i]``.
        shapes: the class shapes in category order, distinct names of :data:`SHAPES`; the
            first ``num_classes`` are used.
        min_instances, max_instances: range of the number of shapes wanted per image; an image
            may end up with fewer when no valid placement is found for one.
        occlusion: ``"normal"`` (shapes placed independently) or ``"heavy"`` (most new shapes
            placed over an existing one, with a similar size and a small offset).
        seed: the same seed gives byte-identical JSON and identical pixels.

    Returns:
        The annotation JSON path of every split.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height < 32 or width < 32:
        raise ValueError(f"image_size must be at least 32 pixels per side, got {image_size!r}")
    check_shapes(shapes, num_classes)
    if not 1 <= min_instances <= max_instances:
        raise ValueError(f"need 1 <= min_instances <= max_instances, got {min_instances}, {max_instances}")
    if occlusion not in OCCLUSION_MODES:
        raise ValueError(f"occlusion must be one of {OCCLUSION_MODES}, got {occlusion!r}")
    for split, count in splits.items():
        if not split or "/" in split or "\\" in split or split in (".", "..", "annotations"):
            raise ValueError(f"invalid split name {split!r}")
        if count < 0:
            raise ValueError(f"split {split!r} needs a non-negative image count, got {count}")

    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    classes = tuple(shapes[:num_classes])
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    json_paths = {}
    for split, count in splits.items():
        image_dir = out_dir / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            # Each image has its own generator, so images do not depend on the split sizes.
            rng = np.random.default_rng((seed, zlib.crc32(split.encode("utf-8")), index))
            pixels, instances = _render_image(
                rng, height, width, classes, min_instances, max_instances, heavy=occlusion == "heavy"
            )
            image_id = index + 1
            file_name = f"{image_id:06d}.jpg"
            Image.fromarray(pixels).save(image_dir / file_name, quality=_JPEG_QUALITY)
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for label, visible in instances:
                rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                        "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                        "iscrowd": 0,
                    }
                )
        data = {
            "info": {
                "description": "uniinst synthetic occluding shapes",
                "seed": seed,
                "occlusion": occlusion,
                "split": split,
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        json_path = out_dir / "annotations" / f"instances_{split}.json"
        json_path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        json_paths[split] = json_path
    return json_paths


def occlusion_stats(json_path: str | Path) -> dict:
    """Overlap statistics of a COCO-format file's boxes, per instance against the others of its image.

    Returns ``num_images``, ``num_instances``, ``overlap_fraction`` (the fraction of instances
    whose box has IoU > 0.5 with another instance's box, OCHuman's criterion) and
    ``mean_max_iou`` (each instance's largest box IoU with another, averaged).
    """
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    boxes_by_image: dict[int, list[list[float]]] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        boxes_by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    max_ious = []
    for boxes in boxes_by_image.values():
        xywh = np.asarray(boxes, dtype=np.float64)
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        inter_w = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0, None)
        inter_h = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0, None)
        inter = inter_w * inter_h
        area = xywh[:, 2] * xywh[:, 3]
        iou = inter / np.maximum(area[:, None] + area[None] - inter, 1e-12)
        np.fill_diagonal(iou, 0.0)
        max_ious.extend(iou.max(axis=1).tolist())
    max_ious_arr = np.asarray(max_ious, dtype=np.float64)
    return {
        "num_images": len(data["images"]),
        "num_instances": int(max_ious_arr.size),
        "overlap_fraction": float((max_ious_arr > 0.5).mean()) if max_ious_arr.size else 0.0,
        "mean_max_iou": float(max_ious_arr.mean()) if max_ious_arr.size else 0.0,
    }


def _unit_outline(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The shape's outer polygon ``[P, 2]`` with radius about 1, and an optional hole."""
    circle = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)

    def regular(n: int, radius: float = 1.0) -> np.ndarray:
        angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False) - np.pi / 2
        return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    if shape == "circle":
        return np.stack([np.cos(circle), np.sin(circle)], axis=1), None
    if shape == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]), None
    if shape == "triangle":
        return regular(3, 1.15), None
    if shape == "ellipse":
        return np.stack([np.cos(circle), 0.55 * np.sin(circle)], axis=1), None
    if shape == "star":
        points = regular(10)
        points[1::2] *= 0.45
        return points, None
    if shape == "ring":
        disc = np.stack([np.cos(circle), np.sin(circle)], axis=1)
        return disc, 0.55 * disc
    if shape == "cross":
        a, b = 0.33, 1.0
        return np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        ), None
    if shape == "hexagon":
        return regular(6), None
    raise ValueError(f"unknown shape {shape!r}")


def _rasterise(shape: str, center: np.ndarray, radius: float, angle: float, height: int, width: int) -> np.ndarray:
    outer, hole = _unit_outline(shape)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, fill in ((outer, 1), (hole, 0)):
        if polygon is not None:
            points = polygon @ rotation.T * radius + center
            draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient with a faint sinusoidal texture, float ``[H, W, 3]``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) / max(height, width)
    base = rng.uniform(60.0, 200.0, size=3)
    gradient = rng.uniform(-30.0, 30.0, size=(2, 3))
    freq = rng.uniform(4.0, 12.0, size=2)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    texture = 8.0 * np.sin(2.0 * np.pi * (freq[0] * xs + freq[1] * ys) + phase)
    return base + xs[..., None] * gradient[0] + ys[..., None] * gradient[1] + texture[..., None]


def _pick_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A colour far from those in ``avoid`` (the background and the other shapes) if one is found."""
    colour = rng.uniform(0.0, 255.0, size=3)
    for _ in range(20):
        if all(np.linalg.norm(colour - other) >= _MIN_COLOUR_DISTANCE for other in avoid):
            break
        colour = rng.uniform(0.0, 255.0, size=3)
    return colour


def _render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: tuple[str, ...],
    min_instances: int,
    max_instances: int,
    *,
    heavy: bool,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Paint one image; return its uint8 pixels and the (label, visible mask) of every instance in z-order."""
    side = min(height, width)
    wanted = int(rng.integers(min_instances, max_instances + 1))
    background = _background(rng, height, width)
    # owner[y, x]: index of the top-most instance at the pixel, -1 for background.
    owner = np.full((height, width), -1, dtype=np.int32)
    labels: list[int] = []
    colours: list[np.ndarray] = [background.mean(axis=(0, 1))]
    centers: list[np.ndarray] = []
    radii: list[float] = []
    full_area: list[int] = []
    visible = np.zeros(0, dtype=np.int64)
    for _ in range(wanted * _PLACEMENT_TRIES):
        if len(labels) == wanted:
            break
        label = int(rng.integers(len(classes)))
        angle = float(rng.uniform(0.0, 2.0 * np.pi))
        if heavy and labels and rng.random() < _HEAVY_STACK_PROB:
            # Stack the new shape on an existing one with a similar size and a small offset.
            anchor = int(rng.integers(len(labels)))
            radius = radii[anchor] * float(rng.uniform(0.8, 1.2))
            center = centers[anchor] + rng.uniform(-0.35, 0.35, size=2) * radii[anchor]
        else:
            radius = side * float(rng.uniform(0.08, 0.22))
            center = rng.uniform([0.5 * radius, 0.5 * radius], [width - 0.5 * radius, height - 0.5 * radius])
        mask = _rasterise(classes[label], center, radius, angle, height, width)
        area = int(mask.sum())
        if area < _MIN_VISIBLE_PIXELS:
            continue
        covered = np.bincount(owner[mask] + 1, minlength=len(labels) + 1)[1:]
        remaining = visible - covered
        if np.any(remaining < np.maximum(_MIN_VISIBLE_PIXELS, (1.0 - _MAX_HIDDEN_FRACTION) * np.asarray(full_area))):
            continue
        owner[mask] = len(labels)
        visible = np.append(remaining, area)
        labels.append(label)
        centers.append(center)
        radii.append(radius)
        full_area.append(area)
        colours.append(_pick_colour(rng, colours))

    canvas = background
    for k in range(len(labels)):
        canvas[owner == k] = colours[k + 1]
    canvas = canvas + rng.normal(0.0, 4.0, size=canvas.shape)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels, [(labels[k], owner == k) for k in range(len(labels))]

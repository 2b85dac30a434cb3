"""Image and mask transforms: shortest-edge resize (multi-scale in training) and horizontal flip."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from uniinst.config import ExperimentConfig
from uniinst.data.coco import CocoRecord
from uniinst.structures import Sample


class ResizeShortestEdge:
    """Resize so the shorter side equals a size drawn from ``short_edge``, the longer side
    capped at ``max_size`` (detectron2's rule, sizes rounded to the nearest integer)."""

    def __init__(self, short_edge: int | Sequence[int], max_size: int = 1333) -> None:
        sizes = (short_edge,) if isinstance(short_edge, int) else tuple(short_edge)
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"short_edge must hold positive sizes, got {short_edge!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.short_edge = sizes
        self.max_size = max_size

    def get_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """The (new_h, new_w) for an ``h`` x ``w`` image; draws the short side from ``rng``."""
        sizes = self.short_edge
        short = sizes[int(rng.integers(len(sizes)))] if len(sizes) > 1 else sizes[0]
        scale = short / min(h, w)
        new_h, new_w = h * scale, w * scale
        longest = max(new_h, new_w)
        if longest > self.max_size:
            new_h, new_w = new_h * self.max_size / longest, new_w * self.max_size / longest
        return int(new_h + 0.5), int(new_w + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``[H, W, 3]`` image to ``size`` = (h, w)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of uint8 ``[G, H, W]`` masks to ``size`` = (h, w); values stay 0/1."""
    h, w = size
    if masks.shape[1:] == (h, w):
        return masks
    out = np.empty((masks.shape[0], h, w), dtype=np.uint8)
    for g, mask in enumerate(masks):
        out[g] = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return out


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an ``[H, W, 3]`` image and its ``[G, H, W]`` masks left-right."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1])


class TrainTransform:
    """Training augmentation: multi-scale shortest-edge resize, then a random horizontal flip."""

    def __init__(
        self,
        short_edge: Sequence[int] = (640, 672, 704, 736, 768, 800),
        max_size: int = 1333,
        flip_prob: float = 0.5,
    ) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.resize = ResizeShortestEdge(short_edge, max_size)
        self.flip_prob = flip_prob

    def __call__(self, record: CocoRecord, rng: np.random.Generator) -> Sample:
        h, w = record.image.shape[:2]
        size = self.resize.get_size(h, w, rng)
        image, masks = resize_image(record.image, size), resize_masks(record.masks, size)
        # Always draw, so the random stream does not depend on flip_prob's value.
        if rng.random() < self.flip_prob:
            image, masks = hflip(image, masks)
        return _to_sample(image, masks, record)


class EvalTransform:
    """Evaluation input: a single shortest-edge resize."""

    def __init__(self, short_edge: int = 800, max_size: int = 1333) -> None:
        self.resize = ResizeShortestEdge(short_edge, max_size)

    def __call__(self, record: CocoRecord, rng: np.random.Generator) -> Sample:
        h, w = record.image.shape[:2]
        size = self.resize.get_size(h, w, rng)
        return _to_sample(resize_image(record.image, size), resize_masks(record.masks, size), record)


def eval_transform(cfg: ExperimentConfig) -> EvalTransform:
    """The evaluation input of the experiment ``cfg`` (its ``data.min_size_test`` and
    ``data.max_size_test``)."""
    return EvalTransform(short_edge=cfg.data.min_size_test, max_size=cfg.data.max_size_test)


def _to_sample(image: np.ndarray, masks: np.ndarray, record: CocoRecord) -> Sample:
    """Pack into a :class:`Sample`, dropping instances the resize made empty."""
    keep = masks.any(axis=(1, 2))
    return Sample(
        image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        masks=torch.from_numpy(np.ascontiguousarray(masks[keep])),
        labels=torch.from_numpy(record.labels[keep].astype(np.int64, copy=False)),
        image_id=int(record.image_id),
        orig_size=(int(record.image.shape[0]), int(record.image.shape[1])),
    )

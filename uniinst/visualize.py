"""Drawing predicted instances on their image: blended masks, contours and labels."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from uniinst.structures import Instances

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def instance_color(index: int) -> tuple[int, int, int]:
    """A saturated RGB colour for the ``index``-th instance; hues step by the golden ratio so
    neighbouring indices stay far apart on the colour wheel."""
    hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_instances(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.3,
    alpha: float = 0.5,
) -> np.ndarray:
    """A copy of ``image`` (uint8 ``[H, W, 3]``) with every instance scoring at least
    ``score_thresh`` drawn on it: its mask blended with weight ``alpha`` in its own colour, its
    contour outlined, and ``"name score"`` written at the mask's top-left corner. Lower-scored
    instances are drawn first, so the best ones end up on top. Instances with the same mask
    (one location scored for several classes) are drawn once, labelled with each class and
    score, best first: ``"triangle 0.34 / cross 0.33"``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    masks = instances.masks.detach().cpu().bool().numpy()
    if len(instances) and masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"instance masks are {masks.shape[1:]} but the image is {image.shape[:2]}")
    scores = instances.scores.detach().cpu().float().numpy()
    labels = instances.labels.detach().cpu().numpy()
    for label in labels:
        if not 0 <= label < len(class_names):
            raise ValueError(f"label {label} has no name among the {len(class_names)} class names")

    canvas = image.astype(np.float32)
    labelled = []
    for group in same_mask_groups(masks, scores, score_thresh):
        i, mask = group[0], masks[group[0]]
        color = np.array(instance_color(int(i)), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        canvas[_contour(mask)] = color
        ys, xs = np.nonzero(mask)
        text = " / ".join(f"{class_names[labels[j]]} {scores[j]:.2f}" for j in group)
        labelled.append((int(xs.min()), int(ys.min()), text, instance_color(int(i))))
    out = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    _draw_labels(out, labelled)
    return np.array(out)


def same_mask_groups(masks: np.ndarray, scores: np.ndarray, score_thresh: float) -> list[list[int]]:
    """The indices of the non-empty masks scoring at least ``score_thresh``, grouped by equal
    masks: each group best score first, the groups in ascending order of their best score."""
    groups: dict[bytes, list[int]] = {}
    for i in sorted(np.flatnonzero(scores >= score_thresh), key=lambda i: -scores[i]):
        if masks[i].any():
            groups.setdefault(np.packbits(masks[i]).tobytes(), []).append(int(i))
    return sorted(groups.values(), key=lambda g: scores[g[0]])


def _draw_labels(out: Image.Image, labelled: Sequence[tuple[int, int, str, tuple[int, int, int]]]) -> None:
    """Write each ``(x, y, text, colour)`` on a black box; the best-scored (last) label takes its
    corner, and one that would cover a label already placed moves below it."""
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    placed: list[tuple[int, int, int, int]] = []
    for x, y, text, color in reversed(labelled):
        natural = draw.textbbox((x, y), text, font=font)
        box = place_label(natural, placed)
        placed.append(box)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x, y + box[1] - natural[1]), text, fill=color, font=font)


def place_label(
    box: tuple[int, int, int, int], placed: Sequence[tuple[int, int, int, int]]
) -> tuple[int, int, int, int]:
    """``box`` (left, top, right, bottom) moved down, the least needed, until it overlaps none
    of the ``placed`` boxes."""
    left, top, right, bottom = box
    height = bottom - top
    while True:
        hit = [b for b in placed if left < b[2] and b[0] < right and top < b[3] and b[1] < top + height]
        if not hit:
            return left, top, right, top + height
        top = max(b[3] for b in hit)


def enlarge(image: np.ndarray, instances: Instances, *, min_side: int) -> tuple[np.ndarray, Instances]:
    """``image`` and the masks of ``instances`` enlarged by the smallest integer factor that
    brings the image's shorter side to ``min_side`` (unchanged when it is already there).
    Nearest neighbour: every pixel becomes a block, so a mask covers exactly what it did."""
    factor = max(1, -(-min_side // min(image.shape[:2])))
    if factor == 1:
        return image, instances
    masks = instances.masks.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    big = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return big, Instances(masks=masks, scores=instances.scores, labels=instances.labels)


def save_visualization(
    image: np.ndarray,
    instances: Instances,
    class_names: Sequence[str],
    path: str | Path,
    *,
    min_side: int = 0,
    **kw,
) -> Path:
    """Draw ``instances`` on ``image`` (see :func:`draw_instances`, which takes ``kw``) and
    write it as a PNG at ``path``; returns the path. An image whose shorter side is under
    ``min_side`` is drawn enlarged (:func:`enlarge`), for images so small that the labels'
    text would cover the shapes it names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image, instances = enlarge(image, instances, min_side=min_side)
    Image.fromarray(draw_instances(image, instances, class_names, **kw)).save(path, format="PNG")
    return path

"""Which ground-truth category each of a model's labels predicts."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

# Labels whose class the ground truth lacks: their predictions are dropped.
NOT_IN_GT = -1

# COCO 2017's 80 thing classes in category-id order: the labels of a model trained on COCO,
# such as the authors' released UniInst weights.
COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# Their category ids in COCO's annotation files (1 to 90, with the gaps of the 2014 paper's
# 91-class list).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
)


def _shown(names: Sequence[object], limit: int = 5) -> str:
    return ", ".join(map(str, names[:limit])) + (", ..." if len(names) > limit else "")


def label_to_category_ids(
    num_classes: int,
    class_names: Sequence[str] | None,
    categories: Sequence[Mapping],
    *,
    label_map: Mapping[int, int] | None = None,
    source: str = "the ground truth",
) -> list[int]:
    """The ground-truth category id of each of the model's labels ``0..num_classes-1``.

    ``categories`` are the ground truth's ``{"id", "name"}`` entries, ``source`` names it in
    errors. An explicit ``label_map`` (label -> category id) must cover every label and name
    existing ids. Otherwise a model with ``class_names`` is matched by name, labels whose
    name the ground truth lacks giving :data:`NOT_IN_GT` (a COCO model on OCHuman's single
    ``person``), but at least one must match. A model without names needs exactly as many
    classes as the ground truth has categories, taken in id order. Anything else raises a
    ValueError naming both sides.
    """
    cats = sorted(categories, key=lambda c: c["id"])
    gt_side = f"{source} ({len(cats)} categories: {_shown([c['name'] for c in cats])})"
    if label_map is not None:
        return _from_label_map(num_classes, label_map, {c["id"] for c in cats}, gt_side)
    if class_names:
        if len(class_names) != num_classes:
            raise ValueError(f"the model has {num_classes} classes but {len(class_names)} class names")
        by_name = {c["name"]: c["id"] for c in cats}
        mapping = [by_name.get(name, NOT_IN_GT) for name in class_names]
        if all(m == NOT_IN_GT for m in mapping):
            raise ValueError(
                f"none of the model's classes ({_shown(class_names)}) is a category of {gt_side}: pass a label map"
            )
        dropped = [name for name, m in zip(class_names, mapping) if m == NOT_IN_GT]
        if dropped:
            logger.warning(
                "%d of the model's classes are not in %s, their predictions are dropped: %s",
                len(dropped), source, _shown(dropped),
            )
        return mapping
    if num_classes != len(cats):
        raise ValueError(f"the model's {num_classes} unnamed classes cannot be matched to {gt_side}: pass a label map")
    return [c["id"] for c in cats]


def _from_label_map(num_classes: int, label_map: Mapping[int, int], gt_ids: set[int], gt_side: str) -> list[int]:
    outside = sorted(label for label in label_map if not 0 <= label < num_classes)
    if outside:
        raise ValueError(f"label map names label(s) {_shown(outside)}, but the model has labels 0..{num_classes - 1}")
    missing = [label for label in range(num_classes) if label not in label_map]
    if missing:
        raise ValueError(f"label map leaves the model's label(s) {_shown(missing)} unmapped")
    unknown = sorted({cat_id for cat_id in label_map.values() if cat_id not in gt_ids})
    if unknown:
        raise ValueError(f"label map names category id(s) {_shown(unknown)}, which are not in {gt_side}")
    return [label_map[label] for label in range(num_classes)]


def parse_label_map(text: str) -> dict[int, int]:
    """``"0=1,1=18"`` (model label = ground-truth category id) as ``{0: 1, 1: 18}``."""
    mapping: dict[int, int] = {}
    for item in text.split(","):
        label, sep, cat_id = item.strip().partition("=")
        try:
            pair = (int(label), int(cat_id)) if sep else None
        except ValueError:
            pair = None
        if pair is None:
            raise ValueError(f"label map item {item.strip()!r} is not LABEL=CATEGORY_ID (e.g. 0=1,1=18)")
        if pair[0] in mapping:
            raise ValueError(f"label map names label {pair[0]} twice")
        mapping[pair[0]] = pair[1]
    return mapping

"""COCO mask AP with pycocotools, and the metric reports written next to a run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from uniinst.evaluation.coco_results import load_results, validate_results

logger = logging.getLogger(__name__)

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def load_coco_gt(gt: str | Path | COCO) -> COCO:
    """A pycocotools ``COCO`` for ``gt`` (a path to an annotation JSON, or a ``COCO`` as is).

    JSON files without ``info``/``licenses`` (which some pycocotools versions copy in
    ``loadRes``) get empty ones.
    """
    if isinstance(gt, COCO):
        coco = gt
    else:
        path = Path(gt)
        try:
            with path.open() as f:
                dataset = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(dataset, dict):
            raise ValueError(f"{path}: a COCO annotation file must hold a JSON object")
        missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
        if missing:
            raise ValueError(f"{path}: not a COCO annotation file, lacks {', '.join(missing)}")
        coco = COCO()
        coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    coco.dataset.setdefault("info", {})
    coco.dataset.setdefault("licenses", [])
    return coco


def evaluate_segm(
    gt: str | Path | COCO,
    results: list[dict] | str | Path,
    *,
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Mask AP/AR of COCO ``results`` against ``gt`` with pycocotools' ``COCOeval("segm")``.

    Returns :data:`METRIC_KEYS` as fractions (COCOeval's ``stats[0:9]``). A size bucket
    without any ground truth comes back as -1, as pycocotools reports it. An empty results
    list scores 0 everywhere. ``image_ids``/``category_ids`` restrict the evaluation (default:
    all of ``gt``). A result naming an image or category absent from ``gt``, with an RLE not
    of its image's size or not decodable, or a score that is not a finite number, raises a
    ValueError naming the result (:func:`validate_results`). Uncompressed RLE is accepted.

    Any ``bbox`` in the results is ignored: given one, ``loadRes`` would take the box area as
    the instance area and so change which size bucket (small/medium/large) it falls in.
    pycocotools' printed summary is logged at INFO (its progress lines at DEBUG) rather than
    printed.
    """
    coco_gt = load_coco_gt(gt)
    gt_cats = set(coco_gt.getCatIds())
    image_sizes = {img_id: (img.get("height"), img.get("width")) for img_id, img in coco_gt.imgs.items()}
    if isinstance(results, (str, Path)):
        results = load_results(results, image_sizes=image_sizes, category_ids=gt_cats)
    else:
        results = validate_results(results, "results", image_sizes=image_sizes, category_ids=gt_cats)
    gt_images = set(image_sizes)
    if image_ids is not None:
        unknown = sorted(set(image_ids) - gt_images)
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
    if category_ids is not None:
        unknown = sorted(set(category_ids) - gt_cats)
        if unknown:
            raise ValueError(f"category_ids not in the ground truth: {unknown[:10]}")

    if not results:
        logger.warning("no results to evaluate: every metric is 0")
        return {k: 0.0 for k in METRIC_KEYS}

    dets = [_detection(r) for r in results]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        if category_ids is not None:
            evaluator.params.catIds = sorted(set(category_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    lines = log.getvalue().splitlines()
    logger.debug("pycocotools:\n%s", "\n".join(line for line in lines if not line.startswith(" Average")))
    logger.info("pycocotools segm summary:\n%s", "\n".join(line for line in lines if line.startswith(" Average")))
    return {k: float(v) for k, v in zip(METRIC_KEYS, evaluator.stats[: len(METRIC_KEYS)])}


def _detection(result: dict) -> dict:
    """A copy of ``result`` for ``loadRes``, which writes id/area/iscrowd into it: without
    the box, its RLE compressed (pycocotools reads only compressed RLE in results)."""
    det = {k: v for k, v in result.items() if k != "bbox"}
    seg = det["segmentation"]
    if isinstance(seg["counts"], list):
        det["segmentation"] = mask_utils.frPyObjects(seg, *seg["size"])
    return det


def format_table(metrics: Mapping[str, float]) -> str:
    """A one-row Markdown table of ``metrics`` in percent with one decimal, as papers report
    them; negative values (pycocotools' -1 for an empty size bucket) show as ``n/a``."""
    keys = list(metrics)
    cells = [f"{100 * metrics[k]:.1f}" if metrics[k] >= 0 else "n/a" for k in keys]
    return "\n".join(
        [
            "| " + " | ".join(keys) + " |",
            "|" + "|".join("---:" for _ in keys) + "|",
            "| " + " | ".join(cells) + " |",
        ]
    )


def write_report(
    metrics: Mapping[str, float], out_dir: str | Path, *, extra: Mapping | None = None
) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.json`` (the metrics as given, fractions, and ``extra`` under the
    key ``"extra"``) and ``out_dir/metrics.md`` (:func:`format_table` and the extras).
    Returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload: dict = {k: float(v) for k, v in metrics.items()}
    if extra is not None:
        payload["extra"] = dict(extra)
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    lines = ["# Mask AP (COCO segm)", "", format_table(metrics), ""]
    if extra:
        lines += [f"- {k}: {v}" for k, v in extra.items()] + [""]
    md_path = out_dir / "metrics.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path

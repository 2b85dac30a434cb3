"""Running a model over a dataset: COCO results and their metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_eval_loader
from uniinst.data.transforms import EvalTransform
from uniinst.engine.inference_model import run_batch
from uniinst.evaluation.categories import label_to_category_ids
from uniinst.evaluation.coco_eval import evaluate_segm, write_report
from uniinst.evaluation.coco_results import instances_to_coco_results, save_results

logger = logging.getLogger(__name__)


def model_num_classes(model: nn.Module) -> int:
    """The number of classes ``model`` (a :class:`~uniinst.modeling.uniinst.UniInst`) scores."""
    return model.head.cls_logits.out_channels


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: CocoDataset,
    *,
    transform: EvalTransform,
    batch_size: int = 1,
    num_workers: int = 0,
    indices: Sequence[int] | None = None,
    log_every: int = 50,
    class_names: Sequence[str] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> list[dict]:
    """COCO-format results (RLE masks) for every image of ``dataset``, or for the images at
    ``indices`` (a worker's share of a distributed evaluation).

    The model's labels become the dataset's category ids by :func:`label_to_category_ids`
    from ``class_names`` (the checkpoint's, if it has them) or ``label_map``: a model that
    does not fit the dataset's categories raises before any inference.
    """
    label_to_cat = label_to_category_ids(
        model_num_classes(model), class_names, dataset.categories, label_map=label_map,
        source=str(dataset.gt_json_path),
    )
    was_training = model.training
    model.eval()
    images: Dataset = InstanceSegDataset(dataset, transform)
    if indices is not None:
        images = Subset(images, list(indices))
    total = len(images)
    loader = build_eval_loader(images, batch_size=batch_size, num_workers=num_workers)
    results: list[dict] = []
    done, t0 = 0, time.perf_counter()
    for batch in loader:
        for image_id, inst in zip(batch.image_ids, run_batch(model, batch)):
            results.extend(instances_to_coco_results(inst, image_id, label_to_cat))
        done += len(batch)
        if log_every and done % log_every < len(batch):
            logger.info("inference %d/%d images (%.1f img/s)", done, total, done / (time.perf_counter() - t0))
    model.train(was_training)
    return results


def evaluate_model(
    model: nn.Module,
    dataset: CocoDataset,
    out_dir: str | Path,
    *,
    transform: EvalTransform,
    batch_size: int = 1,
    num_workers: int = 0,
    extra: dict | None = None,
    class_names: Sequence[str] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """Predict (:func:`predict_dataset`, which takes ``class_names`` and ``label_map``), score
    with pycocotools (segm) and write ``results.json``, ``metrics.json`` and ``metrics.md``
    into ``out_dir``."""
    results = predict_dataset(
        model, dataset, transform=transform, batch_size=batch_size, num_workers=num_workers,
        class_names=class_names, label_map=label_map,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_results(results, out_dir / "results.json")
    metrics = evaluate_segm(dataset.gt_json_path, results, image_ids=dataset.image_ids)
    write_report(metrics, out_dir, extra=extra)
    return metrics

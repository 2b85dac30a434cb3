"""Evaluation from shards: the COCO ground truth rebuilt from the shards themselves, and
inference as a Ray Data job over a pool of model replicas.

The OCHuman protocol is two filters: an image-id list selects the evaluated subset (the
paper's 1,761 images) and ``category_ids`` keeps the person category.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pycocotools.coco import COCO

from uniinst.config import DatasetConfig, config_from_dict
from uniinst.data.collate import collate
from uniinst.data.prepare import read_image_ids
from uniinst.data.shards import Manifest, decode_row, read_manifest, shard_uris
from uniinst.data.storage import filesystem_for
from uniinst.data.transforms import EvalTransform
from uniinst.engine.checkpoint import load_checkpoint
from uniinst.engine.inference_model import inference_model, run_batch
from uniinst.evaluation.categories import label_to_category_ids
from uniinst.evaluation.coco_eval import evaluate_segm, write_report
from uniinst.evaluation.coco_results import instances_to_coco_results, save_results
from uniinst.ray.data import read_shards, shard_errors_for_ray, shard_errors_unwrapped
from uniinst.redact import redact_uri

logger = logging.getLogger(__name__)

_GT_COLUMNS = ["image_id", "file_name", "height", "width", "annotations"]
_RESULT_SCHEMA = pa.schema([("image_id", pa.int64()), ("results", pa.string())])
# Shards whose ground truth is read at once: an object store answers many requests at a time.
_GT_READERS = 8


def gt_from_shards(
    uri: str,
    *,
    endpoint_url: str | None = None,
    manifest: Manifest | None = None,
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
    """The COCO ground truth (``images``, ``annotations`` with compressed-RLE segmentations,
    ``categories``) of the shard dataset at ``uri``, read without the image bytes.

    ``image_ids`` keeps only those images; an id the shards lack raises a ValueError.
    """
    manifest = manifest or read_manifest(uri, endpoint_url=endpoint_url)
    wanted = None if image_ids is None else set(int(i) for i in image_ids)

    def read(shard_uri: str) -> list[dict]:
        fs, path = filesystem_for(shard_uri, endpoint_url=endpoint_url)
        try:
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).read(columns=_GT_COLUMNS).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"shard {redact_uri(shard_uri)}: cannot read its annotations: {exc}") from exc

    images, annotations = [], []
    with ThreadPoolExecutor(_GT_READERS) as pool:
        for rows in pool.map(read, shard_uris(uri, manifest)):
            for row in rows:
                if wanted is not None and row["image_id"] not in wanted:
                    continue
                height, width = int(row["height"]), int(row["width"])
                images.append({"id": int(row["image_id"]), "file_name": row["file_name"], "height": height, "width": width})
                for ann in row["annotations"] or ():
                    annotations.append(
                        {
                            "id": int(ann["id"]),
                            "image_id": int(row["image_id"]),
                            "category_id": int(ann["category_id"]),
                            "iscrowd": int(ann["iscrowd"]),
                            "segmentation": {"size": [height, width], "counts": bytes(ann["rle"]).decode("ascii")},
                            "area": float(ann["area"]),
                            "bbox": [float(v) for v in ann["bbox"]],
                        }
                    )
    if wanted is not None:
        missing = sorted(wanted - {im["id"] for im in images})
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"{len(missing)} of the requested image ids are not in {redact_uri(uri)}: {shown}")
    images.sort(key=lambda im: im["id"])
    categories = sorted(({"id": c["id"], "name": c["name"]} for c in manifest.categories), key=lambda c: c["id"])
    return {"images": images, "annotations": annotations, "categories": categories, "info": {}, "licenses": []}


def coco_from_dict(gt: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` indexing ``gt`` (its index-building print silenced)."""
    coco = COCO()
    coco.dataset = dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def resolve_categories(manifest: Manifest, categories: Sequence[int | str]) -> list[int]:
    """Category ids for ``categories`` given as ids or names (``"person"``)."""
    by_name = {c["name"]: c["id"] for c in manifest.categories}
    ids = set(by_name.values())
    out = []
    for item in categories:
        cat_id = item if isinstance(item, int) else by_name.get(item)
        if cat_id is None or cat_id not in ids:
            raise ValueError(f"category {item!r} is not in the dataset (it has: {', '.join(sorted(by_name))})")
        out.append(cat_id)
    return sorted(set(out))


def label_to_category(
    manifest: Manifest,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    label_map: Mapping[int, int] | None = None,
    source: str = "the shard dataset",
) -> list[int]:
    """The dataset's category id of each of the model's contiguous labels (-1: not in it),
    by :func:`~uniinst.evaluation.categories.label_to_category_ids`: a model that knows its
    class names is matched by name, so a COCO model evaluates on OCHuman's single ``person``
    category; otherwise the model must have exactly the dataset's categories, in id order,
    or a ``label_map``."""
    return label_to_category_ids(num_classes, class_names, manifest.categories, label_map=label_map, source=source)


class ShardEvalSet:
    """A shard dataset (``split.shards``, its ``image_ids`` subset and ``category_ids``) ready
    to score a model on: the ground truth read once, the model's labels matched to its
    categories; :meth:`predict` runs a model over (a share of) the images in this process."""

    def __init__(
        self, split: DatasetConfig, *, num_classes: int, class_names: Sequence[str] | None,
        endpoint_url: str | None = None,
    ) -> None:
        self.uri, self.endpoint_url = split.shards, endpoint_url
        self.manifest = read_manifest(split.shards, endpoint_url=endpoint_url)
        subset = read_image_ids(split.image_ids, endpoint_url=endpoint_url) if split.image_ids else None
        self.gt = gt_from_shards(split.shards, endpoint_url=endpoint_url, manifest=self.manifest, image_ids=subset)
        self.image_ids = [im["id"] for im in self.gt["images"]]
        self.category_ids = resolve_categories(self.manifest, split.category_ids) if split.category_ids else None
        self.label_to_cat = label_to_category(
            self.manifest, num_classes=num_classes, class_names=class_names, source=redact_uri(split.shards)
        )

    @property
    def num_instances(self) -> int:
        """The ground truth's instances that count in the evaluation (not crowds)."""
        cats = None if self.category_ids is None else set(self.category_ids)
        return sum(1 for a in self.gt["annotations"] if not a["iscrowd"] and (cats is None or a["category_id"] in cats))

    def predict(
        self, model: torch.nn.Module, *, transform: EvalTransform, image_ids: Sequence[int] | None = None,
    ) -> list[dict]:
        """COCO results of ``model`` on ``image_ids`` (default: every evaluated image)."""
        return predict_shards_here(
            model, self.uri, self.image_ids if image_ids is None else image_ids, transform=transform,
            label_to_cat=self.label_to_cat, manifest=self.manifest, category_ids=self.category_ids,
            endpoint_url=self.endpoint_url,
        )

    def score(self, results: list[dict]) -> dict[str, float]:
        return evaluate_segm(
            coco_from_dict(self.gt), results, image_ids=self.image_ids, category_ids=self.category_ids
        )

    def details(self) -> dict[str, Any]:
        return {"shards": redact_uri(self.uri), "images": len(self.image_ids)}


class ShardPredictor:
    """One model replica of the inference job: loads the weights once, then turns batches of
    shard rows into COCO results (one row per image, its results as a JSON list)."""

    def __init__(
        self,
        state: list[ray.ObjectRef],
        *,
        label_to_cat: Sequence[int],
        category_ids: Sequence[int] | None,
        shard_names: Sequence[str],
        batch_size: int,
        use_gpu: bool,
    ) -> None:
        # The checkpoint travels through the object store (wrapped in a list so Ray does not
        # resolve it early), so the replicas need no shared filesystem.
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = inference_model(ray.get(state[0]), source="the checkpoint", device=device)
        self.label_to_cat = list(label_to_cat)
        self.category_ids = None if category_ids is None else set(category_ids)
        self.shard_names = list(shard_names)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        with shard_errors_for_ray():
            out = predict_rows(
                self.model.model,
                batch.to_pylist(),
                transform=self.model.transform,
                label_to_cat=self.label_to_cat,
                category_ids=self.category_ids,
                shard_names=self.shard_names,
                batch_size=self.batch_size,
            )
        return pa.Table.from_pylist(
            [{"image_id": image_id, "results": json.dumps(results)} for image_id, results in out], schema=_RESULT_SCHEMA
        )


@torch.inference_mode()
def predict_rows(
    model: torch.nn.Module,
    rows: Sequence[Mapping[str, Any]],
    *,
    transform: EvalTransform,
    label_to_cat: Sequence[int],
    category_ids: Collection[int] | None,
    shard_names: Sequence[str],
    batch_size: int = 1,
) -> list[tuple[int, list[dict]]]:
    """``(image_id, COCO results)`` of each raw shard row (:data:`ROW_SCHEMA`), predicted by
    ``model`` in this process; results of categories outside ``category_ids`` are dropped."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(0)
    out = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        # Inference needs the pixels only: the ground truth comes from gt_from_shards.
        records = [
            decode_row({**row, "annotations": []}, {}, where=f"shard {shard_names[row['shard']]}") for row in chunk
        ]
        batch_in = collate([transform(record, rng) for record in records])
        for image_id, instances in zip(batch_in.image_ids, run_batch(model, batch_in)):
            results = [
                r
                for r in instances_to_coco_results(instances, image_id, label_to_cat)
                if category_ids is None or r["category_id"] in category_ids
            ]
            out.append((int(image_id), results))
    model.train(was_training)
    return out


def _load_state(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """What a replica needs of a checkpoint: weights, config and meta (not the optimizer)."""
    state = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    missing = [k for k in ("model", "config") if k not in state]
    if missing:
        name = "the checkpoint" if isinstance(checkpoint, Mapping) else f"checkpoint {checkpoint}"
        raise ValueError(f"{name} lacks {', '.join(missing)}")
    return {"model": state["model"], "config": state["config"], "meta": state.get("meta", {})}


def predict_shards(
    uri: str,
    checkpoint: str | Path | Mapping[str, Any],
    *,
    endpoint_url: str | None = None,
    manifest: Manifest | None = None,
    image_ids: Iterable[int] | None = None,
    category_ids: Sequence[int] | None = None,
    replicas: int = 1,
    num_gpus: float = 0.0,
    num_cpus: float = 1.0,
    batch_size: int = 1,
    label_map: Mapping[int, int] | None = None,
) -> list[dict]:
    """COCO results of a checkpoint (a path, or an in-memory ``{"model", "config", "meta"}``)
    on the shard dataset at ``uri``, from ``replicas`` model replicas in a Ray Data actor
    pool (``num_gpus`` / ``num_cpus`` each). Labels map to categories by
    :func:`label_to_category` (the checkpoint's class names, or ``label_map``). Every
    selected image must come back, or this raises."""
    if replicas < 1 or batch_size < 1:
        raise ValueError(f"replicas and batch_size must be >= 1, got {replicas} and {batch_size}")
    manifest = manifest or read_manifest(uri, endpoint_url=endpoint_url)
    state = _load_state(checkpoint)
    cfg = config_from_dict(state["config"])
    mapping = label_to_category(
        manifest, num_classes=cfg.model.num_classes, class_names=state["meta"].get("class_names"), label_map=label_map,
        source=redact_uri(uri),
    )
    wanted = None if image_ids is None else sorted(set(int(i) for i in image_ids))
    expected = manifest.num_images if wanted is None else len(wanted)

    ds, _ = read_shards(uri, endpoint_url=endpoint_url, manifest=manifest, image_ids=wanted)
    ds.context.execution_options.preserve_order = False
    predictions = ds.map_batches(
        ShardPredictor,
        fn_constructor_kwargs={
            "state": [ray.put(state)],
            "label_to_cat": mapping,
            "category_ids": None if category_ids is None else list(category_ids),
            "shard_names": [redact_uri(s) for s in shard_uris(uri, manifest)],
            "batch_size": batch_size,
            "use_gpu": num_gpus > 0,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=replicas,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
    )
    results: list[dict] = []
    seen: set[int] = set()
    with shard_errors_unwrapped():
        for block in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
            for image_id, text in zip(block.column("image_id").to_pylist(), block.column("results").to_pylist()):
                seen.add(image_id)
                results.extend(json.loads(text))
    if len(seen) != expected:
        raise RuntimeError(f"inference on {redact_uri(uri)} returned {len(seen)} of {expected} images")
    return results


def predict_shards_here(
    model: torch.nn.Module,
    uri: str,
    image_ids: Sequence[int],
    *,
    transform: EvalTransform,
    label_to_cat: Sequence[int],
    manifest: Manifest,
    category_ids: Collection[int] | None = None,
    endpoint_url: str | None = None,
    batch_size: int = 1,
) -> list[dict]:
    """COCO results of ``model`` on the images ``image_ids`` of the shard dataset at ``uri``,
    run in this process (a training worker's share of a distributed evaluation): Ray reads
    and checks the shards, this process decodes and predicts."""
    if not image_ids:
        return []
    ds, _ = read_shards(uri, endpoint_url=endpoint_url, manifest=manifest, image_ids=image_ids)
    names = [redact_uri(s) for s in shard_uris(uri, manifest)]
    results: list[dict] = []
    seen = 0
    with shard_errors_unwrapped():
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for image_id, found in predict_rows(
                model, block.to_pylist(), transform=transform, label_to_cat=label_to_cat,
                category_ids=category_ids, shard_names=names, batch_size=batch_size,
            ):
                seen += 1
                results.extend(found)
    if seen != len(image_ids):
        raise RuntimeError(f"inference on {redact_uri(uri)} returned {seen} of {len(image_ids)} images")
    return results


def evaluate_shards(
    uri: str,
    checkpoint: str | Path | Mapping[str, Any],
    out_dir: str | Path,
    *,
    endpoint_url: str | None = None,
    image_ids: Iterable[int] | None = None,
    categories: Sequence[int | str] | None = None,
    replicas: int = 1,
    num_gpus: float = 0.0,
    batch_size: int = 1,
    extra: Mapping[str, Any] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> dict[str, float]:
    """Mask AP of a checkpoint on the shard dataset at ``uri``: predict (:func:`predict_shards`),
    score against :func:`gt_from_shards` and write ``results.json``, ``metrics.json`` and
    ``metrics.md`` into ``out_dir``. ``image_ids`` and ``categories`` (ids or names) restrict
    the evaluation, as the OCHuman protocol does; ``label_map`` (model label -> category id)
    is for a checkpoint whose classes the dataset does not name."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    subset = None if image_ids is None else sorted(set(int(i) for i in image_ids))
    category_ids = None if categories is None else resolve_categories(manifest, categories)
    gt = gt_from_shards(uri, endpoint_url=endpoint_url, manifest=manifest, image_ids=subset)
    results = predict_shards(
        uri, checkpoint, endpoint_url=endpoint_url, manifest=manifest, image_ids=subset, category_ids=category_ids,
        replicas=replicas, num_gpus=num_gpus, batch_size=batch_size, label_map=label_map,
    )
    out_dir = Path(out_dir)
    save_results(results, out_dir / "results.json")
    metrics = evaluate_segm(
        coco_from_dict(gt), results, image_ids=[im["id"] for im in gt["images"]], category_ids=category_ids
    )
    details = {"shards": redact_uri(uri), "images": len(gt["images"])}
    if category_ids is not None:
        details["category_ids"] = category_ids
    write_report(metrics, out_dir, extra={**details, **(extra or {})})
    return metrics

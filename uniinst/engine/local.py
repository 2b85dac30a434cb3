"""Training in one process (CPU or one GPU): data, model, resume, checkpoints, evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from uniinst.config import DataConfig, DatasetConfig, ExperimentConfig, config_from_dict, dump_config, to_dict
from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_train_loader
from uniinst.data.shards import Manifest, read_manifest
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.data.transforms import EvalTransform, TrainTransform
from uniinst.engine.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    seed_everything,
)
from uniinst.engine.metrics import MetricsWriter
from uniinst.engine.trainer import Trainer, format_progress, resolve_device
from uniinst.evaluation.coco_eval import format_table
from uniinst.evaluation.inference import evaluate_model
from uniinst.modeling.uniinst import build_model

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    checkpoint: Path
    metrics: dict[str, float] | None
    model: torch.nn.Module


def prepare_synthetic_data(cfg: ExperimentConfig) -> None:
    """With ``data.synthetic``, generate the synthetic set once under the output folder and
    point ``data.train`` / ``data.val`` at it."""
    if not cfg.data.synthetic:
        return
    root = Path(cfg.train.output_dir) / "synthetic"
    d = cfg.data
    splits = {"train": d.synthetic_train_images, "val": d.synthetic_val_images}
    paths = {s: root / "annotations" / f"instances_{s}.json" for s in splits}
    if not all(p.is_file() for p in paths.values()):
        logger.info("generating the synthetic dataset in %s", root)
        paths = generate_synthetic_coco(
            root,
            splits=splits,
            image_size=d.synthetic_image_size,
            num_classes=cfg.model.num_classes,
            seed=cfg.train.seed,
        )
    d.train.json, d.train.images = str(paths["train"]), str(root / "train")
    d.val.json, d.val.images = str(paths["val"]), str(root / "val")


DataSplit = CocoDataset | Manifest


def load_datasets(cfg: ExperimentConfig) -> tuple[DataSplit, DataSplit | None]:
    """The training and validation sets: a :class:`CocoDataset` for a JSON, or the
    :class:`Manifest` of a shard dataset (``data.train.shards``), streamed later with Ray."""
    prepare_synthetic_data(cfg)
    d = cfg.data
    if not d.train.json and not d.train.shards:
        raise ValueError(
            "data.train.json and data.train.shards are empty: name a COCO-format JSON (and data.train.images), "
            "a shard dataset, or set data.synthetic=true"
        )
    train = _load_split(d.train, d, "train")
    val = _load_split(d.val, d, "val") if d.val.json or d.val.shards else None
    if len(train.categories) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but {d.train.shards or d.train.json} has "
            f"{len(train.categories)} categories"
        )
    return train, val


def _load_split(split: DatasetConfig, d: DataConfig, name: str) -> DataSplit:
    if split.json and split.shards:
        raise ValueError(f"data.{name}: set json or shards, not both")
    if split.shards:
        return read_manifest(split.shards, endpoint_url=d.endpoint_url or None)
    return CocoDataset(split.json, split.images, on_error=d.on_error)


def _num_images(dataset: DataSplit) -> int:
    return dataset.num_images if isinstance(dataset, Manifest) else len(dataset)


def eval_transform(cfg: ExperimentConfig) -> EvalTransform:
    return EvalTransform(short_edge=cfg.data.min_size_test, max_size=cfg.data.max_size_test)


def train_local(cfg: ExperimentConfig, *, resume: bool = True) -> TrainResult:
    """Train ``cfg`` in this process, resuming from the newest checkpoint in
    ``<output_dir>/checkpoints`` unless ``resume`` is False, and evaluate on ``data.val``."""
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / "checkpoints"
    if not resume and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pick another train.output_dir or resume")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    train_set, val_set = load_datasets(cfg)
    dump_config(cfg, out / "config.yaml")

    model = build_model(cfg.model).to(device)
    trainer = Trainer(model, cfg, device=device, meta={"class_names": train_set.class_names})
    existing = list_checkpoints(ckpt_dir)
    if resume and existing:
        trainer.load_state_dict(load_checkpoint(existing[-1], map_location=device))
        logger.info("resumed from %s at iteration %d", existing[-1], trainer.iteration)
    logger.info(
        "training %s (%s, R%d) on %s: %d images, batch %d, lr %.4g, %d iterations",
        cfg.name, cfg.model.arch, cfg.model.backbone.depth, device, _num_images(train_set),
        cfg.data.batch_size, trainer.base_lr, cfg.solver.max_iter,
    )

    d = cfg.data
    transform = TrainTransform(short_edge=tuple(d.min_size_train), max_size=d.max_size_train, flip_prob=d.flip_prob)
    if isinstance(train_set, Manifest):
        # Ray only here: importing this module must not pull it in.
        from uniinst.ray.data import ensure_ray, iter_train_batches

        ensure_ray()
        batches = iter_train_batches(
            d.train.shards,
            batch_size=d.batch_size,
            transform=transform,
            seed=cfg.train.seed,
            start_iter=trainer.iteration,
            shuffle_buffer_size=d.shuffle_buffer,
            endpoint_url=d.endpoint_url or None,
            manifest=train_set,
        )
    else:
        batches = build_train_loader(
            InstanceSegDataset(train_set, transform, seed=cfg.train.seed, skip_empty=True),
            batch_size=d.batch_size,
            seed=cfg.train.seed,
            num_workers=d.num_workers,
            start_iter=trainer.iteration,
        )
    writer = MetricsWriter(out)
    best = {"AP": -1.0}
    metrics: dict[str, float] | None = None

    def on_log(it: int, m: dict[str, float]) -> None:
        writer.write(it, m, prefix="train/")
        logger.info(format_progress(it, cfg.solver.max_iter, m))

    def on_checkpoint(it: int) -> None:
        path = save_checkpoint(trainer.state_dict(), ckpt_dir / checkpoint_name(it))
        prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        logger.info("saved %s", path)

    def on_eval(it: int) -> None:
        nonlocal metrics
        if val_set is None:
            return
        eval_dir = out / "eval" / f"iter_{it:07d}"
        extra = {"iteration": it, "checkpoint": str(ckpt_dir / checkpoint_name(it))}
        if isinstance(val_set, Manifest):
            metrics = _evaluate_shards(cfg, model, trainer.meta, eval_dir, device=device, extra=extra)
        else:
            metrics = evaluate_model(model, val_set, eval_dir, transform=eval_transform(cfg), device=device, extra=extra)
        writer.write(it, metrics, prefix="val/")
        logger.info("evaluation at iteration %d on %s:\n%s", it, d.val.shards or d.val.json, format_table(metrics))
        if metrics["AP"] > best["AP"]:
            best["AP"] = metrics["AP"]
            state = trainer.state_dict()
            best_state = {k: state[k] for k in ("model", "iteration", "config", "meta")}
            save_checkpoint({**best_state, "metrics": metrics}, out / "model_best.pt")

    try:
        if trainer.iteration < cfg.solver.max_iter:
            trainer.run(
                batches,
                on_log=on_log,
                on_checkpoint=on_checkpoint,
                on_eval=on_eval,
            )
        else:
            logger.info("%s is already trained to iteration %d", out, trainer.iteration)
            on_eval(trainer.iteration)
    finally:
        writer.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    final = ckpt_dir / checkpoint_name(trainer.iteration)
    if metrics is not None:
        (out / "eval" / "final.json").write_text(json.dumps({"iteration": trainer.iteration, **metrics}, indent=2))
    return TrainResult(out, trainer.iteration, final, metrics, model)


def _evaluate_shards(
    cfg: ExperimentConfig, model: torch.nn.Module, meta: dict, out_dir: Path, *, device: torch.device, extra: dict
) -> dict[str, float]:
    """Mask AP of the model in training on the ``data.val.shards`` dataset (a Ray Data job)."""
    from uniinst.data.prepare import read_image_ids
    from uniinst.ray.data import ensure_ray
    from uniinst.ray.evaluate import evaluate_shards

    ensure_ray()
    val, endpoint_url = cfg.data.val, cfg.data.endpoint_url or None
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "config": to_dict(cfg), "meta": meta}
    return evaluate_shards(
        val.shards,
        state,
        out_dir,
        endpoint_url=endpoint_url,
        image_ids=read_image_ids(val.image_ids, endpoint_url=endpoint_url) if val.image_ids else None,
        categories=val.category_ids or None,
        num_gpus=1.0 if device.type == "cuda" else 0.0,
        extra=extra,
    )


def load_model_for_inference(checkpoint: str | Path, *, device: torch.device, cfg: ExperimentConfig | None = None):
    """A model in eval mode with the weights of ``checkpoint`` (its stored config unless one is given)."""
    state = load_checkpoint(checkpoint, map_location=device)
    if cfg is None:
        if "config" not in state:
            raise ValueError(f"{checkpoint} holds no config: pass --config")
        cfg = config_from_dict(state["config"])
    model = build_model(cfg.model).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg

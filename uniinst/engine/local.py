"""Training in one process (CPU or one GPU): data, model, resume, checkpoints, evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from uniinst.config import (
    DataConfig,
    DatasetConfig,
    ExperimentConfig,
    apply_values,
    dump_config,
    to_dict,
)
from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, build_train_loader
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.data.transforms import TrainTransform, eval_transform
from uniinst.engine.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    load_initial_weights,
    load_model_weights,
    prune_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
    seed_everything,
)
from uniinst.engine.hooks import BestCheckpointer, EvalHook, HookBase, MetricsLogger, PeriodicCheckpointer
from uniinst.engine.metrics import MetricsWriter
from uniinst.engine.trainer import Trainer, format_progress, resolve_device
from uniinst.evaluation.coco_eval import format_table
from uniinst.evaluation.inference import evaluate_model
from uniinst.modeling.sync_batchnorm import convert_sync_batchnorm
from uniinst.modeling.uniinst import build_model

if TYPE_CHECKING:
    from uniinst.data.shards import Manifest

    DataSplit = CocoDataset | Manifest

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    iteration: int
    checkpoint: Path
    metrics: dict[str, float] | None
    model: torch.nn.Module


def with_synthetic_data(cfg: ExperimentConfig) -> ExperimentConfig:
    """With ``data.synthetic``, generate the synthetic set once under the output folder and
    return a copy of ``cfg`` whose ``data.train`` / ``data.val`` point at it."""
    if not cfg.data.synthetic:
        return cfg
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
    return apply_values(cfg, {
        "data.train.json": str(paths["train"]), "data.train.images": str(root / "train"),
        "data.val.json": str(paths["val"]), "data.val.images": str(root / "val"),
    })


def load_datasets(cfg: ExperimentConfig) -> tuple[DataSplit, DataSplit | None]:
    """The training and validation sets: a :class:`CocoDataset` for a JSON, or the
    :class:`Manifest` of a shard dataset (``data.train.shards``), streamed later with Ray
    (a shard dataset needs pyarrow, of the "ray" extra: its module is imported only for one)."""
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
        from uniinst.data.shards import read_manifest

        return read_manifest(split.shards, endpoint_url=d.endpoint_url or None)
    return CocoDataset(split.json, split.images, on_error=d.on_error)


def _num_images(dataset: DataSplit) -> int:
    return len(dataset) if isinstance(dataset, CocoDataset) else dataset.num_images


def train_local(cfg: ExperimentConfig, *, resume: bool = True) -> TrainResult:
    """Train ``cfg`` in this process, resuming from the newest checkpoint in
    ``<output_dir>/checkpoints`` unless ``resume`` is False, and evaluate on ``data.val``.

    Nothing in the output folder is written before the checkpoint to resume from is known to
    fit the configured model and the datasets have loaded."""
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / "checkpoints"
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pick another train.output_dir or resume")
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg.model).to(device)
    convert_sync_batchnorm(model, cfg.model, world=1)
    state = load_checkpoint(existing[-1], map_location=device) if existing else None
    if state is not None:
        load_model_weights(model, state, existing[-1])
    elif cfg.model.weights:
        load_initial_weights(model, cfg.model.weights, endpoint_url=cfg.data.endpoint_url or None)
    cfg = with_synthetic_data(cfg)
    train_set, val_set = load_datasets(cfg)
    trainer = Trainer(model, cfg, device=device, meta={"class_names": train_set.class_names, "category_ids": train_set.contiguous_to_cat_id})
    if state is not None:
        trainer.load_state_dict(state, source=str(existing[-1]))
        logger.info("resumed from %s at iteration %d", existing[-1], trainer.iteration)
    remove_stale_temporaries(ckpt_dir)
    remove_stale_temporaries(out)
    dump_config(cfg, out / "config.yaml")
    logger.info(
        "training %s (%s, R%d) on %s: %d images, batch %d, lr %.4g, %d iterations",
        cfg.name, cfg.model.arch, cfg.model.backbone.depth, device, _num_images(train_set),
        cfg.data.batch_size, trainer.base_lr, cfg.solver.max_iter,
    )
    batches = _train_batches(cfg, train_set, start_iter=trainer.iteration)
    run = _LocalRun(cfg, trainer, val_set, device=device, resume_at=trainer.iteration if existing else None)
    try:
        if trainer.iteration < cfg.solver.max_iter:
            trainer.run(batches, run.hooks())
        else:
            logger.info("%s is already trained to iteration %d", out, trainer.iteration)
            run.metrics = run.evaluate(trainer.iteration)
    finally:
        run.close()
        batches.close()
    if run.metrics is not None:
        (out / "eval" / "final.json").write_text(json.dumps({"iteration": trainer.iteration, **run.metrics}, indent=2))
    return TrainResult(out, trainer.iteration, ckpt_dir / checkpoint_name(trainer.iteration), run.metrics, model)


def _train_batches(cfg: ExperimentConfig, train_set: DataSplit, *, start_iter: int):
    """The training batches from iteration ``start_iter`` on: a DataLoader over a COCO JSON,
    or a Ray Data stream over shards."""
    d = cfg.data
    transform = TrainTransform(short_edge=tuple(d.min_size_train), max_size=d.max_size_train, flip_prob=d.flip_prob)
    if isinstance(train_set, CocoDataset):
        return build_train_loader(
            InstanceSegDataset(train_set, transform, seed=cfg.train.seed, skip_empty=True),
            batch_size=d.batch_size,
            seed=cfg.train.seed,
            num_workers=d.num_workers,
            start_iter=start_iter,
        )
    # Ray only here: importing this module must not pull it in.
    from uniinst.ray.data import ensure_ray
    from uniinst.ray.train_stream import train_stream

    ensure_ray()
    return train_stream(cfg, start_iter=start_iter, manifest=train_set)


class _LocalRun:
    """Where a one-process run writes, all in ``train.output_dir``: the metrics, checkpoints,
    evaluations and best model that its hooks produce."""

    def __init__(
        self, cfg: ExperimentConfig, trainer: Trainer, val_set: DataSplit | None, *,
        device: torch.device, resume_at: int | None,
    ) -> None:
        self.cfg, self.trainer, self.val_set, self.device = cfg, trainer, val_set, device
        self.out = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.writer = MetricsWriter(self.out, resume_at=resume_at)
        self.metrics: dict[str, float] | None = None

    def hooks(self) -> list[HookBase]:
        t = self.cfg.train
        hooks: list[HookBase] = [MetricsLogger(t.log_period, self.log), PeriodicCheckpointer(t.checkpoint_period, self.checkpoint)]
        if self.val_set is not None:
            self.evals = EvalHook(t.eval_period, self.evaluate)
            hooks += [self.evals, BestCheckpointer(self.evals, self.save_best)]
        return hooks

    def log(self, it: int, m: dict[str, float]) -> None:
        self.writer.write(it, m, prefix="train/")
        logger.info(format_progress(it, self.cfg.solver.max_iter, m))

    def checkpoint(self, it: int) -> None:
        path = save_checkpoint(self.trainer.state_dict(), self.ckpt_dir / checkpoint_name(it))
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        logger.info("saved %s", path)

    def evaluate(self, it: int) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        eval_dir = self.out / "eval" / f"iter_{it:07d}"
        extra = {"iteration": it, "checkpoint": str(self.ckpt_dir / checkpoint_name(it))}
        model, cfg = self.trainer.model, self.cfg
        if isinstance(self.val_set, CocoDataset):
            metrics = evaluate_model(
                model, self.val_set, eval_dir, transform=eval_transform(cfg), extra=extra,
                class_names=self.trainer.meta["class_names"],
            )
        else:
            metrics = _evaluate_shards(cfg, model, self.trainer.meta, eval_dir, device=self.device, extra=extra)
        self.metrics = metrics
        self.writer.write(it, metrics, prefix="val/")
        d = cfg.data
        logger.info("evaluation at iteration %d on %s:\n%s", it, d.val.shards or d.val.json, format_table(metrics))
        return metrics

    def save_best(self, it: int, metrics: dict[str, float]) -> None:
        state = self.trainer.state_dict()
        best_state = {k: state[k] for k in ("model", "iteration", "config", "meta")}
        save_checkpoint({**best_state, "metrics": metrics}, self.out / "model_best.pt")

    def close(self) -> None:
        self.writer.close()


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

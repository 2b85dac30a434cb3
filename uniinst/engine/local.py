"""Training in one process (CPU or one GPU): data, model, resume, checkpoints, evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from uniinst.config import ExperimentConfig, apply_values, dump_config
from uniinst.data.source import Split, SplitOpener, open_json_split, open_splits
from uniinst.data.synthetic import generate_synthetic_coco
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
from uniinst.engine.hooks import HookBase, training_hooks
from uniinst.engine.metrics import MetricsWriter
from uniinst.engine.trainer import Trainer, format_progress, resolve_device
from uniinst.evaluation.coco_eval import format_table
from uniinst.evaluation.split_evaluator import SplitEvaluator
from uniinst.modeling.sync_batchnorm import convert_sync_batchnorm
from uniinst.modeling.uniinst import build_model

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
            shapes=d.synthetic_shapes,
            seed=cfg.train.seed,
        )
    return apply_values(cfg, {
        "data.train.json": str(paths["train"]), "data.train.images": str(root / "train"),
        "data.val.json": str(paths["val"]), "data.val.images": str(root / "val"),
    })


def train_local(
    cfg: ExperimentConfig, *, resume: bool = True, open_split: SplitOpener = open_json_split
) -> TrainResult:
    """Train ``cfg`` in this process, resuming from the newest checkpoint in
    ``<output_dir>/checkpoints`` unless ``resume`` is False, and evaluate on ``data.val``.
    ``open_split`` reads the datasets (the default, COCO JSON only; the Ray layer's
    ``uniinst.ray.shard_split.open_split`` also shard datasets).

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
    train_set, val_set = open_splits(cfg, open_split)
    trainer = Trainer(model, cfg, device=device, meta={"class_names": train_set.class_names, "category_ids": train_set.contiguous_to_cat_id})
    if state is not None:
        trainer.load_state_dict(state, source=str(existing[-1]))
        logger.info("resumed from %s at iteration %d", existing[-1], trainer.iteration)
    remove_stale_temporaries(ckpt_dir)
    remove_stale_temporaries(out)
    dump_config(cfg, out / "config.yaml")
    logger.info(
        "training %s (%s, R%d) on %s: %d images, batch %d, lr %.4g, %d iterations",
        cfg.name, cfg.model.arch, cfg.model.backbone.depth, device, train_set.num_images,
        cfg.data.batch_size, trainer.base_lr, cfg.solver.max_iter,
    )
    # One process resumes after iteration x batch images (also those of a run it did not write).
    batches = train_set.train_batches(cfg, rank=0, world_size=1, resume=None, start_iter=trainer.iteration)
    run = _LocalRun(cfg, trainer, val_set, resume_at=trainer.iteration if existing else None)
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


class _LocalRun:
    """Where a one-process run writes, all in ``train.output_dir``: the metrics, checkpoints,
    evaluations and best model that its hooks produce."""

    def __init__(
        self, cfg: ExperimentConfig, trainer: Trainer, val_set: Split | None, *, resume_at: int | None
    ) -> None:
        self.cfg, self.trainer, self.val_set = cfg, trainer, val_set
        self.evaluator = SplitEvaluator(val_set, cfg) if val_set is not None else None
        self.out = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.writer = MetricsWriter(self.out, resume_at=resume_at)
        self.metrics: dict[str, float] | None = None

    def hooks(self) -> list[HookBase]:
        return training_hooks(self.cfg.train, self, evaluates=self.evaluator is not None)

    def log(self, it: int, m: dict[str, float]) -> None:
        self.writer.write(it, m, prefix="train/")
        logger.info(format_progress(it, self.cfg.solver.max_iter, m))

    def checkpoint(self, it: int) -> None:
        path = save_checkpoint(self.trainer.state_dict(), self.ckpt_dir / checkpoint_name(it))
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        logger.info("saved %s", path)

    def evaluate(self, it: int) -> dict[str, float] | None:
        if self.evaluator is None:
            return None
        eval_dir = self.out / "eval" / f"iter_{it:07d}"
        extra = {"iteration": it, "checkpoint": str(self.ckpt_dir / checkpoint_name(it))}
        metrics = self.evaluator(self.trainer.model, eval_dir, extra)
        self.metrics = metrics
        self.writer.write(it, metrics, prefix="val/")
        logger.info("evaluation at iteration %d on %s:\n%s", it, self.val_set.location, format_table(metrics))
        return metrics

    def save_best(self, it: int, metrics: dict[str, float]) -> None:
        state = self.trainer.state_dict()
        best_state = {k: state[k] for k in ("model", "iteration", "config", "meta")}
        save_checkpoint({**best_state, "metrics": metrics}, self.out / "model_best.pt")

    def close(self) -> None:
        self.writer.close()

"""Distributed training with Ray Train (V2): a ``TorchTrainer`` whose workers each run the
library's :class:`~uniinst.engine.trainer.Trainer`, wrapped in DistributedDataParallel (gloo
on CPUs, NCCL on GPUs).

A run lives in one folder, ``<ray.storage_path>/<ray.name>`` (a local path or ``s3://`` /
``gs://``)::

    checkpoint_0000300/      state.pt (model, optimizer, LR schedule, scaler, iteration),
                             rng_rank<r>.pt and val_metrics.json (the last evaluation's),
                             every train.checkpoint_period iterations
    config.yaml              the resolved config
    metrics.jsonl            train/* every log period, val/* every evaluation, event/* restarts
    tensorboard/             the same as TensorBoard events
    eval/iter_0000300/       metrics.json, metrics.md, results.json
    model_best.pt            the weights with the best val mask AP so far
    summary.json             written by the driver when the run ends
    data/                    the synthetic dataset's shards, when the config asks for it

Rerunning the same ``(storage_path, name)`` resumes: Ray Train hands the workers its newest
registered checkpoint (registered only once fully uploaded, so a run killed while saving
resumes from the one before), and the workers load model, optimizer, schedule, scaler,
iteration and RNG state from it and continue the data stream at the same position. A worker
that dies makes Ray restart the group the same way, up to ``ray.max_failures`` times. Before
that, the driver checks that the checkpoint fits the configured model, and fails before
writing anything to the run if it does not; a worker's input error (``ValueError``,
``FileNotFoundError``: the same on every try) ends the run without restarts and is raised as
itself.

Data: within an epoch no image reaches two workers. From a COCO JSON every worker takes its
positions of one global image stream (:class:`~uniinst.data.dataset.TrainingSampler`), so
``N`` workers with batch ``b`` see the same global batches as one process with batch ``N * b``;
with the normalisers all-reduced and the LR scaled by the global batch, they take the same
steps. From shards each worker reads and trains on its own piece of the epoch
(:class:`uniinst.ray.train_stream.TrainStream`, ``data.split``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from uniinst.config import ExperimentConfig, apply_values, config_from_dict, dump_config, to_dict
from uniinst.data.prepare import prepare_dataset
from uniinst.data.shards import read_manifest
from uniinst.data.source import TrainBatches, open_splits
from uniinst.data.storage import (
    absolute,
    arrow_filesystem_for,
    download_file,
    exists,
    filesystem_for,
    join,
    upload_file,
)
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.engine.checkpoint import (
    load_checkpoint,
    load_initial_weights,
    load_model_weights,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from uniinst.engine.hooks import HookBase, training_hooks
from uniinst.engine.inference_model import inference_model
from uniinst.engine.metrics import MetricsWriter
from uniinst.engine.trainer import Trainer, format_progress
from uniinst.evaluation.coco_eval import format_table
from uniinst.evaluation.split_evaluator import SplitEvaluator
from uniinst.modeling.sync_batchnorm import convert_sync_batchnorm, sync_batchnorm_parts
from uniinst.modeling.uniinst import build_model
from uniinst.ray.input_errors import EndAtInputError, fit_raising_input_errors
from uniinst.ray.prepare import connect, ray_executor
from uniinst.ray.shard_split import open_split
from uniinst.redact import redact_uri

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
VAL_METRICS_FILE = "val_metrics.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_\d{7}")
# Ray Train's record of a run's registered checkpoints, in the run folder.
_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Drawings of smaller images are enlarged: on a 128-px synthetic image a label covers half a shape.
DRAWING_MIN_SIDE = 512


def checkpoint_dir_name(iteration: int) -> str:
    return f"checkpoint_{iteration:07d}"


# --------------------------------------------------------------------------- where a run lives


@dataclass
class RunLocation:
    """A run's folder (``uri``) and how Ray Train is told about it."""

    uri: str
    name: str
    storage_path: str
    storage_filesystem: Any
    endpoint_url: str | None


def run_location(cfg: ExperimentConfig) -> RunLocation:
    """``ray.storage_path/ray.name`` (the name defaulting to the config's), or the folder
    ``train.output_dir`` when no storage path is set."""
    r = cfg.ray
    if r.storage_path:
        base, name = absolute(r.storage_path), r.name or cfg.name
    else:
        out = absolute(cfg.train.output_dir)
        base, name = os.path.dirname(out), r.name or os.path.basename(out)
    if not name or "/" in name:
        raise ValueError(f"the run name must be a non-empty folder name, got {name!r} (set ray.name)")
    endpoint_url = cfg.data.endpoint_url or None
    fs, storage = arrow_filesystem_for(base, endpoint_url=endpoint_url)
    return RunLocation(join(base, name), name, storage, fs, endpoint_url)


def run_checkpoints(run: RunLocation) -> list[str]:
    """The checkpoint folders of the run, oldest first."""
    fs, path = filesystem_for(run.uri, endpoint_url=run.endpoint_url)
    found = fs.glob(f"{path}/checkpoint_*") if fs.exists(path) else []
    return sorted(name for p in found if _CHECKPOINT_DIR.fullmatch(name := os.path.basename(p.rstrip("/"))))


def scaling_config(cfg: ExperimentConfig) -> ScalingConfig:
    r = cfg.ray
    elastic = 0 < r.min_workers < r.num_workers
    resources: dict[str, float] = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(
        num_workers=(r.min_workers, r.num_workers) if elastic else r.num_workers,
        use_gpu=r.use_gpu,
        resources_per_worker=resources,
        accelerator_type=r.accelerator_type or None,
    )


# --------------------------------------------------------------------------- SyncBN


def _check_sync_batchnorm(cfg: ExperimentConfig) -> None:
    """Refuse SyncBN where it cannot synchronise: torch's SyncBatchNorm only runs on GPU
    tensors once there are several processes (on CPU its forward raises), and training it
    as per-worker BatchNorm instead would quietly be another model."""
    parts = sync_batchnorm_parts(cfg.model)
    if parts and cfg.ray.num_workers > 1 and not cfg.ray.use_gpu:
        raise ValueError(
            f"{parts[0][1]}=SyncBN needs GPU workers (ray.use_gpu=true) with ray.num_workers > 1: "
            "torch's SyncBatchNorm does not run on CPU; use BN or GN on CPU workers"
        )


# --------------------------------------------------------------------------- the driver


@dataclass
class RayTrainResult:
    run_uri: str
    iteration: int
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, float] | None


def prepare_run_data(
    cfg: ExperimentConfig, folder: str, endpoint_url: str | None = None
) -> tuple[ExperimentConfig, dict[str, list]]:
    """Check the datasets; return the config to train with and what the checkpoints record
    of the training data (``class_names`` and ``category_ids``, label by label). With
    ``data.synthetic`` the synthetic set is generated here and converted to shards in
    ``<folder>/data`` (reused when there), so that workers on any node can read it, and the
    returned config points at them."""
    d = cfg.data
    if d.synthetic:
        uris = {split: join(folder, "data", split) for split in ("train", "val")}
        missing = [s for s, uri in uris.items() if not exists(join(uri, "manifest.json"), endpoint_url=endpoint_url)]
        if missing:
            with tempfile.TemporaryDirectory(prefix="uniinst-synthetic-") as tmp:
                logger.info("generating the synthetic dataset and its shards in %s", redact_uri(join(folder, "data")))
                paths = generate_synthetic_coco(
                    tmp,
                    splits={"train": d.synthetic_train_images, "val": d.synthetic_val_images},
                    image_size=d.synthetic_image_size,
                    num_classes=cfg.model.num_classes,
                    shapes=d.synthetic_shapes,
                    seed=cfg.train.seed,
                )
                for split in missing:
                    prepare_dataset(
                        str(paths[split]), str(Path(tmp) / split), uris[split], images_per_shard=16,
                        endpoint_url=endpoint_url, executor=ray_executor(), progress=False,
                    )
        values: dict[str, Any] = {"data.synthetic": False}
        for split in uris:
            values.update({f"data.{split}.json": "", f"data.{split}.images": "", f"data.{split}.shards": uris[split]})
        cfg = apply_values(cfg, values)
    train, _ = open_splits(cfg, open_split)
    return cfg, {"class_names": list(train.class_names), "category_ids": list(train.contiguous_to_cat_id)}


def _check_resume(cfg: ExperimentConfig, run: RunLocation) -> str | None:
    """The checkpoint Ray Train will resume the run from (None if none is registered),
    once its weights are seen to fit ``cfg.model``: a run resumed with another model fails
    here, before anything is written to the run folder, rather than in every worker."""
    if not exists(join(run.uri, _RAY_SNAPSHOT), endpoint_url=run.endpoint_url):
        return None
    latest = Result.from_path(join(run.storage_path, run.name), storage_filesystem=run.storage_filesystem).checkpoint
    if latest is None:
        return None
    uri = join(run.uri, os.path.basename(latest.path.rstrip("/")))
    state = load_run_checkpoint(uri, endpoint_url=run.endpoint_url)
    load_model_weights(_random_model(cfg), state, redact_uri(uri))
    return os.path.basename(uri)


def _random_model(cfg: ExperimentConfig) -> torch.nn.Module:
    """``cfg``'s model without ImageNet weights, for checking that other weights fit it."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.pretrained = False
    return build_model(model_cfg)


def train_ray(cfg: ExperimentConfig, *, resume: bool = True, callbacks: list | None = None) -> RayTrainResult:
    """Train ``cfg`` on the Ray cluster (joined, or started locally) with ``ray.num_workers``
    workers; resume the run at ``(ray.storage_path, ray.name)`` if it exists (unless
    ``resume`` is False, which refuses an existing run). ``callbacks`` go to Ray Train's
    ``RunConfig`` (a search passes Tune's report callback)."""
    _check_sync_batchnorm(cfg)
    connect()
    run = run_location(cfg)
    existing = run_checkpoints(run)
    if existing and not resume:
        raise FileExistsError(f"run {redact_uri(run.uri)} already holds {existing[-1]}: pick another name or resume")
    resumed = _check_resume(cfg, run)
    if resumed is None and cfg.model.weights:
        # Checked (and said) here, so that weights that do not fit fail before any worker starts.
        load_initial_weights(_random_model(cfg), cfg.model.weights, endpoint_url=cfg.data.endpoint_url or None)
    cfg, meta = prepare_run_data(cfg, run.uri, run.endpoint_url)
    with tempfile.TemporaryDirectory() as tmp:
        upload_file(dump_config(cfg, Path(tmp) / "config.yaml"), join(run.uri, "config.yaml"), endpoint_url=run.endpoint_url)
    logger.info(
        "training %s with %s worker(s) x batch %d in %s%s",
        cfg.name, cfg.ray.num_workers, cfg.data.batch_size, redact_uri(run.uri),
        f" (resuming from {resumed})" if resumed else "",
    )
    loop_config = {"config": to_dict(cfg), "run_uri": run.uri, "meta": meta}
    # Read once here rather than by every worker (for shards: every shard's image ids).
    loop_config["train_plan"] = open_split(cfg.data.train, cfg, "train").plan()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            storage_filesystem=run.storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints or None),
            callbacks=[*(callbacks or []), EndAtInputError()],
        ),
    )
    result = fit_raising_input_errors(trainer)
    metrics = dict(result.metrics or {})
    val = {k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.startswith("val/")} or None
    best = join(run.uri, "model_best.pt")
    out = RayTrainResult(
        run_uri=run.uri,
        iteration=int(metrics.get("iteration", 0)),
        checkpoint=join(run.uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None,
        best_checkpoint=best if exists(best, endpoint_url=run.endpoint_url) else None,
        metrics=val,
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        summary.write_text(json.dumps({**out.__dict__, "workers": cfg.ray.num_workers}, indent=2))
        upload_file(summary, join(run.uri, "summary.json"), endpoint_url=run.endpoint_url)
    return out


def load_run_checkpoint(uri: str, *, endpoint_url: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    """The training state in a run's checkpoint folder (or its ``model_best.pt``) at ``uri``."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "state.pt"
        source = uri if uri.endswith(".pt") else join(uri, STATE_FILE)
        if not download_file(source, local, endpoint_url=endpoint_url):
            raise FileNotFoundError(f"no checkpoint at {redact_uri(source)}")
        return load_checkpoint(local, map_location=map_location)


# --------------------------------------------------------------------------- in each worker


class _RunFiles:
    """Rank 0's metrics, reports and best weights: written in a local staging folder and
    copied into the run folder after each report (TensorBoard cannot write to every store)."""

    def __init__(self, run_uri: str, endpoint_url: str | None, *, resume_at: int) -> None:
        self.run_uri = run_uri
        self.endpoint_url = endpoint_url
        self.staging = Path(tempfile.mkdtemp(prefix="uniinst-run-"))
        # A resumed run appends to its metrics instead of starting them again, without the
        # rows of the iterations after its checkpoint (``resume_at``), which it redoes.
        download_file(join(run_uri, "metrics.jsonl"), self.staging / "metrics.jsonl", endpoint_url=endpoint_url)
        self.writer = MetricsWriter(self.staging, resume_at=resume_at)
        self._synced: dict[Path, tuple[int, int]] = {}
        self._closed = False

    def sync(self) -> None:
        if not self._closed:
            self.writer.flush()
        for path in sorted(p for p in self.staging.rglob("*") if p.is_file()):
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self._synced.get(path) == key:
                continue
            rel = path.relative_to(self.staging).as_posix()
            upload_file(path, join(self.run_uri, rel), endpoint_url=self.endpoint_url)
            self._synced[path] = key

    def close(self) -> None:
        self.writer.close()
        self._closed = True
        self.sync()
        shutil.rmtree(self.staging, ignore_errors=True)


def _restore(
    trainer: Trainer, checkpoint: Checkpoint, rank: int, device: torch.device
) -> tuple[dict[str, Any], dict[str, float]]:
    """Load the checkpoint into ``trainer``; returns the data stream's position to continue at
    and the val metrics of the last evaluation before the checkpoint."""
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder) / STATE_FILE, map_location=device)
        trainer.load_state_dict(state)
        val_file = Path(folder) / VAL_METRICS_FILE
        latest_val = json.loads(val_file.read_text()) if val_file.is_file() else {}
        own = Path(folder) / f"rng_rank{rank}.pt"
        if own.is_file():
            set_rng_state(torch.load(own, weights_only=True))
        else:
            # The group grew: a worker without a saved state draws a fresh, distinct one.
            seed_everything(trainer.cfg.train.seed + rank + 7919 * trainer.iteration)
    if "data_stream" in state:
        return state["data_stream"], latest_val
    # Checkpoints before the shard split counted images of the global stream.
    images = state.get("data_position", trainer.iteration * state.get("global_batch", trainer.global_batch))
    return {"split": "images", "images": int(images)}, latest_val


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker: the library's training loop, unchanged, with
    checkpoints, metrics and evaluations reported to Ray."""
    _quiet_ray_loggers()
    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed + rank)
    checkpoint = ray.train.get_checkpoint()
    trainer = _worker_trainer(cfg, config["meta"], world=world, device=device, fresh=checkpoint is None)
    position, latest_val = _restore(trainer, checkpoint, rank, device) if checkpoint is not None else ({}, {})
    first_iteration = trainer.iteration
    files: _RunFiles | None = None
    if rank == 0:
        files = _RunFiles(config["run_uri"], cfg.data.endpoint_url or None, resume_at=first_iteration)
        if checkpoint is not None:
            files.writer.write(trainer.iteration, {"resumed": 1.0, "workers": float(world)}, prefix="event/")
            logger.info("resumed at iteration %d with %d worker(s)", trainer.iteration, world)
        logger.info(
            "training %s on %d worker(s) (%s): global batch %d, lr %.4g, %d iterations",
            cfg.name, world, device.type, trainer.global_batch, trainer.base_lr, cfg.solver.max_iter,
        )
    evaluator = None
    if cfg.data.val.json or cfg.data.val.shards:
        val = open_split(cfg.data.val, cfg, "val", config["meta"]["class_names"])
        evaluator = SplitEvaluator(val, cfg, rank=rank, world=world)
    train = open_split(cfg.data.train, cfg, "train")
    batches = train.train_batches(cfg, rank=rank, world_size=world, resume=position, plan=config.get("train_plan"))
    run = _WorkerRun(trainer, batches, files, evaluator, rank=rank, world=world, latest_val=latest_val)
    try:
        if trainer.iteration < cfg.solver.max_iter:
            trainer.run(batches, run.hooks())
        else:
            ray.train.report({"iteration": trainer.iteration, **latest_val})
    finally:
        batches.close()
        if files is not None:
            files.close()


def _quiet_ray_loggers() -> None:
    """Ray logs every report and every epoch's pipeline at INFO; the job's output should show
    the training's progress (Ray's session logs keep everything)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Some of Ray Train's loggers are named by their file's path, outside the "ray.train" tree.
    train_dir = os.path.dirname(ray.train.__file__)
    for name in ["ray.train", "ray.data", *logging.Logger.manager.loggerDict]:
        if name in ("ray.train", "ray.data") or name.startswith(train_dir):
            logging.getLogger(name).setLevel(logging.WARNING)


def _worker_trainer(cfg: ExperimentConfig, meta: dict, *, world: int, device: torch.device, fresh: bool) -> Trainer:
    """A worker's model (initial weights on a ``fresh`` run, DDP over several workers) and trainer."""
    model = build_model(cfg.model).to(device)
    if fresh and cfg.model.weights:
        load_initial_weights(model, cfg.model.weights, endpoint_url=cfg.data.endpoint_url or None, announce=False)
    convert_sync_batchnorm(model, cfg.model, world)
    forward_model: torch.nn.Module = model
    if world > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Trainer(model, cfg, device=device, world_size=world, forward_model=forward_model, meta=meta)


class _WorkerRun:
    """What a Ray Train worker's hooks produce and where it goes: rank 0 writes the run's
    metrics, evaluations and best model (``files``); every rank writes its part of each
    checkpoint and reports to Ray at the same iterations."""

    def __init__(
        self, trainer: Trainer, batches: TrainBatches, files: _RunFiles | None,
        evaluator: SplitEvaluator | None, *, rank: int, world: int, latest_val: dict[str, float],
    ) -> None:
        self.trainer, self.cfg, self.batches = trainer, trainer.cfg, batches
        self.files, self.evaluator = files, evaluator
        self.rank, self.world, self.first_iteration = rank, world, trainer.iteration
        self.latest_val = latest_val  # the last evaluation's val/* metrics, sent with every report
        self.pending: dict[str, float] = {}
        self.saved: list[Path] = []
        self.evaluated = False

    def hooks(self) -> list[HookBase]:
        return [*training_hooks(self.cfg.train, self, evaluates=self.evaluator is not None), RayReport(self)]

    def log(self, it: int, m: dict[str, float]) -> None:
        step = m["data_time"] + m["step_time"]
        m = {**m, "images_per_sec": m["images_per_sec"] * self.world}
        m["data_wait_fraction"] = m["data_time"] / max(step, 1e-9)
        self.pending.update({f"train/{k}": v for k, v in m.items()})
        if self.files is not None:
            self.files.writer.write(it, m, prefix="train/")
            logger.info(format_progress(it, self.cfg.solver.max_iter, m))

    def checkpoint(self, it: int) -> None:
        folder = Path(tempfile.mkdtemp(prefix="uniinst-ckpt-"))
        if self.rank == 0:
            # Where a resumed stream continues, whatever the size of the group that resumes it.
            data_stream = self.batches.state_after(it - self.first_iteration)
            save_checkpoint({**self.trainer.state_dict(), "data_stream": data_stream}, folder / STATE_FILE)
        torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")
        self.saved.append(folder)

    def evaluate(self, it: int) -> dict[str, float] | None:
        # Every rank takes part and then reports, not only rank 0 that gets the metrics.
        self.evaluated = True
        files = self.files
        out_dir = files.staging / "eval" / f"iter_{it:07d}" if files is not None else Path(tempfile.gettempdir())
        metrics = self.evaluator(self.trainer.model, out_dir, {"iteration": it})
        if metrics is None or files is None:
            return None
        self.latest_val.update({f"val/{k}": v for k, v in metrics.items()})
        files.writer.write(it, metrics, prefix="val/")
        logger.info("evaluation at iteration %d:\n%s", it, format_table(metrics))
        return metrics

    def save_best(self, it: int, metrics: dict[str, float]) -> None:
        state = {k: v for k, v in self.trainer.state_dict().items() if k in ("model", "iteration", "config", "meta")}
        save_checkpoint({**state, "metrics": metrics}, self.files.staging / "model_best.pt")

    def report(self, it: int) -> None:
        """Report what this iteration produced, if anything: every worker gets here at the same
        iterations (``ray.train.report`` is a barrier). Each report carries the latest val
        metrics, so that a search sees its metric in every result."""
        if not self.pending and not self.saved and not self.evaluated:
            return
        if self.saved and self.files is not None and self.latest_val:
            # A resumed run's reports carry them again before its next evaluation.
            (self.saved[-1] / VAL_METRICS_FILE).write_text(json.dumps(self.latest_val))
        checkpoint = Checkpoint.from_directory(str(self.saved[-1])) if self.saved else None
        ray.train.report(
            {"iteration": it, **self.pending, **self.latest_val},
            checkpoint=checkpoint,
            checkpoint_dir_name=checkpoint_dir_name(it) if checkpoint else None,
        )
        for folder in self.saved:
            shutil.rmtree(folder, ignore_errors=True)
        self.saved.clear()
        self.pending.clear()
        self.evaluated = False
        if self.files is not None:
            self.files.sync()


class RayReport(HookBase):
    """The last hook of a worker: reports to Ray Train what the hooks before it produced."""

    def __init__(self, run: _WorkerRun) -> None:
        self.run = run

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.run.report(trainer.iteration)


# --------------------------------------------------------------------------- after the run


def format_summary(result: RayTrainResult) -> str:
    """Where a finished run put everything, and its last val mask AP."""
    run = result.run_uri
    lines = [f"run {redact_uri(run)}: trained to iteration {result.iteration}"]
    if result.metrics:
        lines += [format_table(result.metrics), f"val mask AP {result.metrics['AP']:.4f}"]
    lines += [
        f"  checkpoint:   {redact_uri(result.checkpoint) if result.checkpoint else '(none)'}",
        f"  best model:   {redact_uri(result.best_checkpoint) if result.best_checkpoint else '(no evaluation)'}",
        f"  evaluation:   {redact_uri(join(run, 'eval'))}",
        f"  metrics log:  {redact_uri(join(run, 'metrics.jsonl'))} (TensorBoard: {redact_uri(join(run, 'tensorboard'))})",
        f"  summary:      {redact_uri(join(run, 'summary.json'))}",
    ]
    return "\n".join(lines)


def draw_shard_predictions(
    checkpoint: str,
    shards: str | None,
    out_dir: str | Path,
    *,
    num_images: int = 8,
    endpoint_url: str | None = None,
    device: str = "cpu",
) -> int:
    """PNGs of the predictions of ``checkpoint`` (a ``.pt`` file or a run's checkpoint folder)
    on the first ``num_images`` images of the shard dataset ``shards`` (None: the val shards
    the run evaluated on, from the checkpoint's config); returns how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from uniinst.data.collate import collate
    from uniinst.data.shards import decode_row, shard_uris
    from uniinst.visualize import save_visualization

    state = load_run_checkpoint(checkpoint, endpoint_url=endpoint_url, map_location=device)
    loaded = inference_model(state, source=redact_uri(checkpoint), device=device)
    shards = shards or loaded.cfg.data.val.shards
    manifest = read_manifest(shards, endpoint_url=endpoint_url)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    drawn = 0
    for uri in shard_uris(shards, manifest):
        fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
        table = pq.ParquetFile(pa.BufferReader(fs.cat_file(path))).read()
        for row in table.to_pylist():
            if drawn >= num_images:
                return drawn
            record = decode_row(row, manifest.cat_id_to_contiguous, where=f"shard {redact_uri(uri)}")
            (instances,) = loaded.predict(collate([loaded.transform(record, rng)]))
            save_visualization(
                record.image, instances, loaded.label_names, out_dir / f"{record.image_id}.png",
                min_side=DRAWING_MIN_SIDE,
            )
            drawn += 1
    return drawn

"""A reproduction suite on Ray: every (variant, seed) a Ray Train run scheduled by Ray Tune,
each trained run scored on every split with every NMS mode, the rows in the paper's tables.

Tune runs a grid (FIFO) over the (variant, seed) pairs, as many at once as the cluster holds
(:func:`~uniinst.ray.tune.concurrency`). A suite lives in one folder (a path or URI)::

    suite.yaml                     the suite as run
    data/                          the training set's shards (a synthetic experiment's)
    splits/<split>/                the generated evaluation splits, as shards
    tune/                          Tune's state (what ``--resume`` restores)
    wall_time.json                 the suite's wall time, summed over its starts
    runs/<variant>-seed<k>/        each run: its Ray Train folder, and rows.json once scored
    results.json, report.md        every row; the paper's tables and claims
    plots/                         AP against α, AP with and without NMS, duplicates per GT

A run is scored once, after its training, in a Ray task (:func:`scoring_resources`): its final
checkpoint, not the best one on val, so that no split chooses the model it scores. A resumed
suite keeps Tune's finished trials; an unfinished one continues its Ray Train run from its
last checkpoint (a complete run trains nothing again), and a run with ``rows.json`` is
neither trained nor scored again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from uniinst.config import DatasetConfig, ExperimentConfig, config_from_dict, to_dict
from uniinst.data.prepare import prepare_dataset
from uniinst.data.storage import absolute, arrow_filesystem_for, download_file, exists, join, upload_file
from uniinst.data.synthetic import generate_synthetic_coco
from uniinst.data.transforms import eval_transform
from uniinst.engine.inference_model import inference_model
from uniinst.evaluation.uniqueness import duplicates_per_instance
from uniinst.ray.evaluate import ShardEvalSet
from uniinst.ray.prepare import connect, ray_executor
from uniinst.ray.train import load_run_checkpoint, prepare_run_data, train_ray
from uniinst.ray.tune import DRIVER_MEMORY_BYTES, LeftoverPlacementGroups, check_state_api, concurrency
from uniinst.redact import redact_uri
from uniinst.reproduce.report import RESULT_KEYS, SuiteReport
from uniinst.reproduce.suite import SuiteConfig, suite_to_dict

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
RUNS_DIR = "runs"
ROWS_FILE = "rows.json"
WALL_TIME_FILE = "wall_time.json"


@dataclass
class SuiteResult:
    uri: str
    rows: list[dict]
    report: str
    files: list[str]
    finished: bool


def suite_uri(suite: SuiteConfig, out: str | None = None) -> str:
    return absolute(out) if out else join(absolute(suite.storage_path), suite.name)


# --------------------------------------------------------------------------- the splits


def prepare_splits(suite: SuiteConfig, uri: str, experiment: ExperimentConfig) -> dict[str, DatasetConfig]:
    """Every split as a shard dataset: a synthetic one generated (once) into
    ``<uri>/splits/<name>``, a given one as it is."""
    endpoint = experiment.data.endpoint_url or None
    out = {}
    for name, split in suite.splits.items():
        if split.synthetic is None:
            out[name] = DatasetConfig(shards=split.shards, image_ids=split.image_ids, category_ids=split.category_ids)
            continue
        target = join(uri, "splits", name)
        if not exists(join(target, "manifest.json"), endpoint_url=endpoint):
            s = split.synthetic
            with tempfile.TemporaryDirectory(prefix="uniinst-split-") as tmp:
                logger.info("generating the split %s (%d images, %s occlusion)", name, s.images, s.occlusion)
                paths = generate_synthetic_coco(
                    tmp, splits={name: s.images}, image_size=s.image_size or experiment.data.synthetic_image_size,
                    num_classes=experiment.model.num_classes, shapes=experiment.data.synthetic_shapes,
                    occlusion=s.occlusion, seed=s.seed,
                )
                prepare_dataset(
                    str(paths[name]), str(Path(tmp) / name), target, images_per_shard=16,
                    endpoint_url=endpoint, executor=ray_executor(), progress=False,
                )
        out[name] = DatasetConfig(shards=target, category_ids=split.category_ids)
    return out


# --------------------------------------------------------------------------- scoring a run


def score_run(
    checkpoint: str, splits: dict[str, DatasetConfig] | None, nms_modes: list[str], *, endpoint_url: str | None
) -> list[dict]:
    """Rows (AP values in %) of a run's checkpoint on every split (None: the shard val set
    it was trained with) with every NMS mode."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = load_run_checkpoint(checkpoint, endpoint_url=endpoint_url, map_location=device)
    cfg = config_from_dict(state["config"])
    splits = splits if splits is not None else {"val": cfg.data.val}
    names = state.get("meta", {}).get("class_names")
    models = {
        nms: inference_model(
            state, source=redact_uri(checkpoint), device=device, overrides=[f"model.inference.nms={nms}"]
        ).model
        for nms in nms_modes
    }
    transform = eval_transform(cfg)
    rows = []
    for split_name, split in splits.items():
        data = ShardEvalSet(split, num_classes=cfg.model.num_classes, class_names=names, endpoint_url=endpoint_url)
        for nms, model in models.items():
            results = data.predict(model, transform=transform)
            metrics = data.score(results)
            rows.append({
                "split": split_name, "nms": nms,
                **{k: 100.0 * metrics[k] for k in ("AP", "AP50", "AP75", "AR100")},
                "duplicates_per_gt": duplicates_per_instance(results, data.num_instances),
                "iterations": int(state["iteration"]),
            })
            logger.info("scored %s on %s with NMS %s: AP %.1f", redact_uri(checkpoint), split_name, nms, rows[-1]["AP"])
    return rows


# --------------------------------------------------------------------------- one trial


@dataclass
class SuiteTrialSetup:
    """What every trial's driver needs: the suite, the experiment (trained once into shards),
    the splits and where the runs go."""

    suite: SuiteConfig
    experiment: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    runs_uri: str


def scoring_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What scoring a run holds: a GPU, or on CPU at most what the run's workers have just
    given back (up to one CPU). More would starve the Ray Data read tasks that scoring and
    the runs still training need (each takes a CPU), and none of them could go on."""
    r = cfg.ray
    if r.use_gpu:
        return {"num_gpus": 1}
    return {"num_cpus": min(1.0, r.num_workers * r.cpus_per_worker)}


def run_suite_trial(params: dict[str, Any], setup: SuiteTrialSetup) -> None:
    """Train ``params["run"]``'s variant with its seed in ``<runs>/<variant>-seed<k>`` (or
    continue it), then score its final checkpoint; nothing when its rows are written."""
    variant, seed = params["run"]["variant"], int(params["run"]["seed"])
    suite = setup.suite
    overrides = [*suite.variants[variant], f"train.seed={seed}"]
    cfg = config_from_dict(setup.experiment, overrides, source=f"variant {variant}")
    cfg.ray.storage_path, cfg.ray.name = setup.runs_uri, suite.run_name(variant, seed)
    endpoint = cfg.data.endpoint_url or None
    rows_uri = join(setup.runs_uri, cfg.ray.name, ROWS_FILE)
    if exists(rows_uri, endpoint_url=endpoint):
        return  # scored before an interruption that Tune had not yet recorded
    result = train_ray(cfg, callbacks=[TuneReportCallback()])
    if result.checkpoint is None:
        raise RuntimeError(f"run {redact_uri(result.run_uri)} ended without a checkpoint")
    splits = {name: DatasetConfig(**d) for name, d in setup.splits.items()}
    task = ray.remote(score_run).options(
        **scoring_resources(cfg), scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)
    )
    rows = ray.get(task.remote(result.checkpoint, splits, suite.nms, endpoint_url=endpoint))
    rows = [{"variant": variant, "seed": seed, **row} for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / ROWS_FILE
        local.write_text(json.dumps(rows, indent=1))
        upload_file(local, rows_uri, endpoint_url=endpoint)


# --------------------------------------------------------------------------- the suite


def _check_start(uri: str, *, resume: bool, endpoint_url: str | None) -> None:
    """Refuse a resume with nothing to resume, or a new suite over an existing one."""
    fs, storage = arrow_filesystem_for(uri, endpoint_url=endpoint_url)
    restorable = tune.Tuner.can_restore(f"{storage}/{TUNE_DIR}", storage_filesystem=fs)
    if resume and not restorable:
        raise FileNotFoundError(f"no suite to resume at {redact_uri(uri)}")
    if not resume and restorable:
        raise FileExistsError(f"a suite already lives at {redact_uri(uri)}: resume it (--resume) or pick another --out")


def _tuner(suite: SuiteConfig, uri: str, trainable: Any, experiment: ExperimentConfig, *, resume: bool) -> tune.Tuner:
    fs, storage = arrow_filesystem_for(uri, endpoint_url=experiment.data.endpoint_url or None)
    state = f"{storage}/{TUNE_DIR}"
    if resume:
        logger.info("resuming the suite %s", redact_uri(uri))
        return tune.Tuner.restore(state, trainable, storage_filesystem=fs, resume_unfinished=True, resume_errored=True)
    grid = [{"variant": v, "seed": s} for v in suite.variants for s in suite.seeds]
    at_once = concurrency(suite.max_concurrent, experiment)
    logger.info(
        "suite %s: %d variant(s) x %d seed(s) = %d runs, %d at once; results in %s",
        suite.name, len(suite.variants), len(suite.seeds), len(grid), at_once, redact_uri(uri),
    )
    return tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=at_once)),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=storage, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=suite.max_failures),
        ),
    )


def run_suite(suite: SuiteConfig, *, out: str | None = None, resume: bool = False) -> SuiteResult:
    """Run ``suite`` on the Ray cluster (joined, or started locally) into ``out`` (default
    ``<storage_path>/<name>``), or with ``resume`` continue the one interrupted there; then
    write its results, report and plots."""
    uri = suite_uri(suite, out)
    start = time.monotonic()
    experiment = suite.experiment_config()
    endpoint = experiment.data.endpoint_url or None
    _check_start(uri, resume=resume, endpoint_url=endpoint)
    connect()
    check_state_api()
    experiment, _ = prepare_run_data(experiment, uri, endpoint)
    splits = prepare_splits(suite, uri, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "suite.yaml"
        local.write_text(yaml.safe_dump(suite_to_dict(suite), sort_keys=False))
        upload_file(local, join(uri, "suite.yaml"), endpoint_url=endpoint)
    setup = SuiteTrialSetup(suite, to_dict(experiment), {k: to_dict(v) for k, v in splits.items()}, join(uri, RUNS_DIR))
    trainable = tune.with_resources(
        tune.with_parameters(run_suite_trial, setup=setup), {"cpu": 0, "memory": DRIVER_MEMORY_BYTES}
    )
    with LeftoverPlacementGroups():
        _tuner(suite, uri, trainable, experiment, resume=resume).fit()
    wall_s = _add_wall_time(uri, time.monotonic() - start, endpoint_url=endpoint)
    return collect_suite(suite, uri, experiment, wall_s=wall_s)


def _add_wall_time(uri: str, seconds: float, *, endpoint_url: str | None) -> float:
    """The suite's wall time over all its starts (a resumed suite adds to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / WALL_TIME_FILE
        before = 0.0
        if download_file(join(uri, WALL_TIME_FILE), local, endpoint_url=endpoint_url):
            before = float(json.loads(local.read_text())["wall_s"])
        local.write_text(json.dumps({"wall_s": before + seconds}))
        upload_file(local, join(uri, WALL_TIME_FILE), endpoint_url=endpoint_url)
    return before + seconds


def read_rows(suite: SuiteConfig, uri: str, *, endpoint_url: str | None = None) -> tuple[list[dict], list[str]]:
    """Every scored run's rows, and the names of the runs without rows."""
    rows, missing = [], []
    for variant in suite.variants:
        for seed in suite.seeds:
            name = suite.run_name(variant, seed)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / ROWS_FILE
                if download_file(join(uri, RUNS_DIR, name, ROWS_FILE), local, endpoint_url=endpoint_url):
                    rows += json.loads(local.read_text())
                else:
                    missing.append(name)
    return [{k: r[k] for k in RESULT_KEYS} for r in rows], missing


def collect_suite(suite: SuiteConfig, uri: str, experiment: ExperimentConfig, *, wall_s: float | None = None) -> SuiteResult:
    """Write ``results.json``, ``report.md`` and ``plots/`` from the runs' rows."""
    endpoint = experiment.data.endpoint_url or None
    rows, missing = read_rows(suite, uri, endpoint_url=endpoint)
    header = [
        f"{len(suite.variants)} variants x {len(suite.seeds)} seeds, each run "
        f"{experiment.solver.max_iter} iterations of batch {experiment.data.batch_size * experiment.ray.num_workers}, "
        f"short side {experiment.data.min_size_train} px in training"
        + (f"; wall time {wall_s / 60:.0f} min (all starts of the suite)." if wall_s is not None else "."),
        "",
    ]
    if missing:
        header += [f"Not scored (yet): {', '.join(missing)}.", ""]
    report = SuiteReport(suite, rows)
    text = report.markdown(header=header)
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        (local / "results.json").write_text(json.dumps(rows, indent=1))
        (local / "report.md").write_text(text)
        paths = [local / "results.json", local / "report.md", *report.plots(local / "plots")]
        for path in paths:
            target = join(uri, *path.relative_to(local).parts)
            upload_file(path, target, endpoint_url=endpoint)
            files.append(target)
    return SuiteResult(uri=uri, rows=rows, report=text, files=files, finished=not missing)

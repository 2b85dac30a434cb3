"""Hyperparameter search with Ray Tune: every trial is a Ray Train run of its own.

Tune runs one driver function per trial (Ray Train V2's pattern): it applies the trial's
values to the experiment and calls :func:`~uniinst.ray.train.train_ray`, whose workers'
reports reach Tune through ``TuneReportCallback``. Trials report at each evaluation, so the
scheduler (ASHA) compares val mask AP at equal iterations. A search lives in one folder,
``<storage_path>/<name>`` (a local path or ``s3://`` / ``gs://``)::

    search.yaml              the search as run (its experiment resolved)
    data/                    the synthetic dataset's shards, when the experiment asks for it
    tune/                    Tune's experiment state (what ``--resume`` restores)
    trials/<trial_id>/       each trial's Ray Train run: checkpoints, metrics, evaluations
    results.csv, results.md  every trial: state, iteration, AP/AP50/AP75, its values
    plots/AP_vs_<key>.png    the metric against each searched key
    best_config.yaml         the experiment with the best trial's values, ready to train

A trial that fails is retried ``max_failures`` times; it resumes its Ray Train run from the
run's last checkpoint. An interrupted search (Ctrl-C, a lost head node) continues with
``resume=True``: finished trials are kept, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import PlacementGroupID
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher, SearchAlgorithm
from ray.util.placement_group import PlacementGroup, remove_placement_group

from uniinst.config import ExperimentConfig, apply_values, config_from_dict, to_dict
from uniinst.redact import redact_uri
from uniinst.data.storage import absolute, arrow_filesystem_for, join, upload_file
from uniinst.search.config import Param, SearchConfig, search_to_dict
from uniinst.search.results import (
    TrialRecord,
    best_trial,
    format_markdown,
    plot_metric,
    rank,
    trial_state,
    write_best_config,
    write_csv,
)
from uniinst.ray.prepare import connect
from uniinst.ray.train import prepare_run_data, train_ray

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# What a trial's driver process holds while its Ray Train run works: it needs no CPU, and a
# CPU it held would be one its workers or data tasks could not use.
DRIVER_MEMORY_BYTES = 256 * 1024**2


@dataclass
class SearchResult:
    uri: str
    records: list[TrialRecord]
    best: TrialRecord | None
    best_config: str | None
    files: list[str]
    finished: bool


# --------------------------------------------------------------------------- the search's pieces


def search_uri(cfg: SearchConfig) -> str:
    if not cfg.name or "/" in cfg.name:
        raise ValueError(f"the search name must be a non-empty folder name, got {cfg.name!r}")
    return join(absolute(cfg.storage_path), cfg.name)


def tune_space(space: list[Param]) -> dict[str, Any]:
    """Tune's search space: one flat key per searched config key."""
    out: dict[str, Any] = {}
    for p in space:
        if p.kind == "uniform":
            out[p.key] = tune.uniform(*p.values)
        elif p.kind == "loguniform":
            out[p.key] = tune.loguniform(*p.values)
        elif p.kind == "grid":
            out[p.key] = tune.grid_search(list(p.values))
        else:
            out[p.key] = tune.choice(list(p.values))
    return out


def search_algorithm(cfg: SearchConfig, max_concurrent: int) -> Searcher | SearchAlgorithm:
    """The algorithm that proposes trials, at most ``max_concurrent`` running at once (Tune
    ignores its own ``max_concurrent_trials`` for the random/grid generator)."""
    s = cfg.search
    if s.algorithm == "tpe":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed)), max_concurrent)
    seed = s.seed if s.algorithm == "random" else None
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def trial_scheduler(cfg: SearchConfig, trial: ExperimentConfig) -> TrialScheduler:
    sc = cfg.scheduler
    if sc.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="iteration",
        max_t=trial.solver.max_iter,
        grace_period=sc.grace_period or trial.train.eval_period,
        reduction_factor=sc.reduction_factor,
        # A trial that reaches max_t ends by itself; stopping it there would cut its summary.
        stop_last_trials=False,
    )


def trial_resources(trial: ExperimentConfig) -> dict[str, float]:
    """What one trial's Ray Train run uses: its workers, and a CPU for its data tasks."""
    r = trial.ray
    need = {"CPU": r.num_workers * r.cpus_per_worker + 1.0}
    if r.use_gpu:
        need["GPU"] = r.num_workers * r.gpus_per_worker
    return need


def concurrency(max_concurrent: int, trial: ExperimentConfig, cluster: dict[str, float] | None = None) -> int:
    """``max_concurrent`` when set, else how many trials the cluster's resources hold now (at
    least one). An autoscaling cluster that starts small should set it explicitly."""
    if max_concurrent:
        return max_concurrent
    cluster = cluster if cluster is not None else ray.cluster_resources()
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in trial_resources(trial).items() if v > 0]
    return max(1, min(fits))


# --------------------------------------------------------------------------- one trial


@dataclass
class TrialSetup:
    """What every trial's driver needs: the experiment (trial overrides applied; it names
    the object-storage endpoint) and where the trials' runs go."""

    config: dict[str, Any]
    trials_uri: str


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """A trial: the experiment with ``params`` applied, trained by Ray Train in the run
    ``<search>/trials/<trial id>`` (a retried or resumed trial continues that run)."""
    cfg = apply_values(config_from_dict(setup.config), params)
    cfg.ray.storage_path = setup.trials_uri
    cfg.ray.name = tune.get_context().get_trial_id()
    train_ray(cfg, callbacks=[TuneReportCallback()])


# --------------------------------------------------------------------------- the search


def check_state_api() -> None:
    """Warn when Ray's state API does not answer: Ray Train's placement-group cleaner needs
    it to free the resources of trials that Tune stops (early stopping, failures, the time
    budget); without it they stay reserved until this program ends."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as exc:  # any failure means the same: no cleaner
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning(
            "Ray's state API does not answer (%s): the resources of stopped trials are freed only "
            "when this search ends. Run the search on a cluster with its dashboard (ray start, "
            "ray job submit) to free them as trials stop.", reason,
        )


_SWEEPS, _QUIET_SWEEPS = 20, 3


class LeftoverPlacementGroups:
    """Removes, when a search ends, the placement groups its trials' Ray Train runs still hold.

    A trial that Tune stops (its time budget, a scheduler) kills its run's controller, and Ray
    Train (2.60) leaves the worker group's placement group to a detached cleaner actor, which
    does not always remove it: measured on a 2-CPU cluster, after a search whose time budget
    stopped its two running trials, both placement groups (and their CPUs) were still held a
    minute later, with the controllers gone. Those this job created during the search and that
    outlive it are such leftovers: nothing of the search uses them any more.
    """

    def __enter__(self) -> LeftoverPlacementGroups:
        self._job = ray.get_runtime_context().get_job_id()
        self._before = self._alive()
        return self

    def __exit__(self, *exc: object) -> None:
        # One pass at the end once left a group behind (a fresh-clone CI run: one group and
        # its 0.5 CPU still held a minute later); likely one a killed controller had asked for
        # and that was created after the pass. So sweep until a few passes in a row find nothing.
        quiet = 0
        for _ in range(_SWEEPS):
            leftovers = self._alive() - self._before
            for pg_id in leftovers:
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
                logger.info("removed the placement group %s a stopped trial left behind", pg_id)
            quiet = 0 if leftovers else quiet + 1
            if quiet == _QUIET_SWEEPS:
                return
            time.sleep(1.0)

    def _alive(self) -> set[str]:
        from ray.util.state import list_placement_groups

        try:
            groups = list_placement_groups(
                filters=[("creator_job_id", "=", self._job)], limit=10_000, raise_on_missing_output=False
            )
        except Exception:  # no state API: check_state_api has said what that costs
            return set()
        return {g.placement_group_id for g in groups if g.state != "REMOVED"}


def run_search(cfg: SearchConfig, *, resume: bool = False) -> SearchResult:
    """Run the search ``cfg`` on the Ray cluster (joined, or started locally), or with
    ``resume`` continue the one interrupted in its folder; then collect its results."""
    uri = search_uri(cfg)
    trial = cfg.trial_config()
    endpoint = trial.data.endpoint_url or None
    fs, storage = arrow_filesystem_for(uri, endpoint_url=endpoint)
    tune_path = join(uri, TUNE_DIR)
    fs_tune_path = f"{storage}/{TUNE_DIR}"
    restorable = tune.Tuner.can_restore(fs_tune_path, storage_filesystem=fs)
    if resume and not restorable:
        raise FileNotFoundError(f"no search to resume at {redact_uri(tune_path)}")
    if not resume and restorable:
        raise FileExistsError(
            f"a search already lives at {redact_uri(uri)}: resume it (--resume) or pick another name"
        )

    connect()
    check_state_api()
    trial, _ = prepare_run_data(trial, uri, endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "search.yaml"
        local.write_text(yaml.safe_dump(search_to_dict(cfg), sort_keys=False))
        upload_file(local, join(uri, "search.yaml"), endpoint_url=endpoint)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=TrialSetup(to_dict(trial), join(uri, TRIALS_DIR))),
        {"cpu": 0, "memory": DRIVER_MEMORY_BYTES},
    )
    if resume:
        logger.info("resuming the search %s", redact_uri(uri))
        tuner = tune.Tuner.restore(
            fs_tune_path, trainable, storage_filesystem=fs, resume_unfinished=True, resume_errored=True
        )
    else:
        at_once = concurrency(cfg.search.max_concurrent, trial)
        logger.info(
            "searching %s: %s, %d sample(s), %d trial(s) at once, each %d worker(s); results in %s",
            ", ".join(p.key for p in cfg.space), cfg.search.algorithm, cfg.search.num_samples, at_once,
            trial.ray.num_workers, redact_uri(uri),
        )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(cfg.space),
            tune_config=tune.TuneConfig(
                metric=cfg.metric_key,
                mode="max",
                search_alg=search_algorithm(cfg, at_once),
                scheduler=trial_scheduler(cfg, trial),
                num_samples=cfg.search.num_samples,
                time_budget_s=cfg.search.time_budget_s or None,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=storage,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            ),
        )
    with LeftoverPlacementGroups():
        tuner.fit()
    return collect_results(cfg)


def collect_results(cfg: SearchConfig) -> SearchResult:
    """Read the search's Tune state and write its table, plots and best config."""
    uri = search_uri(cfg)
    trial = cfg.trial_config()
    endpoint_url = trial.data.endpoint_url or None
    fs, storage = arrow_filesystem_for(uri, endpoint_url=endpoint_url)
    analysis = tune.ExperimentAnalysis(f"{storage}/{TUNE_DIR}", storage_filesystem=fs)
    max_iter = trial.solver.max_iter
    records = []
    for t in analysis.trials:
        last = t.last_result or {}
        iteration = int(last.get("iteration", 0))
        metrics = {k.removeprefix("val/"): float(v) for k, v in last.items() if k.startswith("val/")}
        error = ""
        if t.status == "ERROR":
            lines = str(t.get_error() or "").strip().splitlines()
            error = lines[-1] if lines else "failed"
        records.append(
            TrialRecord(
                trial_id=t.trial_id,
                params={p.key: t.config.get(p.key) for p in cfg.space},
                metrics=metrics,
                iteration=iteration,
                state=trial_state(t.status, iteration, max_iter),
                run=join(uri, TRIALS_DIR, t.trial_id),
                error=error,
                failures=int(t.num_failures),
            )
        )
    records = rank(records, cfg.metric)
    best = best_trial(records, cfg.metric)
    finished = all(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        local = [write_csv(records, cfg.space, out / "results.csv")]
        table = format_markdown(records, cfg.space)
        (out / "results.md").write_text(f"# Search {cfg.name}\n\n{table}\n")
        local.append(out / "results.md")
        local += plot_metric(records, cfg.space, out / "plots", metric=cfg.metric)
        if best is not None:
            local.append(
                write_best_config(
                    cfg.experiment_config(), best, out / "best_config.yaml", search_name=cfg.name, metric=cfg.metric
                )
            )
        for path in local:
            target = join(uri, *path.relative_to(out).parts)
            upload_file(path, target, endpoint_url=endpoint_url)
            files.append(target)
    return SearchResult(
        uri=uri,
        records=records,
        best=best,
        best_config=join(uri, "best_config.yaml") if best is not None else None,
        files=files,
        finished=finished,
    )


def format_search_summary(result: SearchResult, cfg: SearchConfig) -> str:
    lines = [format_markdown(result.records, cfg.space), ""]
    if result.best is not None:
        b = result.best
        values = ", ".join(f"{k}={v}" for k, v in b.params.items())
        lines.append(
            f"best trial {b.trial_id}: val mask {cfg.metric} {100 * b.metrics.get(cfg.metric, 0.0):.1f} "
            f"at iteration {b.iteration} ({b.state}); {values}"
        )
        lines.append(f"best config: {redact_uri(result.best_config or '')}")
    else:
        lines.append("no trial reported the metric yet")
    lines.append(f"results: {redact_uri(result.uri)} (results.md, results.csv, plots/)")
    if not result.finished:
        lines.append("the search did not finish: continue it with --resume")
    return "\n".join(lines)

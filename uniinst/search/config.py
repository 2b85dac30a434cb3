"""Typed hyperparameter-search configs (``configs/tune_*.yaml``).

A search names the experiment every trial trains, the search space over that experiment's
keys, the search algorithm and the early-stopping scheduler::

    name: tune_alpha_lambda
    experiment: uniinst_R50_3x.yaml      # relative to this file
    trial_overrides: [solver.max_iter=20000, train.eval_period=5000]
    storage_path: s3://bucket/searches
    metric: AP                           # val mask AP (or AP50, AP75)
    space:
      model.oyor.alpha: {uniform: [0.0, 1.0]}
      model.loss.cls: {loguniform: [0.25, 4.0]}
    search: {algorithm: tpe, num_samples: 32}
    scheduler: {type: asha, reduction_factor: 3}

``experiment_overrides`` change the experiment itself (where its data lives, say) for the
trials and the best configuration alike; ``trial_overrides`` shape the trials only (a
shorter schedule); the best configuration is the experiment with the best trial's values,
ready to train in full. Every
key of the space is checked against the experiment's schema and its bounds against the
experiment's own validation, so a typo fails before any trial starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from uniinst.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    apply_values,
    build_dataclass,
    load_config,
    parse_override,
    read_yaml,
)

KINDS = ("uniform", "loguniform", "grid", "choice")


@dataclass(frozen=True)
class Param:
    """One dimension of the space: ``uniform``/``loguniform`` between two bounds, or a
    ``grid`` (every value, crossed with the other grids) or ``choice`` (one drawn per trial)
    of listed values."""

    key: str
    kind: Literal["uniform", "loguniform", "grid", "choice"]
    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclass
class SearchAlgorithmConfig:
    """``tpe``: Optuna's TPE sampler; ``random``: random sampling (grid values crossed with
    it); ``grid``: every combination of the ``grid`` values, ``num_samples`` times each.
    ``max_concurrent`` 0 sets the number of trials run at once from the cluster's resources."""

    algorithm: Literal["tpe", "random", "grid"] = "tpe"
    num_samples: int = 8
    max_concurrent: int = 0
    seed: int = 0
    time_budget_s: float = 0.0


@dataclass
class SchedulerConfig:
    """``asha`` stops trials whose val AP trails the others' at the same iteration (rungs
    at ``grace_period`` x ``reduction_factor``^k iterations; 0: the trials' eval period);
    ``fifo`` runs every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 0
    reduction_factor: int = 2


@dataclass
class SearchConfig:
    name: str = "search"
    experiment: str = ""
    experiment_overrides: list[str] = field(default_factory=list)
    trial_overrides: list[str] = field(default_factory=list)
    storage_path: str = "outputs/searches"
    metric: Literal["AP", "AP50", "AP75"] = "AP"
    search: SearchAlgorithmConfig = field(default_factory=SearchAlgorithmConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_failures: int = 1
    space: list[Param] = field(default_factory=list)

    @property
    def metric_key(self) -> str:
        """The key of the metric in the trials' reports."""
        return f"val/{self.metric}"

    def experiment_config(self) -> ExperimentConfig:
        """The experiment as written, without the trial overrides (the best config's base)."""
        return load_config(self.experiment, self.experiment_overrides)

    def trial_config(self) -> ExperimentConfig:
        """The experiment every trial starts from: the trial overrides applied, and the log
        and checkpoint periods set to the eval period so that every report a trial makes
        carries the val metric the search acts on."""
        cfg = load_config(self.experiment, [*self.experiment_overrides, *self.trial_overrides])
        period = cfg.train.eval_period
        cfg.train.log_period = period
        cfg.train.checkpoint_period = period
        return cfg


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(k + ': [...]' for k in KINDS)}}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r} (valid: {', '.join(KINDS)})")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
        low, high = float(values[0]), float(values[1])
        if not low < high:
            raise ConfigError(f"{where}.{kind}: low must be below high, got {values!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
        values = [low, high]
    return Param(key, kind, tuple(values))


def parse_space(data: Any, where: str = "space") -> list[Param]:
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{where}: expected a mapping of config keys to ranges, got {data!r}")
    return [_parse_param(str(key), spec, f"{where}.{key}") for key, spec in data.items()]


def check_search(cfg: SearchConfig) -> None:
    """Checks that need the experiment: keys and bounds of the space, the eval period, the
    algorithm's support for the kinds of the space."""
    if not cfg.space:
        raise ConfigError("space: the search space is empty")
    if cfg.search.num_samples < 1:
        raise ConfigError("search.num_samples must be >= 1")
    if cfg.search.max_concurrent < 0 or cfg.search.time_budget_s < 0:
        raise ConfigError("search.max_concurrent and search.time_budget_s must be >= 0")
    if cfg.max_failures < -1:
        raise ConfigError("max_failures must be >= -1 (-1: retry forever)")
    if cfg.scheduler.reduction_factor < 2 or cfg.scheduler.grace_period < 0:
        raise ConfigError("scheduler.reduction_factor must be >= 2 and scheduler.grace_period >= 0")
    kinds = {p.kind for p in cfg.space}
    if cfg.search.algorithm == "tpe" and "grid" in kinds:
        grid = next(p.key for p in cfg.space if p.kind == "grid")
        raise ConfigError(
            f"space.{grid}: TPE samples, it cannot sweep a grid; use search.algorithm: grid "
            "(or random), or a choice/uniform range"
        )
    if cfg.search.algorithm == "grid" and kinds != {"grid"}:
        other = next(p.key for p in cfg.space if p.kind != "grid")
        raise ConfigError(f"space.{other}: search.algorithm grid needs grid values for every key")
    trial = cfg.trial_config()
    if trial.train.eval_period <= 0:
        raise ConfigError(
            "the trials need train.eval_period > 0 (set it in the experiment or in trial_overrides): "
            "they report val mask AP at every evaluation"
        )
    d = trial.data
    if not (d.synthetic or d.val.json or d.val.shards):
        raise ConfigError("the experiment has no validation set (data.val): the search needs val mask AP")
    for p in cfg.space:
        for value in p.values:  # the bounds, or every listed value
            try:
                apply_values(trial, {p.key: value})
            except ConfigError as exc:
                raise ConfigError(f"space.{p.key}: {exc}") from None
    if trial.solver.max_iter < trial.train.eval_period:
        raise ConfigError("the trials' solver.max_iter is below their train.eval_period: no evaluation would run")


def load_search_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    experiment_overrides: Sequence[str] = (),
    storage_path: str | None = None,
    name: str | None = None,
) -> SearchConfig:
    """Read a search YAML (with its ``base`` chain), apply dotted overrides of the search
    (``search.num_samples=4``), add ``experiment_overrides`` to the file's (dotted overrides
    of the experiment: ``data.train.shards=s3://...``), set ``storage_path`` and ``name``
    when given, and check it against its experiment."""
    path = Path(path)
    data = read_yaml(path)
    overrides = [*overrides, *(f"{k}={v}" for k, v in (("storage_path", storage_path), ("name", name)) if v)]
    space = data.pop("space", None)
    experiment = data.get("experiment")
    try:
        for text in overrides:
            if parse_override(text)[0][0] == "space":
                raise ConfigError(f"override {text!r}: change the space in the YAML file")
        cfg = apply_overrides(build_dataclass(SearchConfig, data), overrides)
        cfg.space = parse_space(space)
        cfg.experiment_overrides = [*cfg.experiment_overrides, *experiment_overrides]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not cfg.experiment:
        raise ConfigError(f"{path}: 'experiment' must name the experiment config the trials train")
    if experiment == cfg.experiment:
        cfg.experiment = str((path.parent / cfg.experiment).resolve())
    elif not Path(cfg.experiment).is_absolute():
        cfg.experiment = str(Path(cfg.experiment).resolve())
    try:
        check_search(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def search_to_dict(cfg: SearchConfig) -> dict[str, Any]:
    """The search as YAML-ready data (the form :func:`load_search_config` reads)."""
    out = dataclasses.asdict(cfg)
    out["space"] = {p.key: {p.kind: list(p.values)} for p in cfg.space}
    return out

"""Typed reproduction suites (``configs/reproduce/*.yaml``).

A suite names the experiment every run trains, the **variants** (each a list of dotted
overrides of that experiment), the **seeds** every variant is trained with, the
**evaluation splits** and the **NMS modes** every trained run is scored with::

    name: synth
    experiment: ../synth_R18_uniinst.yaml      # relative to this file
    experiment_overrides: [solver.max_iter=900]
    storage_path: outputs/reproduce
    seeds: [0, 1]
    nms: [none, mask]
    reference: uniinst                         # the paper's UniInst
    baseline: condinst                         # the many-to-one baseline ("": none, no Tables 1, 7)
    main_split: val                            # Tables 1 and 4-6
    occlusion_split: heavy                     # Table 7
    splits:
      val: {synthetic: {images: 100, seed: 1000}}
      heavy: {synthetic: {images: 100, seed: 1001, occlusion: heavy}}
      coco_val: {shards: s3://bucket/coco/val}
    variants:
      uniinst: []
      condinst: [model.arch=condinst]
      alpha_0: [model.oyor.alpha=0.0]

Every variant is resolved against the experiment when the suite loads, so an unknown key or
a value out of range fails before any run starts, naming the variant.
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
    build_dataclass,
    load_config,
    read_yaml,
)

NMS_MODES = ("none", "mask", "matrix")


@dataclass
class SyntheticSplit:
    """A split the suite generates (``uniinst synth``): ``image_size`` 0 takes the
    experiment's ``data.synthetic_image_size``; the seed must differ from the training set's."""

    images: int = 100
    seed: int = 1000
    occlusion: Literal["normal", "heavy"] = "normal"
    image_size: int = 0


@dataclass
class SplitConfig:
    """An evaluation split: generated (``synthetic``) or a shard dataset (``shards``, with the
    ``image_ids`` / ``category_ids`` subset of :class:`~uniinst.config.DatasetConfig`)."""

    synthetic: SyntheticSplit | None = None
    shards: str = ""
    image_ids: str = ""
    category_ids: list[int] = field(default_factory=list)


@dataclass
class SuiteConfig:
    name: str = "suite"
    experiment: str = ""
    experiment_overrides: list[str] = field(default_factory=list)
    storage_path: str = "outputs/reproduce"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    nms: list[str] = field(default_factory=lambda: ["none", "mask"])
    reference: str = "uniinst"
    baseline: str = "condinst"
    main_split: str = "val"
    occlusion_split: str = ""
    max_concurrent: int = 0
    max_failures: int = 1
    splits: dict[str, SplitConfig] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)

    def experiment_config(self) -> ExperimentConfig:
        """The experiment every variant starts from."""
        return load_config(self.experiment, self.experiment_overrides)

    def variant_config(self, variant: str, seed: int | None = None) -> ExperimentConfig:
        """The experiment with ``variant``'s overrides (and ``train.seed``) applied."""
        if variant not in self.variants:
            raise ConfigError(f"unknown variant {variant!r} (the suite has: {', '.join(self.variants)})")
        seed_override = [f"train.seed={seed}"] if seed is not None else []
        try:
            return load_config(self.experiment, [*self.experiment_overrides, *self.variants[variant], *seed_override])
        except ConfigError as exc:
            raise ConfigError(f"variants.{variant}: {exc}") from None

    def run_name(self, variant: str, seed: int) -> str:
        return f"{variant}-seed{seed}"


def _split(name: str, data: Any) -> SplitConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"splits.{name}: expected a mapping with synthetic or shards, got {data!r}")
    values = dict(data)
    synthetic = values.pop("synthetic", None)
    split = build_dataclass(SplitConfig, values, f"splits.{name}")
    if synthetic is not None:
        split.synthetic = build_dataclass(SyntheticSplit, synthetic or {}, f"splits.{name}.synthetic")
    if (split.synthetic is None) == (not split.shards):
        raise ConfigError(f"splits.{name}: give exactly one of synthetic or shards")
    if split.synthetic is not None and (split.synthetic.images < 1 or split.synthetic.image_size < 0):
        raise ConfigError(f"splits.{name}.synthetic: images must be >= 1 and image_size >= 0")
    return split


def comma_names(text: str) -> list[str]:
    """``"uniinst,condinst"`` as ``["uniinst", "condinst"]`` (the ``--variants`` and ``--shapes`` options)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _only(variants: dict[str, list[str]], names: Sequence[str]) -> dict[str, list[str]]:
    """The variants named in ``names`` (all when empty), in the suite's order."""
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise ConfigError(f"unknown variant(s) {', '.join(map(repr, unknown))} (the suite has: {', '.join(variants)})")
    return {k: v for k, v in variants.items() if not names or k in names}


def _variants(data: Any) -> dict[str, list[str]]:
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"variants: expected a mapping of names to lists of overrides, got {data!r}")
    out = {}
    for name, overrides in data.items():
        overrides = [] if overrides is None else overrides
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"variants.{name}: expected a list of key=value overrides, got {overrides!r}")
        out[str(name)] = list(overrides)
    return out


def check_suite(cfg: SuiteConfig) -> None:
    """Checks that need the experiment: every variant resolves, the named splits and
    variants exist, the reference and baseline are the two architectures."""
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name must be a non-empty folder name, got {cfg.name!r}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds: expected distinct integers, got {cfg.seeds!r}")
    bad = [m for m in cfg.nms if m not in NMS_MODES]
    if not cfg.nms or bad:
        raise ConfigError(f"nms: expected modes among {', '.join(NMS_MODES)}, got {cfg.nms!r}")
    if not cfg.splits:
        raise ConfigError("splits: the suite evaluates on no split")
    for key in ("main_split", "occlusion_split"):
        split = getattr(cfg, key)
        if (split or key == "main_split") and split not in cfg.splits:
            raise ConfigError(f"{key}: unknown split {split!r} (the suite has: {', '.join(cfg.splits)})")
    if cfg.max_concurrent < 0 or cfg.max_failures < -1:
        raise ConfigError("max_concurrent must be >= 0 and max_failures >= -1")
    archs = {name: cfg.variant_config(name).model.arch for name in cfg.variants}
    for key, arch in (("reference", "uniinst"), ("baseline", "condinst")):
        name = getattr(cfg, key)
        if key == "baseline" and not name:
            continue
        if name not in archs:
            raise ConfigError(f"{key}: unknown variant {name!r} (the suite has: {', '.join(archs)})")
        if archs[name] != arch:
            raise ConfigError(f"{key}: variant {name!r} trains model.arch={archs[name]}, expected {arch}")
    train_seed = cfg.experiment_config().train.seed
    for name, split in cfg.splits.items():
        if split.synthetic is not None and split.synthetic.seed in {train_seed, *cfg.seeds}:
            raise ConfigError(
                f"splits.{name}.synthetic.seed={split.synthetic.seed}: the training set is generated with "
                f"train.seed={train_seed} and the runs' seeds are {cfg.seeds}; give the split a seed of its own"
            )


def load_suite(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    experiment_overrides: Sequence[str] = (),
    storage_path: str | None = None,
    name: str | None = None,
    variants: Sequence[str] = (),
) -> SuiteConfig:
    """Read a suite YAML (with its ``base`` chain), apply dotted overrides of its scalar keys
    (``seeds=[0]``), add ``experiment_overrides`` to the file's (``data.train.shards=...``),
    set ``storage_path`` and ``name`` when given, keep only the named ``variants`` when given
    (part of a suite, such as Table 5's four, on a smaller budget or with more seeds; it keeps the
    reference, has no baseline unless it names it, and the tables it lacks a variant for say
    so), and check it."""
    path = Path(path)
    data = read_yaml(path)
    splits, variants_in_file = data.pop("splits", None), data.pop("variants", None)
    experiment = data.get("experiment")
    overrides = [*overrides, *(f"{k}={v}" for k, v in (("storage_path", storage_path), ("name", name)) if v)]
    try:
        cfg = apply_overrides(build_dataclass(SuiteConfig, data), overrides)
        if not isinstance(splits, Mapping):
            raise ConfigError(f"splits: expected a mapping of split names, got {splits!r}")
        cfg.splits = {str(k): _split(str(k), v) for k, v in splits.items()}
        cfg.variants = _variants(variants_in_file)
        cfg.experiment_overrides = [*cfg.experiment_overrides, *experiment_overrides]
        if not cfg.experiment:
            raise ConfigError("'experiment' must name the experiment config the runs train")
        if experiment == cfg.experiment:
            cfg.experiment = str((path.parent / cfg.experiment).resolve())
        check_suite(cfg)
        cfg.variants = _only(cfg.variants, variants)
        if cfg.reference not in cfg.variants:
            raise ConfigError(
                f"a part of the suite must keep its reference variant {cfg.reference!r}: every table compares with it"
            )
        if cfg.baseline not in cfg.variants:
            cfg.baseline = ""  # a part without it: the suite it writes down loads again as it ran
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def suite_to_dict(cfg: SuiteConfig) -> dict[str, Any]:
    """The suite as YAML-ready data (the form :func:`load_suite` reads)."""
    out = dataclasses.asdict(cfg)
    out["splits"] = {
        name: {k: v for k, v in split.items() if v not in (None, "", [])} for name, split in out["splits"].items()
    }
    return out

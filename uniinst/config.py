"""Typed experiment configs.

A config is a tree of dataclasses. YAML files and dotted command-line overrides
(``model.oyor.alpha=0.8``) are merged onto the defaults; an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the dotted key and, where known, the file.
A YAML file may name a ``base`` file (relative to itself) that it extends.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from uniinst.data.synthetic import SHAPES, check_shapes
from uniinst.redact import has_credentials


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50
    pretrained: bool = False
    norm: Literal["FrozenBN", "BN", "SyncBN", "GN"] = "FrozenBN"
    freeze_at: int = 2
    width: int = 64  # the stem's and res2's channels; narrower only from scratch
    # pytorch: torchvision's ResNet (stride in the 3x3 conv, RGB input); caffe: detectron2's
    # MSRA ResNet of the authors' models (stride in the first 1x1 conv, BGR input, mean only).
    style: Literal["pytorch", "caffe"] = "pytorch"


@dataclass
class HeadConfig:
    num_convs: int = 4
    prior_prob: float = 0.01
    num_groups: int = 32


@dataclass
class MaskBranchConfig:
    channels: int = 128
    num_convs: int = 4
    out_channels: int = 8
    norm: Literal["BN", "SyncBN", "GN"] = "BN"


@dataclass
class MaskHeadConfig:
    channels: int = 8
    num_layers: int = 3
    rel_coord_norm: Literal["stride", "soi"] = "stride"
    sizes_of_interest: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024])
    mask_out_stride: int = 4
    max_instances: int = 500


@dataclass
class MaxFilterConfig:
    enabled: bool = True
    kernel: int = 3
    tau: int = 2


@dataclass
class OYORConfig:
    alpha: float = 0.9
    radius: float = 1.5
    dice: Literal["binary", "soft"] = "binary"
    max_candidates: int = 4096


@dataclass
class AuxConfig:
    enabled: bool = True
    topk: int = 9
    # The positives' threshold: the authors' mean over the k·L top-k slots, empty ones counting
    # −1 (default), or the mean of the valid candidates only (the paper's "above average").
    threshold: Literal["authors", "valid_mean"] = "authors"


@dataclass
class FCOSConfig:
    sizes_of_interest: list[float] = field(default_factory=lambda: [64.0, 128.0, 256.0, 512.0])
    radius: float = 1.5


@dataclass
class LossConfig:
    cls: float = 1.0
    mask: float = 1.0
    rank: float = 1.0
    aux: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class InferenceConfig:
    topk_per_level: int = 100
    score_thresh: float = 0.025
    max_detections: int = 100
    mask_thresh: float = 0.5
    nms: Literal["none", "mask", "matrix"] = "none"
    nms_iou: float = 0.5


@dataclass
class ModelConfig:
    arch: Literal["uniinst", "condinst"] = "uniinst"
    num_classes: int = 80
    # A checkpoint (path or URI; ours or from uniinst convert-weights) a new run starts from:
    # its weights, not its optimiser or iteration; another class count starts the classifier afresh.
    weights: str = ""
    fpn_channels: int = 256
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    mask_branch: MaskBranchConfig = field(default_factory=MaskBranchConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    max_filter: MaxFilterConfig = field(default_factory=MaxFilterConfig)
    rerank: bool = True
    oyor: OYORConfig = field(default_factory=OYORConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # In the backbone style's channel order, 0-255; empty: the style's own (INPUT_FORMATS).
    pixel_mean: list[float] = field(default_factory=list)
    pixel_std: list[float] = field(default_factory=list)


@dataclass
class DatasetConfig:
    """A dataset: a COCO-format JSON with its image folder, or a Parquet shard dataset at a
    URI (local folder, ``s3://``, ``gs://``). ``image_ids`` names a text file of image ids
    (one per line) selecting a subset, as in the OCHuman protocol; ``category_ids`` restricts
    evaluation to those original category ids (for example ``[1]``, person)."""

    json: str = ""
    images: str = ""
    shards: str = ""
    image_ids: str = ""
    category_ids: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    min_size_train: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    flip_prob: float = 0.5
    batch_size: int = 2
    num_workers: int = 2
    on_error: Literal["raise", "skip"] = "raise"
    endpoint_url: str = ""
    shuffle_buffer: int = 64
    # How Ray Train workers share a shard dataset (docs/data.md, "Several workers"): "shards",
    # each reads only what it trains on; "images", every worker reads every shard and N
    # workers x batch b equal one process x N b exactly.
    split: Literal["shards", "images"] = "shards"
    synthetic: bool = False
    synthetic_train_images: int = 64
    synthetic_val_images: int = 16
    synthetic_image_size: int = 256
    # The built-in data's class shapes in category order; model.num_classes takes the first.
    synthetic_shapes: list[str] = field(default_factory=lambda: list(SHAPES))


@dataclass
class SolverConfig:
    base_lr: float = 0.01
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 270000
    steps: list[int] = field(default_factory=lambda: [210000, 250000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0
    amp: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    device: str = "auto"
    checkpoint_period: int = 5000
    eval_period: int = 0
    log_period: int = 20
    keep_checkpoints: int = 3


@dataclass
class RayConfig:
    """Training on a Ray cluster (``uniinst train --workers N``, ``ray_jobs/train.py``).

    The run lives at ``storage_path/name`` (a local folder or ``s3://``/``gs://``): its
    checkpoints, metrics, TensorBoard files and evaluation reports; rerunning the same
    ``(storage_path, name)`` resumes it. Empty ``storage_path`` and ``name`` mean the folder
    ``train.output_dir``. ``min_workers > 0`` makes the worker group elastic between
    ``min_workers`` and ``num_workers`` (spot capacity)."""

    num_workers: int = 1
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    accelerator_type: str = ""
    storage_path: str = ""
    name: str = ""
    max_failures: int = 3
    # Reading and decoding shards: a custom resource each Ray Data task takes one unit of
    # (only the nodes offering it do that work; "": any node), and the object store each
    # worker's stream may fill before Ray Data holds its tasks back (0: half the cluster's
    # object store shared among the workers).
    data_resource: str = ""
    data_object_store_mib: int = 0


@dataclass
class ExperimentConfig:
    name: str = "uniinst"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, Sequence):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build_dataclass(cls: type, values: Mapping[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Fill the dataclass ``cls`` (or update ``base``) from ``values``, checking every key and
    type; errors name the dotted key under ``prefix``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!s} (valid keys: {', '.join(sorted(names))})")
    obj = base if base is not None else cls()
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
            setattr(obj, name, build_dataclass(tp, value, key, getattr(obj, name)))
        else:
            setattr(obj, name, _coerce(value, tp, key))
    return obj


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base`` chain merged in (the base first)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' reference")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string")
    return _merge(read_yaml(path.parent / base, seen + (path,)), data)


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file (with its ``base`` chain), then dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml(Path(path))
        source = str(path)
    try:
        cfg = build_dataclass(ExperimentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """The config dataclass ``cfg`` updated in place by dotted ``key=value`` overrides, each
    checked like the file; errors name the override."""
    for text in overrides:
        keys, value = parse_override(text)
        try:
            cfg = build_dataclass(type(cfg), _nest(keys, value), base=cfg)
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return cfg


def apply_values(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted keys set to values (``{"model.oyor.alpha": 0.8}``),
    checked and validated like overrides."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        try:
            out = build_dataclass(ExperimentConfig, _nest(key.split("."), value), base=out)
        except ConfigError as exc:
            raise ConfigError(f"{key}={value!r}: {exc}") from None
    validate(out)
    return out


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "") -> ExperimentConfig:
    """Build a config from a plain mapping (for example one stored in a checkpoint, named
    ``source`` in errors), then apply dotted ``overrides`` and validate."""
    try:
        cfg = build_dataclass(ExperimentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def _positive(x: float) -> bool:
    return x > 0


def _non_negative(x: float) -> bool:
    return x >= 0


def _fraction(x: float) -> bool:
    return 0.0 <= x <= 1.0


def _open_fraction(x: float) -> bool:
    return 0.0 < x < 1.0


def _increasing_positive(xs: Sequence[float]) -> bool:
    return all(x > 0 for x in xs) and all(b > a for a, b in zip(xs, xs[1:]))


# Range checks of single values: (dotted key, test, what the key must be).
_RANGES: list[tuple[str, Any, str]] = [
    ("model.num_classes", _positive, "> 0"),
    ("model.fpn_channels", _positive, "> 0"),
    ("model.backbone.width", _positive, "> 0"),
    ("model.head.num_convs", _non_negative, ">= 0"),
    ("model.head.prior_prob", _open_fraction, "in (0, 1)"),
    ("model.head.num_groups", _positive, "> 0"),
    ("model.mask_branch.channels", _positive, "> 0"),
    ("model.mask_branch.num_convs", _non_negative, ">= 0"),
    ("model.mask_branch.out_channels", _positive, "> 0"),
    ("model.mask_head.channels", _positive, "> 0"),
    ("model.mask_head.num_layers", _positive, "> 0"),
    ("model.mask_head.sizes_of_interest", _increasing_positive, "positive and increasing"),
    ("model.mask_head.mask_out_stride", _positive, "> 0"),
    ("model.mask_head.max_instances", _positive, "> 0"),
    ("model.max_filter.kernel", lambda k: k > 0 and k % 2 == 1, "a positive odd number"),
    ("model.max_filter.tau", _non_negative, ">= 0"),
    ("model.oyor.alpha", _fraction, "in [0, 1]"),
    ("model.oyor.radius", _positive, "> 0"),
    ("model.oyor.max_candidates", _positive, "> 0"),
    ("model.aux.topk", _positive, "> 0"),
    ("model.fcos.sizes_of_interest", _increasing_positive, "positive and increasing"),
    ("model.fcos.radius", _positive, "> 0"),
    ("model.loss.cls", _non_negative, ">= 0"),
    ("model.loss.mask", _non_negative, ">= 0"),
    ("model.loss.rank", _non_negative, ">= 0"),
    ("model.loss.aux", _non_negative, ">= 0"),
    ("model.loss.focal_alpha", _fraction, "in [0, 1]"),
    ("model.loss.focal_gamma", _non_negative, ">= 0"),
    ("model.inference.topk_per_level", _positive, "> 0"),
    ("model.inference.score_thresh", _fraction, "in [0, 1]"),
    ("model.inference.max_detections", _positive, "> 0"),
    ("model.inference.mask_thresh", _open_fraction, "in (0, 1)"),
    ("model.inference.nms_iou", lambda x: 0.0 < x <= 1.0, "in (0, 1]"),
    ("model.pixel_std", lambda xs: all(x > 0 for x in xs), "positive"),
    ("data.min_size_train", lambda xs: all(x > 0 for x in xs), "positive"),
    ("data.max_size_train", _positive, "> 0"),
    ("data.min_size_test", _positive, "> 0"),
    ("data.max_size_test", _positive, "> 0"),
    ("data.flip_prob", _fraction, "in [0, 1]"),
    ("data.batch_size", _positive, ">= 1"),
    ("data.num_workers", _non_negative, ">= 0"),
    ("data.shuffle_buffer", _non_negative, ">= 0"),
    ("data.synthetic_train_images", _non_negative, ">= 0"),
    ("data.synthetic_val_images", _non_negative, ">= 0"),
    ("data.synthetic_image_size", lambda x: x >= 32, ">= 32"),
    ("solver.base_lr", _positive, "> 0"),
    ("solver.reference_batch_size", _positive, ">= 1"),
    ("solver.momentum", lambda x: 0.0 <= x < 1.0, "in [0, 1)"),
    ("solver.weight_decay", _non_negative, ">= 0"),
    ("solver.max_iter", _positive, ">= 1"),
    ("solver.steps", lambda xs: all(x > 0 for x in xs) and all(b > a for a, b in zip(xs, xs[1:])), "positive and increasing"),
    ("solver.gamma", _positive, "> 0"),
    ("solver.warmup_iters", _non_negative, ">= 0"),
    ("solver.warmup_factor", lambda x: 0.0 < x <= 1.0, "in (0, 1]"),
    ("solver.clip_grad_norm", _non_negative, ">= 0 (0: no clipping)"),
    ("train.checkpoint_period", _non_negative, ">= 0 (0: only at the end)"),
    ("train.eval_period", _non_negative, ">= 0 (0: only at the end)"),
    ("train.log_period", _positive, ">= 1"),
    ("train.keep_checkpoints", _non_negative, ">= 0 (0: keep all)"),
    ("ray.num_workers", _positive, ">= 1"),
    ("ray.data_object_store_mib", _non_negative, ">= 0 (0: half the cluster's object store over the workers)"),
    ("ray.cpus_per_worker", _positive, "> 0"),
    ("ray.gpus_per_worker", _positive, "> 0"),
    ("ray.max_failures", lambda x: x >= -1, ">= -1 (-1: retry forever)"),
]


def _value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Checks that the types alone cannot express: the range of each value, then the
    relations between values. Errors name the key and the value."""
    for key, ok, what in _RANGES:
        value = _value(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
    m = cfg.model
    checks = [
        (m.fpn_channels % m.head.num_groups == 0, "model.fpn_channels must be divisible by model.head.num_groups"),
        (len(m.mask_head.sizes_of_interest) == 5, "model.mask_head.sizes_of_interest needs 5 values (P3-P7)"),
        (len(m.fcos.sizes_of_interest) == 4, "model.fcos.sizes_of_interest needs 4 boundaries"),
        (
            len(m.pixel_mean) in (0, 3) and len(m.pixel_std) in (0, 3),
            "model.pixel_mean/pixel_std need 3 values (or none: the backbone style's)",
        ),
        (
            m.backbone.style != "caffe" or m.backbone.depth in (50, 101),
            "model.backbone.style=caffe needs a bottleneck ResNet (model.backbone.depth 50 or 101)",
        ),
        (
            m.backbone.style != "caffe" or not m.backbone.pretrained,
            "model.backbone.pretrained loads torchvision's weights, which are style pytorch, not caffe",
        ),
        (0 <= m.backbone.freeze_at <= 2, "model.backbone.freeze_at must be 0, 1 or 2"),
        (
            m.backbone.norm != "GN" or m.backbone.width % 32 == 0,
            "model.backbone.width must be a multiple of 32 with GN (32 groups)",
        ),
        (
            not m.backbone.pretrained or m.backbone.width == 64,
            "model.backbone.width must be 64 with ImageNet weights (model.backbone.pretrained)",
        ),
        (len(cfg.data.min_size_train) >= 1, "data.min_size_train needs at least one size"),
        (
            0 <= cfg.ray.min_workers <= cfg.ray.num_workers,
            f"ray.min_workers must lie in [0, ray.num_workers={cfg.ray.num_workers}], got {cfg.ray.min_workers}",
        ),
        (
            not has_credentials(cfg.data.endpoint_url),
            "data.endpoint_url must not carry credentials (user:password@): they come from the environment",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        check_shapes(cfg.data.synthetic_shapes, m.num_classes if cfg.data.synthetic else 1)
    except ValueError as exc:
        raise ConfigError(f"data.synthetic_shapes: {exc}") from None

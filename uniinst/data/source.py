"""A dataset split behind one interface, whatever its storage: what training (batches for a
rank, resumable) and evaluation (predict a share of the images, score them) need of it.

The storage is chosen once, when a split is opened by a :data:`SplitOpener`: the core's
:func:`open_json_split` reads COCO JSON; the Ray layer's ``uniinst.ray.shard_split.open_split``
reads shard datasets too (they are streamed with Ray Data). Callers (the one-process trainer,
every Ray Train worker) receive an opener and never ask which kind they got.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from torch import nn

from uniinst.config import DatasetConfig, ExperimentConfig
from uniinst.data.coco import CocoDataset
from uniinst.data.dataset import InstanceSegDataset, TrainLoader, build_train_loader
from uniinst.data.transforms import EvalTransform, TrainTransform
from uniinst.structures import Batch


class TrainBatches(Protocol):
    """A rank's endless training batches, and the position a checkpoint stores."""

    def __next__(self) -> Batch: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_after(self, batches: int) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Split(Protocol):
    """A training or evaluation dataset.

    ``categories`` are ``[{"id", "name"}]`` with the original ids; ``class_names`` and
    ``contiguous_to_cat_id`` follow the contiguous labels; ``image_ids`` are the images an
    evaluation scores.
    """

    location: str
    categories: list[dict]
    class_names: list[str]
    contiguous_to_cat_id: list[int]
    num_images: int
    image_ids: list[int]

    def plan(self) -> Any:
        """What every rank's training stream needs to know of the whole split, read once by
        a distributed run's driver and handed to :meth:`train_batches` (None: nothing)."""

    def train_batches(
        self, cfg: ExperimentConfig, *, rank: int, world_size: int, resume: dict[str, Any] | None,
        start_iter: int = 0, plan: Any = None,
    ) -> TrainBatches:
        """Rank ``rank``'s batches, continuing from a checkpoint's stream position ``resume``
        (and ``start_iter`` more batches of this rank)."""

    def predict(self, model: nn.Module, *, transform: EvalTransform, image_ids: Sequence[int]) -> list[dict]:
        """COCO results of ``model`` on those images, in this process."""

    def score(self, results: list[dict]) -> dict[str, float]:
        """COCO mask AP of ``results`` on every image of :attr:`image_ids`."""

    def details(self) -> dict[str, Any]:
        """What an evaluation report says of the split."""


SplitOpener = Callable[[DatasetConfig, ExperimentConfig, str, "Sequence[str] | None"], Split]


def train_transform(cfg: ExperimentConfig) -> TrainTransform:
    """The training augmentation of a config: multi-scale shortest edge and flip."""
    d = cfg.data
    return TrainTransform(short_edge=tuple(d.min_size_train), max_size=d.max_size_train, flip_prob=d.flip_prob)


class CocoSplit:
    """A COCO-format JSON with its image folder.

    Training reads it through a DataLoader over one global stream of the images
    (:class:`~uniinst.data.dataset.TrainingSampler`); an evaluation predicts in this process.
    ``class_names``: the model's labels, matched to the categories by name when predicting.
    """

    def __init__(self, split: DatasetConfig, cfg: ExperimentConfig, class_names: Sequence[str] | None = None) -> None:
        self.dataset = CocoDataset(split.json, split.images, on_error=cfg.data.on_error)
        self.location = split.json
        self.class_names = list(self.dataset.class_names)
        self.categories = list(self.dataset.categories)
        self.contiguous_to_cat_id = list(self.dataset.contiguous_to_cat_id)
        self.num_images = len(self.dataset)
        self.image_ids = list(self.dataset.image_ids)
        self.model_class_names = None if class_names is None else list(class_names)

    def plan(self) -> None:
        return None

    def train_batches(
        self, cfg: ExperimentConfig, *, rank: int, world_size: int, resume: dict[str, Any] | None,
        start_iter: int = 0, plan: Any = None,
    ) -> TrainLoader:
        state = resume or {}
        if state.get("split", "images") != "images":
            raise ValueError("the checkpoint's data position is in a shard stream: resume it on data.train.shards")
        d = cfg.data
        return build_train_loader(
            InstanceSegDataset(self.dataset, train_transform(cfg), seed=cfg.train.seed, skip_empty=True),
            batch_size=d.batch_size, seed=cfg.train.seed, num_workers=d.num_workers, rank=rank,
            world_size=world_size, start_iter=start_iter, start_position=int(state.get("images", 0)),
        )

    def predict(self, model: nn.Module, *, transform: EvalTransform, image_ids: Sequence[int]) -> list[dict]:
        from uniinst.evaluation.inference import predict_dataset

        index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        return predict_dataset(
            model, self.dataset, transform=transform, indices=[index[i] for i in image_ids],
            class_names=self.model_class_names,
        )

    def score(self, results: list[dict]) -> dict[str, float]:
        from uniinst.evaluation.coco_eval import evaluate_segm

        return evaluate_segm(self.dataset.gt_json_path, results, image_ids=self.image_ids)

    def details(self) -> dict[str, Any]:
        return {"json": self.location, "images": len(self.image_ids)}


def open_json_split(
    split: DatasetConfig, cfg: ExperimentConfig, name: str, class_names: Sequence[str] | None = None
) -> CocoSplit:
    """``data.<name>`` as a :class:`CocoSplit`; a shard dataset needs the Ray layer's opener."""
    if split.shards:
        raise ValueError(
            f"data.{name}.shards: shard datasets are read by the Ray layer; pass "
            "open_split=uniinst.ray.shard_split.open_split (the 'ray' extra: pip install 'uniinst[ray]')"
        )
    return CocoSplit(split, cfg, class_names)


def open_splits(cfg: ExperimentConfig, opener: SplitOpener) -> tuple[Split, Split | None]:
    """The training split and the val split (None without one) of ``cfg``, checked: one of
    ``json`` and ``shards`` per split, as many categories as ``model.num_classes``."""
    d = cfg.data
    if not d.train.json and not d.train.shards:
        raise ValueError(
            "data.train.json and data.train.shards are empty: name a COCO-format JSON (and data.train.images), "
            "a shard dataset, or set data.synthetic=true"
        )
    for name, split in (("train", d.train), ("val", d.val)):
        if split.json and split.shards:
            raise ValueError(f"data.{name}: set json or shards, not both")
    train = opener(d.train, cfg, "train", None)
    if len(train.categories) != cfg.model.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but {d.train.shards or d.train.json} has "
            f"{len(train.categories)} categories"
        )
    val = opener(d.val, cfg, "val", train.class_names) if d.val.json or d.val.shards else None
    return train, val

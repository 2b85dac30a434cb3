"""Shard datasets as :class:`~uniinst.data.source.Split`: trained on through a
:class:`~uniinst.ray.train_stream.TrainStream`, evaluated through a
:class:`~uniinst.ray.evaluate.ShardEvalSet`; and the opener that chooses between them and
COCO JSON once, for every caller."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn

from uniinst.config import DatasetConfig, ExperimentConfig
from uniinst.data.shards import read_manifest
from uniinst.data.source import CocoSplit, Split
from uniinst.data.transforms import EvalTransform
from uniinst.ray.evaluate import ShardEvalSet
from uniinst.ray.prepare import connect
from uniinst.ray.train_stream import TrainStream, kept_images, train_stream
from uniinst.redact import redact_uri


class ShardSplit:
    """The shard dataset ``split.shards`` (with its ``image_ids`` and ``category_ids`` for an
    evaluation); ``class_names``: the model's labels, matched to the categories by name."""

    def __init__(self, split: DatasetConfig, cfg: ExperimentConfig, class_names: Sequence[str] | None = None) -> None:
        self.split, self.cfg, self.model_class_names = split, cfg, class_names
        self.uri, self.endpoint_url = split.shards, cfg.data.endpoint_url or None
        self.manifest = read_manifest(self.uri, endpoint_url=self.endpoint_url)
        self.location = redact_uri(self.uri)
        self.categories = list(self.manifest.categories)
        self.class_names = list(self.manifest.class_names)
        self.contiguous_to_cat_id = list(self.manifest.contiguous_to_cat_id)
        self.num_images = self.manifest.num_images

    @functools.cached_property
    def _eval_set(self) -> ShardEvalSet:
        # The ground truth is rebuilt from the shards only when the split is evaluated.
        return ShardEvalSet(
            self.split, num_classes=self.cfg.model.num_classes, class_names=self.model_class_names,
            endpoint_url=self.endpoint_url,
        )

    @property
    def image_ids(self) -> list[int]:
        return self._eval_set.image_ids

    def plan(self) -> list[list[int]]:
        return kept_images(self.uri, self.manifest, self.endpoint_url)

    def train_batches(
        self, cfg: ExperimentConfig, *, rank: int, world_size: int, resume: dict[str, Any] | None,
        start_iter: int = 0, plan: Any = None,
    ) -> TrainStream:
        # Streaming is a Ray Data job: join the cluster (or start a Ray) if not done yet.
        connect()
        return train_stream(
            cfg, rank=rank, world_size=world_size, resume=resume, start_iter=start_iter, manifest=self.manifest,
            kept=plan,
        )

    def predict(self, model: nn.Module, *, transform: EvalTransform, image_ids: Sequence[int]) -> list[dict]:
        connect()
        return self._eval_set.predict(model, transform=transform, image_ids=image_ids)

    def score(self, results: list[dict]) -> dict[str, float]:
        return self._eval_set.score(results)

    def details(self) -> dict[str, Any]:
        return self._eval_set.details()


def open_split(
    split: DatasetConfig, cfg: ExperimentConfig, name: str, class_names: Sequence[str] | None = None
) -> Split:
    """``data.<name>`` as a split: a shard dataset, or a COCO JSON."""
    if split.shards:
        return ShardSplit(split, cfg, class_names)
    return CocoSplit(split, cfg, class_names)

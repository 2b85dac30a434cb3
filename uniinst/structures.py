"""Plain containers passed between the data pipeline, the model and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Sample:
    """One image after its transforms, before batching.

    ``image`` is uint8 RGB ``[3, H, W]`` at the resized size; ``masks`` uint8 ``[G, H, W]``
    at the same size, one per non-crowd instance; ``labels`` int64 ``[G]`` contiguous ids.
    """

    image: Tensor
    masks: Tensor
    labels: Tensor
    image_id: int
    orig_size: tuple[int, int]


@dataclass
class Targets:
    """Training targets of one image, in the padded input frame.

    ``masks`` float ``[G, Hp/4, Wp/4]`` (the padded-size masks sampled at ``[2::4, 2::4]``, the
    centres of the stride-4 cells: the mask loss's targets), ``point_masks`` bool of the same
    shape (sampled at ``[0::4, 0::4]``: every FPN location's own pixel, for the assigners'
    inside-the-mask test), ``boxes`` float ``[G, 4]`` (x1, y1, x2, y2 in input pixels, from the
    full-size mask), ``centers`` float ``[G, 2]`` (x, y: the mask's centre of mass in input pixels).
    """

    labels: Tensor
    masks: Tensor
    point_masks: Tensor
    boxes: Tensor
    centers: Tensor

    def to(self, device: torch.device | str) -> "Targets":
        fields = (self.labels, self.masks, self.point_masks, self.boxes, self.centers)
        return Targets(*(t.to(device, non_blocking=True) for t in fields))

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Batch:
    """A padded batch. ``images`` is uint8 ``[B, 3, Hp, Wp]`` with Hp, Wp multiples of 32;
    ``image_sizes`` are the (h, w) of each resized image inside the padding, ``orig_sizes``
    the (h, w) of each image as stored."""

    images: Tensor
    image_sizes: list[tuple[int, int]]
    orig_sizes: list[tuple[int, int]]
    image_ids: list[int]
    targets: list[Targets] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        targets = None if self.targets is None else [t.to(device) for t in self.targets]
        return Batch(self.images.to(device, non_blocking=True), self.image_sizes, self.orig_sizes, self.image_ids, targets)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Instances:
    """Predictions for one image at its original size: ``masks`` bool ``[n, H, W]``,
    ``scores`` float ``[n]``, ``labels`` int64 ``[n]`` (contiguous ids), ``boxes`` float
    ``[n, 4]`` derived from the masks (x1, y1, x2, y2)."""

    masks: Tensor
    scores: Tensor
    labels: Tensor
    boxes: Tensor = field(default_factory=lambda: torch.zeros(0, 4))

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to(self, device: torch.device | str) -> "Instances":
        return Instances(self.masks.to(device), self.scores.to(device), self.labels.to(device), self.boxes.to(device))

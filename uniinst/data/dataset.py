"""Torch datasets and loaders: reproducible per-sample randomness and a resumable infinite sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from uniinst.data.coco import CocoDataset, CocoRecord
from uniinst.data.collate import collate
from uniinst.structures import Batch, Sample

Transform = Callable[[CocoRecord, np.random.Generator], Sample]


class InstanceSegDataset(Dataset):
    """Transformed samples of a :class:`CocoDataset`.

    The transform's randomness for item ``index`` comes from a generator seeded by
    ``(seed, epoch, index)``, so any item of any epoch can be reproduced exactly, in any
    worker process. ``index`` may also be an ``(epoch, index)`` pair: that is how
    :func:`build_train_loader` passes the epoch, because worker processes hold copies of
    the dataset that :meth:`set_epoch` cannot reach.

    Args:
        source: the annotations and images.
        transform: called as ``transform(record, rng)``.
        seed: the base seed of the per-item generators.
        skip_empty: keep only images with at least one non-crowd annotation (decided from
            the JSON, without decoding images); a source without any raises a ValueError.
    """

    def __init__(self, source: CocoDataset, transform: Transform, *, seed: int = 0, skip_empty: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.indices = [i for i in range(len(source)) if not skip_empty or source.num_instances(i) > 0]
        if skip_empty and not self.indices:
            raise ValueError(
                f"{source.gt_json_path}: no image with a usable annotation to train on ({_contents(source)})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int | tuple[int, int]) -> Sample:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        if not 0 <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.indices)} images")
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.transform(self.source.load(self.indices[index]), rng)


def _contents(source: CocoDataset) -> str:
    """What ``source`` holds, for an error saying it has nothing to train on."""
    parts = [f"{len(source)} images", f"{source.num_annotations} annotations"]
    if source.num_annotations:
        parts[-1] += ", all crowd"
    if source.skipped:
        parts.append(f"{len(source.skipped)} skipped as invalid")
    return ", ".join(parts)


class TrainingSampler(Sampler[int]):
    """Infinite stream of dataset indices, reshuffled every epoch.

    The global stream is the concatenation of epoch permutations of ``range(size)``, epoch
    ``e`` drawn from a generator seeded by ``(seed, e)``. Rank ``r`` of ``world_size`` takes
    its positions ``r, r + world_size, ...``: within an epoch no index reaches two ranks, and
    the ranks' ``k``-th batches of ``b`` together hold exactly the ``k``-th batch of
    ``b * world_size`` that one process would draw. ``start`` skips that many indices of this
    rank's stream, for an exact resume; ``start_position`` skips that many positions of the
    global stream first (the images a run trained on before its worker group changed size).
    """

    def __init__(
        self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0, start_position: int = 0
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if size < world_size:
            raise ValueError(f"dataset of {size} images cannot feed {world_size} ranks")
        if start < 0 or start_position < 0:
            raise ValueError(f"start and start_position must be >= 0, got {start} and {start_position}")
        self.size = size
        self.start_position = start_position
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[int]:
        for _, index in self.iter_with_epoch():
            yield index

    def iter_with_epoch(self) -> Iterator[tuple[int, int]]:
        """The same stream as ``iter(self)``, each index paired with its epoch."""
        position = self.start_position + self.rank + self.start * self.world_size
        epoch, permutation = -1, np.empty(0, dtype=np.int64)
        while True:
            e, offset = divmod(position, self.size)
            if e != epoch:
                epoch, permutation = e, np.random.default_rng((self.seed, e)).permutation(self.size)
            yield epoch, int(permutation[offset])
            position += self.world_size


class _EpochTaggedSampler(Sampler[tuple[int, int]]):
    """Feeds ``(epoch, index)`` pairs to :class:`InstanceSegDataset`."""

    def __init__(self, sampler: TrainingSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.sampler.iter_with_epoch()


class TrainLoader:
    """Infinite iterator of this rank's training batches from a DataLoader over
    :class:`TrainingSampler`, and the position a checkpoint stores to continue it."""

    def __init__(self, loader: DataLoader, sampler: TrainingSampler, batch_size: int) -> None:
        self._batches = iter(loader)
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        # Dropping the DataLoader's iterator ends its worker processes.
        self._batches = iter(())

    def state_after(self, batches: int) -> dict[str, int | str]:
        """Images of the global stream trained on after ``batches`` more batches of every rank:
        where a resumed stream continues, whatever the size of the group that resumes it."""
        s = self.sampler
        done = s.start_position + (s.start + batches * self.batch_size) * s.world_size
        return {"split": "images", "images": done}


def build_train_loader(
    dataset: InstanceSegDataset,
    *,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    start_position: int = 0,
) -> TrainLoader:
    """Training batches of this rank, endlessly; ``start_iter`` resumes after that
    many batches, ``start_position`` after that many images of the global stream (see
    :class:`TrainingSampler`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = TrainingSampler(
        len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_iter * batch_size,
        start_position=start_position,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_EpochTaggedSampler(sampler),
        num_workers=num_workers,
        collate_fn=collate,
    )
    return TrainLoader(loader, sampler, batch_size)


def build_eval_loader(dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """Finite, in-order loader over every image of ``dataset``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)

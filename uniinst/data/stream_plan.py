"""Which images each rank of a sharded training stream trains on, epoch by epoch, and where a
stopped stream continues: pure bookkeeping over the shards' image ids, no I/O.

Splitting by shard (``data.split=shards``), epoch ``e`` of ``W`` ranks is::

    kept images of the shards, shards in an order drawn from (seed, e), rows in file order
      -> W contiguous pieces of n // W images (the last n mod W images rest this epoch)
      -> rank r: shuffle buffer over piece r, drawn from (seed, e, segment 0, r)

so a rank reads only the shards its piece touches: at most one shard more than its share.

A run that resumes with another number of ranks finishes the epoch it stopped in: what each
old rank had not yet trained on, back in the epoch's shard order, is split again the same
way (a new *segment* of the epoch); the next epoch starts whole. A :class:`StreamPosition`
records the segments, so any chain of resizes replays exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Domain tags keep the generators drawn from one (seed, epoch) apart.
SHARD_ORDER, SHUFFLE, AUGMENT = 0, 1, 2


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The order an epoch reads the shards in: a permutation drawn from ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng((seed, epoch, SHARD_ORDER)).permutation(num_shards).tolist()


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Items in a random order that holds back at most ``size`` of them (a shuffle buffer:
    each new item replaces a random buffered one, which is emitted). The order depends only
    on the items' sequence and ``rng``."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        out, buffer[j] = buffer[j], item
        yield out
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch trained by ``world_size`` ranks, each on ``done`` images."""

    world_size: int
    done: int = 0


@dataclass(frozen=True)
class StreamPosition:
    """Where a sharded stream stands: the epoch and its segments so far (the last one running)."""

    epoch: int = 0
    segments: tuple[Segment, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "segments": [[s.world_size, s.done] for s in self.segments]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamPosition:
        return cls(int(state["epoch"]), tuple(Segment(int(w), int(d)) for w, d in state["segments"]))


@dataclass(frozen=True)
class RankEpoch:
    """What one rank does in the rest of an epoch.

    ``shards``: shard indices to read, in order; ``piece``: the image ids to keep from them,
    in the order they are read; ``order``: the piece after its shuffle buffer; the first
    ``done`` of it were trained on before (they hold their place in the shuffle, undecoded).
    """

    epoch: int
    segment: int
    shards: list[int]
    piece: list[int]
    order: list[int]
    done: int

    @property
    def todo(self) -> list[int]:
        return self.order[self.done:]


@dataclass
class StreamPlan:
    """The plan of a sharded stream.

    Args:
        kept: per shard (manifest order), the ids of its images to train on, in row order.
        seed: draws the shard order and the shuffles.
        shuffle_files: read the shards in an order drawn per epoch (else the manifest's).
        shuffle_buffer_size: images each rank's shuffle buffer holds.
    """

    kept: Sequence[Sequence[int]]
    seed: int = 0
    shuffle_files: bool = True
    shuffle_buffer_size: int = 64
    _shard_of: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._shard_of = {i: s for s, ids in enumerate(self.kept) for i in ids}
        if len(self._shard_of) != self.per_epoch:
            raise ValueError("an image id appears in more than one row of the shards")

    @property
    def per_epoch(self) -> int:
        return sum(len(ids) for ids in self.kept)

    def epoch_images(self, epoch: int) -> list[int]:
        """The epoch's kept image ids: shards in the epoch's order, rows in file order."""
        order = shard_order(len(self.kept), shuffle=self.shuffle_files, seed=self.seed, epoch=epoch)
        return [i for s in order for i in self.kept[s]]

    def start(self, position: StreamPosition, world_size: int) -> StreamPosition:
        """The position a group of ``world_size`` ranks continues from: a new segment where
        the group's size changed (or the epoch had none), moving on while nothing is left."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if self.per_epoch < world_size:
            raise ValueError(f"{self.per_epoch} images to train on are too few for {world_size} ranks")
        if not position.segments or position.segments[-1].world_size != world_size:
            position = StreamPosition(position.epoch, (*position.segments, Segment(world_size)))
        if self._left(position) <= 0:
            return StreamPosition(position.epoch + 1, (Segment(world_size),))
        return position

    def advance(self, position: StreamPosition, images: int) -> StreamPosition:
        """``position`` after each rank of its last segment trained on ``images`` more."""
        world = position.segments[-1].world_size
        while images > 0:
            step = min(images, self._left(position))
            last = position.segments[-1]
            position = StreamPosition(position.epoch, (*position.segments[:-1], Segment(world, last.done + step)))
            images -= step
            if self._left(position) == 0:
                position = StreamPosition(position.epoch + 1, (Segment(world),))
        return position

    def rank_epoch(self, position: StreamPosition, rank: int) -> RankEpoch:
        """What rank ``rank`` of the last segment does in the rest of the position's epoch."""
        world = position.segments[-1].world_size
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
        epoch = position.epoch
        rest = self.epoch_images(epoch)
        for index, segment in enumerate(position.segments[:-1]):
            rest = self._remaining(rest, epoch, index, segment)
        index, last = len(position.segments) - 1, position.segments[-1]
        piece = self._pieces(rest, world)[rank]
        order = list(shuffle_buffer(piece, self.shuffle_buffer_size, self.shuffle_rng(epoch, index, rank)))
        shards = list(dict.fromkeys(self._shard_of[i] for i in piece))
        return RankEpoch(epoch=epoch, segment=index, shards=shards, piece=piece, order=order, done=last.done)

    # ------------------------------------------------------------------ internals

    def shuffle_rng(self, epoch: int, segment: int, rank: int) -> np.random.Generator:
        """The generator of a rank's shuffle buffer in one segment of an epoch."""
        return np.random.default_rng((self.seed, epoch, SHUFFLE, segment, rank))

    @staticmethod
    def _pieces(images: list[int], world: int) -> list[list[int]]:
        size = len(images) // world
        return [images[r * size:(r + 1) * size] for r in range(world)]

    def _remaining(self, images: list[int], epoch: int, index: int, segment: Segment) -> list[int]:
        """What the ranks of ``segment`` left of ``images``, back in the order of ``images``."""
        left: set[int] = set()
        for rank, piece in enumerate(self._pieces(images, segment.world_size)):
            order = list(shuffle_buffer(piece, self.shuffle_buffer_size, self.shuffle_rng(epoch, index, rank)))
            left.update(order[segment.done:])
        return [i for i in images if i in left]

    def _left(self, position: StreamPosition) -> int:
        """Images each rank of the last segment has still to train on in the epoch."""
        size = self.per_epoch
        for segment in position.segments[:-1]:
            size = segment.world_size * (size // segment.world_size - segment.done)
        last = position.segments[-1]
        return size // last.world_size - last.done

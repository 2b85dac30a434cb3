"""One rank's endless stream of training batches over a shard dataset, and the position a
checkpoint stores to continue it.

Each epoch runs one Ray Data pipeline over the shards the rank needs::

    its shards, in the epoch's order -> read + verify (only its images kept) -> decode +
    transform + targets (Ray tasks) -> rows in shard order -> shuffle buffer -> collate

How the ranks share an epoch is ``split``:

- ``"shards"`` (the default): each rank trains on a contiguous piece of the epoch's shard
  order and reads only the shards its piece touches, so the run reads the dataset about once
  per epoch whatever its size (:mod:`uniinst.data.stream_plan` has the rule, resizes included).
- ``"images"``: the kept images after one shuffle buffer form one global stream, rank ``r``
  of ``W`` trains on its positions ``r, r + W, ...``, and every rank reads every shard (but
  decodes only its images): ``W`` ranks x batch ``b`` take exactly the batches of one process
  x ``W b``, at ``W`` reads of the dataset per epoch.

Before the first batch the stream reads two small columns of every shard (``image_id`` and
``iscrowd``, no image bytes) to plan the epochs; a shard holding other rows than its manifest
entry says is an error then, and an epoch's pipeline that yields other rows than planned is
one at its end: an epoch is never silently short.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from uniinst.config import ExperimentConfig, RayConfig
from uniinst.data.shards import Manifest, ShardError, ShardInfo, read_manifest, shard_uris, verify_shard
from uniinst.data.storage import filesystem_for
from uniinst.data.stream_plan import SHUFFLE, StreamPlan, StreamPosition, shard_order, shuffle_buffer
from uniinst.data.transforms import TrainTransform
from uniinst.ray.data import (
    SAMPLE,
    SKIPPED,
    DataPlacement,
    DecodeStep,
    StreamSample,
    Transform,
    carried_shard_error,
    collate_stream,
    decode_rows,
    read_shards,
    rows_of,
)
from uniinst.redact import redact_uri
from uniinst.structures import Batch

T = TypeVar("T")
Split = Literal["shards", "images"]

# Shards whose image ids the plan reads at once: an object store answers many requests at a time.
_INDEX_READERS = 8


@dataclass(frozen=True)
class StreamOptions:
    """How the pipeline runs: ``decode_batch_size`` images per decoded block, Ray prefetching
    ``prefetch_blocks`` blocks, a background thread collating ``prefetch_batches`` batches
    ahead of the training step, the tasks placed by ``placement``."""

    decode_batch_size: int = 8
    prefetch_blocks: int = 2
    prefetch_batches: int = 2
    placement: DataPlacement = DataPlacement()


@dataclass
class _Skipped:
    """Holds the place in the shuffle of an image this rank trained on before a resume."""

    image_id: int


class TrainStream:
    """Endless batches of ``batch_size`` images for rank ``rank`` of ``world_size`` (a batch
    may span two epochs), from the shard dataset at ``uri``.

    Shard order, shuffles and each image's augmentation are drawn from ``(seed, epoch, ...)``,
    so the batches depend only on the dataset, the seed, the batch size, the world size and
    ``split``. ``resume`` is a :meth:`state_after` of an earlier stream (None: the start);
    ``start_iter`` skips that many more batches of this rank. Images without a non-crowd
    instance are not trained on. ``kept`` is :func:`kept_images` of the dataset, when the
    caller has it (a Ray Train driver reads it once for all its workers).
    """

    def __init__(
        self,
        uri: str,
        *,
        batch_size: int,
        transform: Transform,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: Split = "shards",
        resume: dict[str, Any] | None = None,
        start_iter: int = 0,
        shuffle_buffer_size: int = 64,
        shuffle_files: bool = True,
        endpoint_url: str | None = None,
        manifest: Manifest | None = None,
        kept: Sequence[Sequence[int]] | None = None,
        size_divisibility: int = 32,
        mask_stride: int = 4,
        options: StreamOptions = StreamOptions(),
    ) -> None:
        if batch_size < 1 or start_iter < 0:
            raise ValueError(f"need batch_size >= 1 and start_iter >= 0, got {batch_size} and {start_iter}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if split not in ("shards", "images"):
            raise ValueError(f"split must be 'shards' or 'images', got {split!r}")
        self.uri, self.name = uri, redact_uri(uri)
        self.manifest = manifest or read_manifest(uri, endpoint_url=endpoint_url)
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.split = rank, world_size, split
        self.resume, self.start_iter = resume, start_iter
        self.shuffle_buffer_size, self.shuffle_files = shuffle_buffer_size, shuffle_files
        self.endpoint_url, self.options, self.kept = endpoint_url, options, kept
        self.size_divisibility, self.mask_stride = size_divisibility, mask_stride
        self._batches = _in_background(self._stream(), options.prefetch_batches)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()

    # ------------------------------------------------------------------ positions

    @functools.cached_property
    def plan(self) -> StreamPlan:
        """The epochs' plan, from the shards' image ids (read on first use unless given)."""
        kept = self.kept if self.kept is not None else kept_images(self.uri, self.manifest, self.endpoint_url)
        return StreamPlan(
            kept,
            seed=self.seed, shuffle_files=self.shuffle_files, shuffle_buffer_size=self.shuffle_buffer_size,
        )

    @functools.cached_property
    def start(self) -> StreamPosition | int:
        """Where this rank's first batch begins: a :class:`StreamPosition` of the group
        (``split="shards"``) or a position in the global stream (``"images"``)."""
        state = self.resume or {}
        if self.split == "images":
            return int(state.get("images", 0)) + self.start_iter * self.batch_size * self.world_size
        if state.get("split") == "shards":
            position = StreamPosition.from_dict(state)
        else:
            # A position in the global stream of the other split: go on with the next epoch.
            position = StreamPosition(-(-int(state.get("images", 0)) // self.plan.per_epoch))
        position = self.plan.start(position, self.world_size)
        return self.plan.advance(position, self.start_iter * self.batch_size)

    def state_after(self, batches: int) -> dict[str, Any]:
        """What a checkpoint taken after ``batches`` batches of every rank stores."""
        if self.split == "images":
            return {"split": "images", "images": self.start + batches * self.batch_size * self.world_size}
        return {"split": "shards", **self.plan.advance(self.start, batches * self.batch_size).to_dict()}

    # ------------------------------------------------------------------ the stream

    def _stream(self) -> Iterator[Batch]:
        epochs = self._shard_epochs() if self.split == "shards" else self._image_epochs()
        pending: list[StreamSample] = []
        for sample in itertools.chain.from_iterable(epochs):
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield collate_stream(pending, size_divisibility=self.size_divisibility, mask_stride=self.mask_stride)
                pending = []

    def _shard_epochs(self) -> Iterator[Iterator[StreamSample]]:
        position = self.start
        while True:
            part = self.plan.rank_epoch(position, self.rank)
            rows = self._rows(part.epoch, shards=part.shards, keep=part.piece, decode=part.todo)
            rng = self.plan.shuffle_rng(part.epoch, part.segment, self.rank)
            yield self._ordered(rows, part.epoch, part.order, rng, lambda p, done=part.done: p >= done)
            position = self.plan.start(StreamPosition(part.epoch + 1), self.world_size)

    def _image_epochs(self) -> Iterator[Iterator[StreamSample]]:
        per_epoch, world = self.plan.per_epoch, self.world_size
        first = self.start + self.rank
        for epoch in itertools.count(first // per_epoch):
            base, images = epoch * per_epoch, self.plan.epoch_images(epoch)
            order = list(shuffle_buffer(images, self.shuffle_buffer_size, self._image_rng(epoch)))
            mine = {p for p in range(per_epoch) if base + p >= first and (base + p - self.rank) % world == 0}
            shards = shard_order(len(self.manifest.shards), shuffle=self.shuffle_files, seed=self.seed, epoch=epoch)
            rows = self._rows(epoch, shards=shards, keep=images, decode=[order[p] for p in mine])
            yield self._ordered(rows, epoch, order, self._image_rng(epoch), mine.__contains__)

    def _image_rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, SHUFFLE))

    def _ordered(
        self, rows: Iterator[pa.Table], epoch: int, order: list[int], rng: np.random.Generator,
        trains: Callable[[int], bool],
    ) -> Iterator[StreamSample]:
        """The epoch's rows through the shuffle buffer, checked against the planned ``order``;
        the samples at the positions this rank ``trains`` on (the rest were not decoded)."""
        items = _epoch_items(rows, epoch, len(order), self.name, self.mask_stride)
        for position, item in enumerate(shuffle_buffer(items, self.shuffle_buffer_size, rng)):
            if position >= len(order) or item.image_id != order[position]:
                raise RuntimeError(f"{self.name}, epoch {epoch}: the stream's order does not match the planned one")
            if not trains(position):
                continue
            if isinstance(item, _Skipped):
                raise RuntimeError(f"{self.name}, epoch {epoch}: image {item.image_id} was skipped out of order")
            yield item

    def _rows(self, epoch: int, *, shards: list[int], keep: list[int], decode: list[int]) -> Iterator[pa.Table]:
        """The decoded blocks of one epoch: the ``keep`` images of ``shards`` (in that order), those
        in ``decode`` decoded, the others as markers."""
        placement = self.options.placement
        ds, _ = read_shards(
            self.uri, endpoint_url=self.endpoint_url, order=shards, manifest=self.manifest,
            image_ids=keep, placement=placement,
        )
        step = DecodeStep(
            self.transform, self.manifest.cat_id_to_contiguous, shard_uris(self.uri, self.manifest),
            seed=self.seed, epoch=epoch, only=decode, mask_stride=self.mask_stride,
        )
        decoded = decode_rows(ds, step, batch_size=self.options.decode_batch_size, placement=placement)
        prefetch = self.options.prefetch_blocks
        return decoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch)


def train_stream(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    resume: dict[str, Any] | None = None,
    start_iter: int = 0,
    manifest: Manifest | None = None,
    kept: Sequence[Sequence[int]] | None = None,
) -> TrainStream:
    """The training stream of ``cfg.data.train.shards`` for one rank of a run as ``cfg`` sets it."""
    d = cfg.data
    transform = TrainTransform(short_edge=tuple(d.min_size_train), max_size=d.max_size_train, flip_prob=d.flip_prob)
    return TrainStream(
        d.train.shards, batch_size=d.batch_size, transform=transform, seed=cfg.train.seed,
        rank=rank, world_size=world_size, split=d.split, resume=resume, start_iter=start_iter,
        shuffle_buffer_size=d.shuffle_buffer, endpoint_url=d.endpoint_url or None, manifest=manifest, kept=kept,
        options=StreamOptions(placement=_placement(cfg.ray, world_size)),
    )


def _placement(cfg: RayConfig, world_size: int) -> DataPlacement:
    mib = cfg.data_object_store_mib
    if mib == 0:
        # Each stream's executor would otherwise take Ray Data's share of the whole store for
        # itself, and W of them on a cluster fill it W times over: spilling decoded images.
        store = ray.cluster_resources().get("object_store_memory", 0.0)
        mib = max(int(store / 2 / world_size / 2**20), 1)
    return DataPlacement(resource=cfg.data_resource, object_store_mib=mib)


def kept_images(uri: str, manifest: Manifest, endpoint_url: str | None = None) -> list[list[int]]:
    """Per shard (manifest order), the ids of its images with a non-crowd instance (the ones
    trained on), in row order: read from two small columns, no image bytes, and checked
    against the manifest's image counts."""

    def read(shard_uri: str, info: ShardInfo) -> list[int]:
        where = f"shard {redact_uri(shard_uri)}"
        fs, path = filesystem_for(shard_uri, endpoint_url=endpoint_url)
        try:
            # No read-ahead: Parquet asks for the footer and two column chunks, and a block
            # cache would fetch most of the file for them.
            with fs.open(path, "rb", cache_type="none") as f:
                table = pq.ParquetFile(f).read(columns=["image_id", "annotations.list.element.iscrowd"])
        except FileNotFoundError:
            raise ShardError(f"{where} is listed in the manifest but does not exist") from None
        except pa.ArrowInvalid as exc:
            verify_shard(fs, path, info, where=where)
            raise ShardError(f"{where} is not a readable shard: {exc}") from exc
        except OSError:
            # Parquet's "corrupt page" and a failing store are both OSErrors: the checksum tells.
            verify_shard(fs, path, info, where=where)
            raise
        if table.num_rows != info.num_images:
            raise ShardError(f"{where} holds {table.num_rows} images but the manifest lists {info.num_images}")
        return [
            int(row["image_id"]) for row in table.to_pylist()
            if any(not a["iscrowd"] for a in row["annotations"] or ())
        ]

    with ThreadPoolExecutor(_INDEX_READERS) as pool:
        return list(pool.map(read, shard_uris(uri, manifest), manifest.shards))


def _in_background(items: Iterator[T], size: int) -> Iterator[T]:
    """``items`` produced by a background thread, up to ``size`` ahead of the consumer: the
    row conversion and collation overlap the training step (their copies release the GIL).
    Errors are re-raised here; closing this generator stops the thread and closes ``items``."""
    if size <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(size)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> None:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in items:
                put(("item", item))
                if stop.is_set():
                    break
            put(("end", None))
        except BaseException as exc:
            put(("error", exc))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="uniinst-batches", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _epoch_items(
    blocks: Iterator[pa.Table], epoch: int, expected_rows: int, name: str, mask_stride: int
) -> Iterator[StreamSample | _Skipped]:
    """The samples and consumed markers of one epoch, in stream order; raises at the end if
    the epoch held fewer (or more) rows than expected."""
    seen = 0
    try:
        for block in blocks:
            for image_id, status, sample in rows_of(block, mask_stride):
                seen += 1
                if status == SAMPLE:
                    yield sample
                elif status == SKIPPED:
                    yield _Skipped(image_id)
    except ray.exceptions.RayError as exc:
        found = carried_shard_error(exc)
        if found is not None:
            raise ShardError(found.message) from None
        raise RuntimeError(f"streaming epoch {epoch} of {name} failed after {seen} images: {_root_cause(exc)}") from exc
    if seen != expected_rows:
        raise RuntimeError(f"epoch {epoch} of {name} yielded {seen} images but {expected_rows} were expected")


def _root_cause(exc: BaseException) -> str:
    """The message of the first error under Ray's wrappers (the one raised in a task, which
    names its shard), without the remote traceback."""
    while isinstance(exc, ray.exceptions.RayError):
        cause = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(cause, BaseException):
            break
        exc = cause
    return f"{type(exc).__name__}: {exc}"

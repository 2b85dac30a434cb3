"""Streaming a shard dataset with Ray Data: read, decode, augment and build stride-4 targets in
Ray tasks; shuffle, batch and pad in the training process.

One epoch is one execution of the pipeline::

    shards (in an order drawn from (seed, epoch)) -> read + verify -> decode + transform +
    targets (Ray tasks) -> rows in shard order -> shuffle buffer -> collate -> Batch

Shards are read by :class:`ShardDatasource`, one Ray read task per shard the manifest lists,
rather than ``ray.data.read_parquet``: each shard is read whole and checked against the
manifest's size and sha256 before any of its rows is used. Parquet pages carry no checksum by
default (and Ray 2.60's Parquet scanner replaces the scan options that would verify one), so a
flipped byte inside an image's bytes would otherwise decode to wrong pixels without an error.
A failed read is retried; a shard that is missing, fails its checksum, is not Parquet or holds
a row that does not decode raises a :class:`~uniinst.data.shards.ShardError` naming the shard,
which reaches the process consuming the pipeline as a plain ``ShardError`` with its one-line
message (see :func:`shard_errors_for_ray` and :func:`shard_errors_unwrapped`). Every epoch's
rows are counted against the manifest, so an epoch is never silently short.

Rows travel as Arrow binary columns (uint8 / int64 / float32 buffers plus shape columns),
not as Ray tensor columns: images and masks differ in shape from row to row, and binary
columns concatenate, shuffle and spill like any other bytes. They are batched only here, by
:func:`collate_stream` (the ragged-batch trap: never ``iter_torch_batches``).

Reproducibility: shard order is drawn from ``(seed, epoch)``, each image's augmentation from
``(seed, epoch, image_id)`` and the shuffle buffer from ``(seed, epoch)``; rows leave Ray
in shard order (``preserve_order``), so the batches of an epoch depend on nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataIterator, Dataset
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import UserCodeException
from torch import Tensor

from uniinst.data.coco import CocoRecord
from uniinst.data.collate import make_targets, padded_size
from uniinst.data.shards import (
    SHARD_SCHEMA,
    Manifest,
    ShardError,
    ShardInfo,
    check_digest,
    decode_row,
    read_manifest,
    shard_uris,
    verify_shard,
)
from uniinst.data.storage import filesystem_for
from uniinst.redact import redact_uri
from uniinst.structures import Batch, Sample, Targets

logger = logging.getLogger(__name__)

Transform = Callable[[CocoRecord, np.random.Generator], Sample]
T = TypeVar("T")

# Domain tags keep the generators drawn from one (seed, epoch) apart.
_SHARD_ORDER, _SHUFFLE, _AUGMENT = 0, 1, 2
# Reads of one shard before giving up; botocore and s3fs retry each request underneath.
READ_ATTEMPTS = 5
# The shortest step of Ray Data's scheduling loop (PacedSchedulingLoop): what its ray.wait waits
# for a finished task when some are running.
SCHEDULING_STEP_S = 0.1
_MAX_BACKOFF_S = 8.0
# Shards whose image ids a resume reads at once: an object store answers many requests at a time.
_INDEX_READERS = 8

# What a raw row carries besides SHARD_SCHEMA: the index of its shard in the manifest.
ROW_SCHEMA = SHARD_SCHEMA.append(pa.field("shard", pa.int32()))

# A row's status in the decoded stream.
EMPTY = 0  # no non-crowd instance: skipped for training, still counted
SAMPLE = 1  # decoded and transformed
SKIPPED = 2  # another rank's, or trained on before a resume: holds its place in the shuffle, not decoded

STREAM_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("status", pa.int8()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_instances", pa.int32()),
        ("image", pa.binary()),  # uint8 [3, height, width]
        ("masks", pa.binary()),  # uint8 [G, ceil(height / s), ceil(width / s)]
        ("point_masks", pa.binary()),  # uint8, the same shape
        ("labels", pa.binary()),  # int64 [G]
        ("boxes", pa.binary()),  # float32 [G, 4]
        ("centers", pa.binary()),  # float32 [G, 2]
    ]
)


# --------------------------------------------------------------------------- samples and batches


@dataclass
class StreamSample:
    """One training image as the stream ships it: the resized image and its targets before
    padding. ``masks`` are the image's masks sampled at ``[s//2::s, s//2::s]`` (uint8
    ``[G, ceil(h/s), ceil(w/s)]``, 16x smaller than full masks at s=4), ``point_masks`` at
    ``[0::s, 0::s]`` (see :class:`~uniinst.structures.Targets`); the cells that padding adds
    later are zero, so they are filled in by :func:`collate_stream`."""

    image: Tensor
    masks: Tensor
    point_masks: Tensor
    labels: Tensor
    boxes: Tensor
    centers: Tensor
    image_id: int
    orig_size: tuple[int, int]


def to_stream_sample(sample: Sample, *, mask_stride: int = 4) -> StreamSample:
    """The targets of ``sample`` at ``mask_stride``, computed before batching.

    :func:`make_targets` on the image padded only up to a multiple of ``mask_stride`` gives
    the same sampled cells, boxes and centres as on the batch's larger padding: the further
    padding only appends zero rows and columns to the sampled grid.
    """
    h, w = int(sample.image.shape[1]), int(sample.image.shape[2])
    padded = (-(-h // mask_stride) * mask_stride, -(-w // mask_stride) * mask_stride)
    targets = make_targets(sample.masks, sample.labels, padded, mask_stride=mask_stride)
    return StreamSample(
        image=sample.image,
        masks=targets.masks.to(torch.uint8),
        point_masks=targets.point_masks.to(torch.uint8),
        labels=targets.labels,
        boxes=targets.boxes,
        centers=targets.centers,
        image_id=int(sample.image_id),
        orig_size=(int(sample.orig_size[0]), int(sample.orig_size[1])),
    )


def collate_stream(samples: Sequence[StreamSample], *, size_divisibility: int = 32, mask_stride: int = 4) -> Batch:
    """Pad images (zeros, bottom/right) to the batch's largest size rounded up to
    ``size_divisibility`` and the stride-``mask_stride`` masks to match: the same
    :class:`Batch` as :func:`uniinst.data.collate.collate` gives for the samples."""
    sizes, (hp, wp) = padded_size(samples, size_divisibility=size_divisibility, mask_stride=mask_stride)
    images = samples[0].image.new_zeros((len(samples), 3, hp, wp))
    targets = []
    for i, (sample, (h, w)) in enumerate(zip(samples, sizes)):
        images[i, :, :h, :w] = sample.image
        num, mh, mw = sample.masks.shape
        grid = (num, hp // mask_stride, wp // mask_stride)
        masks = torch.zeros(grid, dtype=torch.float32, device=sample.masks.device)
        masks[:, :mh, :mw] = sample.masks
        points = torch.zeros(grid, dtype=torch.bool, device=sample.masks.device)
        points[:, :mh, :mw] = sample.point_masks.bool()
        targets.append(
            Targets(labels=sample.labels, masks=masks, point_masks=points, boxes=sample.boxes, centers=sample.centers)
        )
    return Batch(
        images=images,
        image_sizes=sizes,
        orig_sizes=[s.orig_size for s in samples],
        image_ids=[s.image_id for s in samples],
        targets=targets,
    )


def _sample_row(sample: StreamSample) -> dict[str, Any]:
    _, h, w = sample.image.shape
    return {
        "image_id": sample.image_id,
        "status": SAMPLE,
        "orig_height": sample.orig_size[0],
        "orig_width": sample.orig_size[1],
        "height": h,
        "width": w,
        "num_instances": len(sample.labels),
        "image": sample.image.numpy().tobytes(),
        "masks": sample.masks.numpy().tobytes(),
        "point_masks": sample.point_masks.numpy().tobytes(),
        "labels": sample.labels.numpy().astype(np.int64, copy=False).tobytes(),
        "boxes": sample.boxes.numpy().astype(np.float32, copy=False).tobytes(),
        "centers": sample.centers.numpy().astype(np.float32, copy=False).tobytes(),
    }


def _marker_row(image_id: int, status: int) -> dict[str, Any]:
    return {"image_id": image_id, "status": status}


def _tensor(buffer: pa.Scalar, dtype: type, shape: tuple[int, ...]) -> Tensor:
    # A copy: the Arrow buffer may live in the object store, and torch wants writable memory.
    return torch.from_numpy(np.frombuffer(buffer.as_buffer(), dtype=dtype).reshape(shape).copy())


def _rows_of(table: pa.Table, mask_stride: int) -> Iterator[tuple[int, int, StreamSample | None]]:
    """``(image_id, status, sample or None)`` for every row of a decoded block."""
    cols = {name: table.column(name).combine_chunks() for name in table.column_names}
    for i in range(table.num_rows):
        image_id, status = cols["image_id"][i].as_py(), cols["status"][i].as_py()
        if status != SAMPLE:
            yield image_id, status, None
            continue
        h, w, g = (cols[k][i].as_py() for k in ("height", "width", "num_instances"))
        mh, mw = -(-h // mask_stride), -(-w // mask_stride)
        sample = StreamSample(
            image=_tensor(cols["image"][i], np.uint8, (3, h, w)),
            masks=_tensor(cols["masks"][i], np.uint8, (g, mh, mw)),
            point_masks=_tensor(cols["point_masks"][i], np.uint8, (g, mh, mw)),
            labels=_tensor(cols["labels"][i], np.int64, (g,)),
            boxes=_tensor(cols["boxes"][i], np.float32, (g, 4)),
            centers=_tensor(cols["centers"][i], np.float32, (g, 2)),
            image_id=image_id,
            orig_size=(cols["orig_height"][i].as_py(), cols["orig_width"][i].as_py()),
        )
        yield image_id, status, sample


# --------------------------------------------------------------------------- shard errors across Ray


class _TaskShardError(ShardError, UserCodeException):
    """A :class:`ShardError` leaving a Ray Data task. As a ``UserCodeException`` Ray Data logs
    it in one line instead of dumping its traceback as a Ray bug, and the driver receives it
    typed: a ``RayTaskError`` that carries it."""


@contextmanager
def shard_errors_for_ray() -> Iterator[None]:
    """Around the body of a Ray Data task (a read, a ``map_batches`` UDF) over shard rows: a
    :class:`ShardError` leaves it as one the driver can unwrap (:func:`shard_errors_unwrapped`).
    A UDF's dataset must come from :func:`read_shards`, which tells Ray Data not to replace the
    error by a generic ``UserCodeException``."""
    try:
        yield
    except ShardError as exc:
        raise _TaskShardError(exc.message) from None


def _carried_shard_error(exc: BaseException | None) -> ShardError | None:
    """The :class:`ShardError` raised in a Ray task under Ray's wrappers of ``exc``, if any."""
    while exc is not None:
        if isinstance(exc, ShardError) and not isinstance(exc, ray.exceptions.RayTaskError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


@contextmanager
def shard_errors_unwrapped() -> Iterator[None]:
    """Around code in this process that consumes a Ray pipeline over shards: a
    :class:`ShardError` raised in one of its tasks comes out as a plain ``ShardError`` with its
    one-line message, not as Ray's wrapper whose text holds the remote traceback."""
    try:
        yield
    except ray.exceptions.RayError as exc:
        found = _carried_shard_error(exc)
        if found is None:
            raise
        raise ShardError(found.message) from None


# --------------------------------------------------------------------------- reading shards


def ensure_ray() -> None:
    """Join the Ray cluster this machine runs or ``RAY_ADDRESS`` names, else start a local one."""
    from uniinst.ray.prepare import connect

    connect("auto")


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The order an epoch reads the shards in: a permutation drawn from ``(seed, epoch)``."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng((seed, epoch, _SHARD_ORDER)).permutation(num_shards).tolist()


def _read_shard(
    shard_uri: str,
    *,
    shard: int,
    sha256: str,
    size: int,
    endpoint_url: str | None,
    image_ids: frozenset[int] | None,
    attempts: int,
) -> Iterator[pa.Table]:
    """The rows of one shard, one table per row group, after checking the whole file; a
    :class:`ShardError` if it is missing, corrupt or not a shard."""
    where = f"shard {redact_uri(shard_uri)}"
    fs, path = filesystem_for(shard_uri, endpoint_url=endpoint_url)
    data = _fetch(fs, path, where=where, attempts=attempts)
    check_digest(hashlib.sha256(data).hexdigest(), len(data), expected_sha256=sha256, expected_bytes=size, where=where)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        missing = [name for name in SHARD_SCHEMA.names if name not in parquet.schema_arrow.names]
        if missing:
            raise ShardError(f"{where} is not a readable shard: it lacks the column(s) {', '.join(missing)}")
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            if image_ids is not None:
                keep = [image_id in image_ids for image_id in table.column("image_id").to_pylist()]
                table = table.filter(pa.array(keep, pa.bool_()))
            yield table.append_column("shard", pa.array(np.full(table.num_rows, shard, np.int32)))
    except ShardError:
        raise
    # The bytes are in memory: an OSError here is Parquet's, not the store's.
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ShardError(f"{where} is not a readable shard: {exc}") from exc


def _read_in_task(read: Callable[[], Iterator[pa.Table]]) -> Iterator[pa.Table]:
    with shard_errors_for_ray():
        yield from read()


def _fetch(fs: Any, path: str, *, where: str, attempts: int) -> bytes:
    """The file's bytes. Failures other than a missing file or a refusal (a dropped
    connection, a store restarting) are retried with exponential backoff."""
    for attempt in itertools.count(1):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise ShardError(f"{where} is listed in the manifest but does not exist") from None
        except PermissionError as exc:
            raise PermissionError(f"{where}: access denied: {exc}") from exc
        except Exception as exc:
            if attempt >= attempts:
                raise OSError(f"{where} could not be read in {attempts} attempts: {exc}") from exc
            wait = min(0.5 * 2 ** (attempt - 1), _MAX_BACKOFF_S)
            logger.warning("%s: read failed (%s); retrying in %.1f s", where, exc, wait)
            time.sleep(wait)


class ShardDatasource(Datasource):
    """The shards a manifest lists (never a directory listing, which could include files of an
    unfinished conversion), one read task per shard, in ``order``.

    Args:
        uri: the dataset (folder or object-store prefix holding ``manifest.json``).
        manifest: its manifest.
        order: shard indices in reading order (default: the manifest's).
        endpoint_url: S3-compatible endpoint; credentials come from the workers' environment.
        image_ids: keep only these images.
        attempts: reads of a shard before its error is raised.
    """

    def __init__(
        self,
        uri: str,
        manifest: Manifest,
        *,
        order: Sequence[int] | None = None,
        endpoint_url: str | None = None,
        image_ids: Iterable[int] | None = None,
        attempts: int = READ_ATTEMPTS,
    ) -> None:
        super().__init__()
        self.uris = shard_uris(uri, manifest)
        self.manifest = manifest
        self.order = list(range(len(manifest.shards)) if order is None else order)
        if sorted(self.order) != list(range(len(manifest.shards))):
            raise ValueError(f"order must be a permutation of the {len(manifest.shards)} shards, got {self.order}")
        self.endpoint_url = endpoint_url
        self.image_ids = None if image_ids is None else frozenset(int(i) for i in image_ids)
        self.attempts = attempts

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.bytes for s in self.manifest.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for index in self.order:
            info = self.manifest.shards[index]
            read = functools.partial(
                _read_shard,
                self.uris[index],
                shard=index,
                sha256=info.sha256,
                size=info.bytes,
                endpoint_url=self.endpoint_url,
                image_ids=self.image_ids,
                attempts=self.attempts,
            )
            metadata = BlockMetadata(
                num_rows=info.num_images if self.image_ids is None else None,
                size_bytes=info.bytes,
                input_files=[redact_uri(self.uris[index])],
                exec_stats=None,
            )
            task = functools.partial(_read_in_task, read)
            tasks.append(ReadTask(task, metadata, schema=ROW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


def read_shards(
    uri: str,
    *,
    endpoint_url: str | None = None,
    shuffle_files: bool = False,
    seed: int = 0,
    epoch: int = 0,
    manifest: Manifest | None = None,
    image_ids: Iterable[int] | None = None,
    attempts: int = READ_ATTEMPTS,
) -> tuple[Dataset, Manifest]:
    """The raw rows (:data:`ROW_SCHEMA`) of the shard dataset at ``uri`` and its manifest.

    With ``shuffle_files`` the shards are read in an order drawn from ``(seed, epoch)``. Rows
    leave the dataset in shard order (Ray Data's ``preserve_order``), so an execution is
    reproducible. ``manifest`` skips re-reading it; ``image_ids`` keeps only those images.

    A faulty shard raises a :class:`ShardError` in its read task; a ``map_batches`` UDF over
    these rows may raise one too, from inside :func:`shard_errors_for_ray`, as Ray Data passes
    the errors of this dataset's UDFs on unchanged (``raise_original_map_exception``). Consume
    the dataset inside :func:`shard_errors_unwrapped` to get them as plain ``ShardError``.
    """
    manifest = manifest or read_manifest(uri, endpoint_url=endpoint_url)
    order = shard_order(len(manifest.shards), shuffle=shuffle_files, seed=seed, epoch=epoch)
    source = ShardDatasource(
        uri, manifest, order=order, endpoint_url=endpoint_url, image_ids=image_ids, attempts=attempts
    )
    ds = ray.data.read_datasource(source)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds.context.raise_original_map_exception = True
    ds.context.custom_execution_callback_classes = [
        *ds.context.custom_execution_callback_classes, PacedSchedulingLoop
    ]
    return ds, manifest


class PacedSchedulingLoop(ExecutionCallback):
    """Makes each step of Ray Data's scheduling loop last at least :data:`SCHEDULING_STEP_S`.

    The loop runs in the process that consumes the dataset (the training worker) and blocks in
    ``ray.wait`` only on running tasks: with none (every task of the epoch done, or all held
    back by backpressure while the trainer works through what is decoded) it spins, and took a
    third of a core and the GIL from the training step beside it (measured on 2 cores: a step
    of 4.4 s against 1.3 s in one process). A step that finds work still dispatches all of it,
    so pacing costs at most one step's wait before a finished task is followed up.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor: Any) -> None:
        wait = SCHEDULING_STEP_S - (time.perf_counter() - self._last)
        if wait > 0:
            time.sleep(wait)
        self._last = time.perf_counter()


# --------------------------------------------------------------------------- decoding in Ray tasks


def _execution_index() -> int:
    # Ray counts the executions of a dataset and hands the count to its tasks (its own
    # FileShuffleConfig(reseed_after_execution=True) uses it): for a pipeline built once and
    # run once per epoch, as a Ray Train dataset shard is, it is the epoch.
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


class DecodeStep:
    """The Ray Data task body: raw shard rows -> decoded, transformed rows with stride-4
    targets (:data:`STREAM_SCHEMA`).

    Args:
        transform: ``transform(record, rng) -> Sample`` (:class:`TrainTransform`, ...).
        cat_id_to_contiguous: the manifest's category map.
        shard_names: the shard URIs by manifest index, named in errors.
        seed: the base seed; each image's generator is drawn from ``(seed, epoch, image_id)``.
        epoch: the epoch, or None for Ray's execution count of the dataset (see
            :func:`_execution_index`).
        skip_empty: images without non-crowd instances become :data:`EMPTY` markers.
        only: decode only these image ids; the others pass as :data:`SKIPPED` markers (the
            images of other ranks, and those trained on before a resume). None: all.
        mask_stride: the stride of the mask targets.
    """

    def __init__(
        self,
        transform: Transform,
        cat_id_to_contiguous: Mapping[int, int],
        shard_names: Sequence[str],
        *,
        seed: int = 0,
        epoch: int | None = None,
        skip_empty: bool = True,
        only: Iterable[int] | None = None,
        mask_stride: int = 4,
    ) -> None:
        self.transform = transform
        self.cat_id_to_contiguous = dict(cat_id_to_contiguous)
        self.shard_names = [redact_uri(s) for s in shard_names]
        self.seed = seed
        self.epoch = epoch
        self.skip_empty = skip_empty
        self.only = None if only is None else frozenset(only)
        self.mask_stride = mask_stride

    def __call__(self, batch: pa.Table) -> pa.Table:
        epoch = self.epoch if self.epoch is not None else _execution_index()
        with shard_errors_for_ray():
            rows = [self._decode(row, epoch) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)

    def _decode(self, row: dict[str, Any], epoch: int) -> dict[str, Any]:
        image_id = int(row["image_id"])
        if self.skip_empty and not any(not a["iscrowd"] for a in row["annotations"] or ()):
            return _marker_row(image_id, EMPTY)
        if self.only is not None and image_id not in self.only:
            return _marker_row(image_id, SKIPPED)
        where = f"shard {self.shard_names[row['shard']]}"
        record = decode_row(row, self.cat_id_to_contiguous, where=where)
        rng = np.random.default_rng((self.seed, epoch, _AUGMENT, image_id))
        return _sample_row(to_stream_sample(self.transform(record, rng), mask_stride=self.mask_stride))


def decode_rows(ds: Dataset, step: DecodeStep, *, batch_size: int = 8) -> Dataset:
    """``ds`` (raw rows) decoded by ``step`` in Ray tasks, ``batch_size`` images per output block."""
    return ds.map_batches(step, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True)


# --------------------------------------------------------------------------- the training stream


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


@dataclass
class _Skipped:
    """Holds the place in the shuffle of an image this rank does not train on now."""

    image_id: int


def _image_index(uri: str, manifest: Manifest, endpoint_url: str | None) -> list[list[tuple[int, bool]]]:
    """Per shard, ``(image_id, has a non-crowd instance)`` of its rows in order, read from two
    small columns (no image bytes)."""

    def read(shard_uri: str, info: ShardInfo) -> list[tuple[int, bool]]:
        where = f"shard {redact_uri(shard_uri)}"
        fs, path = filesystem_for(shard_uri, endpoint_url=endpoint_url)
        try:
            with fs.open(path, "rb") as f:
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
        return [
            (int(row["image_id"]), any(not a["iscrowd"] for a in row["annotations"] or ()))
            for row in table.to_pylist()
        ]

    with ThreadPoolExecutor(_INDEX_READERS) as pool:
        return list(pool.map(read, shard_uris(uri, manifest), manifest.shards))


def iter_train_batches(
    source: str | Dataset | DataIterator,
    *,
    batch_size: int,
    transform: Transform | None = None,
    seed: int = 0,
    start_iter: int = 0,
    start_position: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer_size: int = 64,
    shuffle_files: bool = True,
    endpoint_url: str | None = None,
    manifest: Manifest | None = None,
    expected_rows: int | None = None,
    skip_empty: bool = True,
    size_divisibility: int = 32,
    mask_stride: int = 4,
    decode_batch_size: int = 8,
    prefetch_blocks: int = 2,
    prefetch_batches: int = 2,
) -> Iterator[Batch]:
    """Infinite stream of training batches of ``batch_size`` images for rank ``rank`` of
    ``world_size``, epoch after epoch (a batch may span two epochs).

    ``source`` is one of:

    - a shard dataset URI: each epoch reads the shards in an order drawn from ``(seed,
      epoch)``, decodes and transforms them in Ray tasks (:class:`DecodeStep`) and checks the
      epoch's row count against the manifest;
    - a :class:`ray.data.Dataset` of raw rows (:func:`read_shards`; pass its ``manifest``):
      decoded per epoch the same way, in the dataset's own shard order;
    - a :class:`ray.data.DataIterator` of decoded rows (a Ray Train dataset shard of
      :func:`decode_rows` with ``DecodeStep(epoch=None)``): iterated once per epoch; its
      pipeline holds the transform, so ``transform`` is not used.

    Images without instances are skipped (``skip_empty``); the rest pass a shuffle buffer of
    ``shuffle_buffer_size`` seeded by ``(seed, epoch)``, giving the global stream. Rank ``r``
    trains on the positions ``r, r + world_size, ...`` of that stream and decodes only those
    images (the others pass the pipeline as markers): within an epoch no image reaches two
    ranks, and the ranks' ``k``-th batches together are the ``k``-th batch of
    ``batch_size * world_size`` of one process. An epoch that yields fewer rows than the
    manifest lists (or ``expected_rows``) raises instead of ending early. Ray prefetches
    ``prefetch_blocks`` decoded blocks; a background thread collates ``prefetch_batches``
    batches ahead, so the training step does not wait for either.

    ``start_iter`` resumes exactly after that many batches: the continuing stream is the one
    an uninterrupted run would have produced from that point, same images, order and
    augmentation. ``start_position`` first skips that many images of the global stream (those
    trained on before the worker group changed size). Resuming and several ranks need a URI:
    the epoch's order is computed from two small columns of the shards before any image is read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_iter < 0 or start_position < 0:
        raise ValueError(f"start_iter and start_position must be >= 0, got {start_iter} and {start_position}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if isinstance(source, str):
        manifest = manifest or read_manifest(source, endpoint_url=endpoint_url)
        name = redact_uri(source)
    elif isinstance(source, Dataset):
        if manifest is None:
            raise ValueError("streaming a Dataset of shard rows needs its manifest (read_shards returns it)")
        name = "the given dataset"
    elif isinstance(source, DataIterator):
        name = "the given dataset shard"
    else:
        raise TypeError(f"source must be a shard URI, a ray.data.Dataset or a DataIterator, got {type(source).__name__}")
    if expected_rows is None and manifest is not None:
        expected_rows = manifest.num_images
    if transform is None and not isinstance(source, DataIterator):
        raise ValueError("a transform is needed to decode shard rows")
    planned = bool(start_iter) or bool(start_position) or world_size > 1
    if planned and not isinstance(source, str):
        raise ValueError("resuming (start_iter > 0) or streaming to several ranks needs the shard dataset URI as the source")

    # Positions in the global stream of kept images, counted from the first epoch.
    index: list[list[tuple[int, bool]]] = []
    per_epoch, first_position = 0, 0
    if planned:
        index = _image_index(source, manifest, endpoint_url)
        per_epoch = sum(keep or not skip_empty for shard in index for _, keep in shard)
        if per_epoch < world_size:
            raise ValueError(f"{name} holds {per_epoch} images to train on, too few for {world_size} ranks")
        first_position = start_position + rank + start_iter * batch_size * world_size

    def epoch_order(epoch: int) -> list[int]:
        """The image ids of the epoch's global stream, in order."""
        order = shard_order(len(manifest.shards), shuffle=shuffle_files, seed=seed, epoch=epoch)
        kept = [i for s in order for i, keep in index[s] if keep or not skip_empty]
        return list(shuffle_buffer(kept, shuffle_buffer_size, _shuffle_rng(seed, epoch)))

    def epoch_rows(epoch: int, only: frozenset[int] | None) -> Iterator[pa.Table]:
        if isinstance(source, DataIterator):
            return source.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_blocks)
        if isinstance(source, str):
            ds, _ = read_shards(
                source, endpoint_url=endpoint_url, shuffle_files=shuffle_files, seed=seed, epoch=epoch, manifest=manifest
            )
            names = shard_uris(source, manifest)
        else:
            ds, names = source, [f"#{i}" for i in range(len(manifest.shards))]
        step = DecodeStep(
            transform, manifest.cat_id_to_contiguous, names, seed=seed, epoch=epoch,
            skip_empty=skip_empty, only=only, mask_stride=mask_stride,
        )
        decoded = decode_rows(ds, step, batch_size=decode_batch_size)
        return decoded.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_blocks)

    def planned_epoch(epoch: int) -> tuple[list[int], list[bool]]:
        """The epoch's global order and, per position, whether this rank trains on it."""
        order = epoch_order(epoch)
        base = epoch * per_epoch
        mine = [(base + p) >= first_position and (base + p - rank) % world_size == 0 for p in range(per_epoch)]
        return order, mine

    def stream() -> Iterator[Batch]:
        pending: list[StreamSample] = []
        first_epoch = first_position // per_epoch if planned else 0
        for epoch in itertools.count(first_epoch):
            order, mine = planned_epoch(epoch) if planned else ([], [])
            only = frozenset(i for i, m in zip(order, mine) if m) if planned else None
            items = _epoch_items(epoch_rows(epoch, only), epoch, expected_rows, name, mask_stride)
            produced = 0
            for position, item in enumerate(shuffle_buffer(items, shuffle_buffer_size, _shuffle_rng(seed, epoch))):
                if planned:
                    if position >= len(order) or item.image_id != order[position]:
                        raise RuntimeError(f"{name}, epoch {epoch}: the stream's order does not match the planned one")
                    if not mine[position]:
                        continue
                if isinstance(item, _Skipped):
                    raise RuntimeError(f"{name}, epoch {epoch}: image {item.image_id} was skipped out of order")
                produced += 1
                pending.append(item)
                if len(pending) == batch_size:
                    yield collate_stream(pending, size_divisibility=size_divisibility, mask_stride=mask_stride)
                    pending = []
            if produced == 0 and not planned:
                raise ValueError(f"epoch {epoch} of {name} holds no image with an instance to train on")

    return _in_background(stream(), prefetch_batches)


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


def _shuffle_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, _SHUFFLE))


def _epoch_items(
    blocks: Iterator[pa.Table], epoch: int, expected_rows: int | None, name: str, mask_stride: int
) -> Iterator[StreamSample | _Skipped]:
    """The samples and consumed markers of one epoch, in stream order; raises at the end if
    the epoch held fewer (or more) rows than expected."""
    seen = 0
    try:
        for block in blocks:
            for image_id, status, sample in _rows_of(block, mask_stride):
                seen += 1
                if status == SAMPLE:
                    yield sample
                elif status == SKIPPED:
                    yield _Skipped(image_id)
    except ray.exceptions.RayError as exc:
        found = _carried_shard_error(exc)
        if found is not None:
            raise ShardError(found.message) from None
        raise RuntimeError(f"streaming epoch {epoch} of {name} failed after {seen} images: {_root_cause(exc)}") from exc
    if expected_rows is not None and seen != expected_rows:
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

"""Reading a shard dataset with Ray Data, and decoding its rows into training samples in
Ray tasks: the pieces of every pipeline over shards (the training stream,
:mod:`uniinst.ray.train_stream`; the evaluation, :mod:`uniinst.ray.evaluate`).

Shards are read by :class:`ShardDatasource`, one Ray read task per shard,
rather than ``ray.data.read_parquet``: each shard is read whole and checked against the
manifest's size and sha256 before any of its rows is used. Parquet pages carry no checksum by
default (and Ray 2.60's Parquet scanner replaces the scan options that would verify one), so a
flipped byte inside an image's bytes would otherwise decode to wrong pixels without an error.
A failed read is retried; a shard that is missing, fails its checksum, is not Parquet or holds
a row that does not decode raises a :class:`~uniinst.data.shards.ShardError` naming the shard,
which reaches the process consuming the pipeline as a plain ``ShardError`` with its one-line
message (see :func:`shard_errors_for_ray` and :func:`shard_errors_unwrapped`).

Rows travel as Arrow binary columns (uint8 / int64 / float32 buffers plus shape columns),
not as Ray tensor columns: images and masks differ in shape from row to row, and binary
columns concatenate, shuffle and spill like any other bytes. They are batched only in the
training process, by :func:`collate_stream` (the ragged-batch trap: never
``iter_torch_batches``). Each image's augmentation is drawn from ``(seed, epoch, image_id)``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import Dataset
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
    check_digest,
    decode_row,
    read_manifest,
    shard_uris,
)
from uniinst.data.storage import filesystem_for
from uniinst.data.stream_plan import AUGMENT
from uniinst.redact import redact_uri
from uniinst.structures import Batch, Sample, Targets

logger = logging.getLogger(__name__)

Transform = Callable[[CocoRecord, np.random.Generator], Sample]

# Reads of one shard before giving up; botocore and s3fs retry each request underneath.
READ_ATTEMPTS = 5
# The shortest step of Ray Data's scheduling loop (PacedSchedulingLoop): what its ray.wait waits
# for a finished task when some are running.
SCHEDULING_STEP_S = 0.1
_MAX_BACKOFF_S = 8.0

# What a raw row carries besides SHARD_SCHEMA: the index of its shard in the manifest.
ROW_SCHEMA = SHARD_SCHEMA.append(pa.field("shard", pa.int32()))

# A row's status in the decoded stream.
EMPTY = 0  # no non-crowd instance: skipped for training, still counted
SAMPLE = 1  # decoded and transformed
SKIPPED = 2  # not this rank's to train on now: holds its place in the shuffle, not decoded

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


def rows_of(table: pa.Table, mask_stride: int) -> Iterator[tuple[int, int, StreamSample | None]]:
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


def carried_shard_error(exc: BaseException | None) -> ShardError | None:
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
        found = carried_shard_error(exc)
        if found is None:
            raise
        raise ShardError(found.message) from None


# --------------------------------------------------------------------------- reading shards


def ensure_ray() -> None:
    """Join the Ray cluster this machine runs or ``RAY_ADDRESS`` names, else start a local one."""
    from uniinst.ray.prepare import connect

    connect("auto")


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
        order: the shards to read (indices into the manifest), in reading order (default: all,
            in the manifest's order).
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
        if len(set(self.order)) != len(self.order) or not set(self.order) <= set(range(len(manifest.shards))):
            raise ValueError(f"order must list distinct shards of the {len(manifest.shards)}, got {self.order}")
        self.endpoint_url = endpoint_url
        self.image_ids = None if image_ids is None else frozenset(int(i) for i in image_ids)
        self.attempts = attempts

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.manifest.shards[i].bytes for i in self.order)

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


@dataclass(frozen=True)
class DataPlacement:
    """Where a pipeline's Ray Data tasks run and how much of the object store it may fill.

    Args:
        resource: a custom resource each read and decode task takes one unit of, so that they
            run only on the nodes that offer it (``""``: on any node with a free CPU). Give the
            CPU nodes meant for data ``resources: {<name>: <their CPU count>}``.
        object_store_mib: the most the pipeline's blocks may hold in the object store before
            Ray Data holds its tasks back (0: Ray Data's default, a share of the node's store
            that every pipeline on the node assumes is its own).
    """

    resource: str = ""
    object_store_mib: int = 0

    def remote_args(self) -> dict[str, Any]:
        return {"resources": {self.resource: 1}} if self.resource else {}

    def limit(self, ds: Dataset) -> None:
        if self.object_store_mib > 0:
            options = ds.context.execution_options
            # ExecutionResources has no setters: assign a new one.
            options.resource_limits = options.resource_limits.copy(object_store_memory=self.object_store_mib * 2**20)


def read_shards(
    uri: str,
    *,
    endpoint_url: str | None = None,
    order: Sequence[int] | None = None,
    manifest: Manifest | None = None,
    image_ids: Iterable[int] | None = None,
    attempts: int = READ_ATTEMPTS,
    placement: DataPlacement = DataPlacement(),
) -> tuple[Dataset, Manifest]:
    """The raw rows (:data:`ROW_SCHEMA`) of the shard dataset at ``uri`` and its manifest.

    ``order`` names the shards to read, in reading order (default: all). Rows leave the
    dataset in shard order (Ray Data's ``preserve_order``), so an execution is reproducible.
    ``manifest`` skips re-reading it; ``image_ids`` keeps only those images; ``placement``
    says where the read tasks run and caps the pipeline's object store use.

    A faulty shard raises a :class:`ShardError` in its read task; a ``map_batches`` UDF over
    these rows may raise one too, from inside :func:`shard_errors_for_ray`, as Ray Data passes
    the errors of this dataset's UDFs on unchanged (``raise_original_map_exception``). Consume
    the dataset inside :func:`shard_errors_unwrapped` to get them as plain ``ShardError``.
    """
    manifest = manifest or read_manifest(uri, endpoint_url=endpoint_url)
    source = ShardDatasource(
        uri, manifest, order=order, endpoint_url=endpoint_url, image_ids=image_ids, attempts=attempts
    )
    ds = ray.data.read_datasource(source, ray_remote_args=placement.remote_args() or None)
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds.context.raise_original_map_exception = True
    ds.context.custom_execution_callback_classes = [
        *ds.context.custom_execution_callback_classes, PacedSchedulingLoop
    ]
    placement.limit(ds)
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


class DecodeStep:
    """The Ray Data task body: raw shard rows -> decoded, transformed rows with stride-4
    targets (:data:`STREAM_SCHEMA`).

    Args:
        transform: ``transform(record, rng) -> Sample`` (:class:`TrainTransform`, ...).
        cat_id_to_contiguous: the manifest's category map.
        shard_names: the shard URIs by manifest index, named in errors.
        seed: the base seed; each image's generator is drawn from ``(seed, epoch, image_id)``.
        epoch: the epoch the rows are trained in.
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
        epoch: int = 0,
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
        with shard_errors_for_ray():
            rows = [self._decode(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)

    def _decode(self, row: dict[str, Any]) -> dict[str, Any]:
        image_id = int(row["image_id"])
        if self.skip_empty and not any(not a["iscrowd"] for a in row["annotations"] or ()):
            return _marker_row(image_id, EMPTY)
        if self.only is not None and image_id not in self.only:
            return _marker_row(image_id, SKIPPED)
        where = f"shard {self.shard_names[row['shard']]}"
        record = decode_row(row, self.cat_id_to_contiguous, where=where)
        rng = np.random.default_rng((self.seed, self.epoch, AUGMENT, image_id))
        return _sample_row(to_stream_sample(self.transform(record, rng), mask_stride=self.mask_stride))


def decode_rows(
    ds: Dataset, step: DecodeStep, *, batch_size: int = 8, placement: DataPlacement = DataPlacement()
) -> Dataset:
    """``ds`` (raw rows) decoded by ``step`` in Ray tasks placed by ``placement``, ``batch_size``
    images per output block."""
    return ds.map_batches(
        step, batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True, **placement.remote_args()
    )

"""Converting a COCO-format dataset (a JSON file plus images, local or on object storage) to
Parquet shards in the format of :mod:`uniinst.data.shards`.

The conversion is planned deterministically (images sorted by id, split evenly into shards),
so a rerun plans the same shards: a shard whose ``<shard>.done.json`` marker matches the plan
and whose bytes still have the marker's sha256 is kept, the rest are (re)written. Every shard
and marker appears only once complete (a rename on a local disk, a single upload on an object
store), and the manifest is written last, so a dataset with a manifest is always complete. A
run killed while writing leaves temporary files that the next run removes; its local worker
processes end with it.

Credentials never pass through here: object stores authenticate from the environment or the
instance role, and every URI is stripped of ``user:pass@`` and query strings before it is
logged or stored.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from uniinst.data.coco import CocoAnnotations, segmentation_to_rle
from uniinst.data.shards import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    Manifest,
    ShardInfo,
    annotation_row,
    file_digest,
    shard_name,
)
from uniinst.data.storage import filesystem_for, join
from uniinst.redact import redact_uri

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
DONE_SUFFIX = ".done.json"
_TMP_MARK = ".tmp-"
_SHARD_FILE = re.compile(r"shard-\d{5}-of-\d{5}\.parquet(\.done\.json)?")
_ON_ERROR_MODES = ("raise", "skip")
# Images per Parquet row group: bounds a writer's memory and is the unit a streaming reader fetches.
_ROWS_PER_GROUP = 64
# Concurrent image reads per shard: object stores answer one request slowly but many at once.
_FETCH_THREADS = 8
# prctl(2) option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: plain data, so it travels to any process or Ray task.

    ``images`` are dicts with ``id``, ``file_name``, ``height``, ``width`` and
    ``annotations`` (dicts with ``id``, ``category_id``, ``iscrowd`` and a validated
    ``segmentation``). The endpoint URL travels with the task; credentials never do.
    """

    index: int
    count: int
    images: tuple[dict, ...]
    images_uri: str
    out_uri: str
    on_error: str = "raise"
    endpoint_url: str | None = None

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)

    def fingerprint(self) -> str:
        """Changes whenever the shard's content would: a marker with another one is stale."""
        content = {
            "schema_version": SCHEMA_VERSION,
            "images": self.images,
            "images_uri": redact_uri(self.images_uri),
            "on_error": self.on_error,
        }
        text = json.dumps(content, sort_keys=True, default=lambda b: b.decode("ascii"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ShardResult:
    """What writing one shard gave: its :class:`ShardInfo`, and the images it skipped
    (``on_error="skip"``) with the number of annotations dropped along with them."""

    index: int
    info: ShardInfo
    skipped: list[str]
    annotations_skipped: int
    seconds: float = 0.0


Executor = Callable[[Callable[[ShardTask], ShardResult], Sequence[ShardTask]], Iterator[ShardResult]]


def serial_executor(convert: Callable[[ShardTask], ShardResult], tasks: Sequence[ShardTask]) -> Iterator[ShardResult]:
    """Convert the shards one after another in this process."""
    for task in tasks:
        yield convert(task)


def local_executor(max_workers: int | None = None) -> Executor:
    """Convert shards in a local process pool of ``max_workers`` (default: the CPU count),
    yielding results as they finish; one worker runs serially in this process. The workers
    end with this process, however it ends (even by SIGKILL)."""

    def run(convert: Callable[[ShardTask], ShardResult], tasks: Sequence[ShardTask]) -> Iterator[ShardResult]:
        workers = min(max_workers or os.cpu_count() or 1, len(tasks))
        if workers <= 1:
            yield from serial_executor(convert, tasks)
            return
        # Forking a process that already runs pyarrow or torch thread pools can deadlock the child.
        spawn = multiprocessing.get_context("spawn")
        # Workers start in submit(), so in this thread: the one Linux's parent-death signal
        # follows, and it outlives the pool.
        pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_die_with_parent, initargs=(os.getpid(),))
        with pool:
            futures = [pool.submit(convert, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()

    return run


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when the process that started it dies, which a
    SIGKILL gives no chance to stop its pool. On Linux the kernel sends the signal (a worker
    busy in C code dies too); elsewhere a thread watches for the parent to change."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            # The signal is for a parent that dies from now on: it may be gone already.
            if os.getppid() != parent_pid:
                os._exit(1)
            return
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="uniinst-parent-watch", daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


# --------------------------------------------------------------------------- one shard


def convert_shard(task: ShardTask) -> ShardResult:
    """Write one shard and then its done marker; returns what was written.

    Images keep their original bytes; each is checked to decode at its JSON size. A missing
    or undecodable image raises a ValueError naming its id and file, or with
    ``on_error="skip"`` is left out and listed. Errors reading the store itself (network,
    permissions) always raise, so a flaky store never looks like bad data.
    """
    start = time.perf_counter()
    src_fs, src_root = filesystem_for(task.images_uri, endpoint_url=task.endpoint_url)
    out_fs, out_root = filesystem_for(task.out_uri, endpoint_url=task.endpoint_url)
    shard_path = join(out_root, task.name)
    skipped: list[str] = []
    annotations_skipped = num_images = num_annotations = 0
    with _staged_file(out_fs, shard_path) as local_path, ThreadPoolExecutor(_FETCH_THREADS) as fetcher:
        with pq.ParquetWriter(local_path, SHARD_SCHEMA) as writer:
            for begin in range(0, len(task.images), _ROWS_PER_GROUP):
                batch = task.images[begin : begin + _ROWS_PER_GROUP]
                blobs = fetcher.map(lambda im: _fetch(src_fs, join(src_root, im["file_name"])), batch)
                rows = []
                for image, data in zip(batch, blobs):
                    problem = _image_problem(image, data)
                    if problem is not None:
                        where = join(redact_uri(task.images_uri), image["file_name"])
                        message = f"image id {image['id']} ({where}): {problem}"
                        if task.on_error == "raise":
                            raise ValueError(message)
                        skipped.append(message)
                        annotations_skipped += len(image["annotations"])
                        continue
                    rows.append(_row(image, data))
                num_images += len(rows)
                num_annotations += sum(len(row["annotations"]) for row in rows)
                if rows:
                    writer.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
        sha256, size = file_digest(LocalFileSystem(), local_path)
    info = ShardInfo(path=task.name, num_images=num_images, num_annotations=num_annotations, sha256=sha256, bytes=size)
    marker = {
        "info": asdict(info),
        "skipped": skipped,
        "annotations_skipped": annotations_skipped,
        "fingerprint": task.fingerprint(),
    }
    _put_atomically(out_fs, shard_path + DONE_SUFFIX, json.dumps(marker, indent=1).encode())
    if skipped:
        logger.warning("%s: skipped %d images", task.name, len(skipped))
    return ShardResult(task.index, info, skipped, annotations_skipped, time.perf_counter() - start)


def _fetch(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The file's bytes, or None if it does not exist."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _image_problem(image: dict, data: bytes | None) -> str | None:
    """Why the encoded image cannot be used, or None if it decodes at the JSON's size."""
    if data is None:
        return "file does not exist"
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.size != (image["width"], image["height"]):
                return f"is {pil.size[0]}x{pil.size[1]} (WxH) but the JSON says {image['width']}x{image['height']}"
            pil.load()  # decodes every pixel: a truncated file fails here, not at training time
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot decode the image bytes: {err}"
    return None


def _row(image: dict, data: bytes) -> dict[str, Any]:
    height, width = image["height"], image["width"]
    annotations = [
        annotation_row(
            ann["id"], ann["category_id"], ann["iscrowd"], segmentation_to_rle(ann["segmentation"], height, width)
        )
        for ann in image["annotations"]
    ]
    return {
        "image_id": image["id"],
        "file_name": image["file_name"],
        "height": height,
        "width": width,
        "image": data,
        "annotations": annotations,
    }


@contextmanager
def _staged_file(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """A local file to write ``path`` into; on success it appears at ``path`` whole.

    A local destination gets a temporary name beside it and a rename; an object store gets
    one upload of the finished file, as a rename there is a copy that readers could see half
    done.
    """
    if isinstance(fs, LocalFileSystem):
        staging = f"{path}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            yield staging
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.remove(staging)
        return
    with tempfile.TemporaryDirectory(prefix="uniinst-shard-") as tmp:
        staging = os.path.join(tmp, os.path.basename(path))
        yield staging
        fs.put_file(staging, path)


def _put_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with _staged_file(fs, path) as local_path:
        with open(local_path, "wb") as f:
            f.write(data)


# --------------------------------------------------------------------------- the plan


def read_image_ids(uri: str, *, endpoint_url: str | None = None) -> list[int]:
    """Image ids from a text file (local or URI), one per line; blank lines are ignored."""
    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"image id file {redact_uri(uri)} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"image id file {redact_uri(uri)} is not UTF-8 text: {err}") from err
    ids = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise ValueError(
                f"image id file {redact_uri(uri)}, line {number}: expected one integer image id, got {line!r}"
            ) from None
    return ids


def load_annotations(
    json_uri: str,
    *,
    on_error: str = "raise",
    endpoint_url: str | None = None,
    image_ids: Sequence[int] | str | None = None,
    categories: Sequence[str | int] | None = None,
) -> CocoAnnotations:
    """Read and validate a COCO-format JSON (local or URI), keeping only the listed images
    (a sequence of ids, or the URI of a file with one per line) and categories (names or ids)."""
    fs, path = filesystem_for(json_uri, endpoint_url=endpoint_url)
    source = redact_uri(json_uri)
    try:
        with fs.open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {source} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {source} is not valid JSON: {err}") from err
    if isinstance(data, dict) and categories is not None:
        data = _keep_categories(data, categories, source)
    if isinstance(data, dict) and image_ids is not None:
        if isinstance(image_ids, str):
            id_source = f"image id file {redact_uri(image_ids)}"
            image_ids = read_image_ids(image_ids, endpoint_url=endpoint_url)
        else:
            id_source = "the image id list"
        data = _keep_images(data, image_ids, source, id_source)
    return CocoAnnotations(data, source=source, on_error=on_error, require_ids=True)


def _keep_categories(data: dict, wanted: Sequence[str | int], source: str) -> dict:
    entries = data.get("categories")
    if not isinstance(entries, list):
        return data  # the validator names the fault
    by_name = {c.get("name"): c.get("id") for c in entries if isinstance(c, dict)}
    known_ids = set(by_name.values())
    keep = set()
    for item in wanted:
        cat_id = item if isinstance(item, int) else by_name.get(item)
        if cat_id is None or cat_id not in known_ids:
            raise ValueError(f"category {item!r} is not in {source} (it has: {', '.join(sorted(map(str, by_name)))})")
        keep.add(cat_id)
    return {
        **data,
        "categories": [c for c in entries if not isinstance(c, dict) or c.get("id") in keep],
        "annotations": [
            a for a in data.get("annotations") or [] if not isinstance(a, dict) or a.get("category_id") in keep
        ],
    }


def _keep_images(data: dict, wanted: Sequence[int], source: str, id_source: str) -> dict:
    keep = set(wanted)
    entries = data.get("images")
    if not isinstance(entries, list):
        return data
    present = {im.get("id") for im in entries if isinstance(im, dict)}
    missing = sorted(keep - present)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{id_source} lists {len(missing)} image ids that are not in {source}: {shown}")
    return {
        **data,
        "images": [im for im in entries if not isinstance(im, dict) or im.get("id") in keep],
        "annotations": [
            a for a in data.get("annotations") or [] if not isinstance(a, dict) or a.get("image_id") in keep
        ],
    }


def plan_shards(
    index: CocoAnnotations,
    images_uri: str,
    out_uri: str,
    *,
    images_per_shard: int = 1000,
    on_error: str = "raise",
    endpoint_url: str | None = None,
) -> list[ShardTask]:
    """Images sorted by id, split evenly into ``ceil(N / images_per_shard)`` shards: the
    same input always gives the same plan."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, got {images_per_shard}")
    total = len(index.images)
    count = math.ceil(total / images_per_shard)
    entries = [
        {
            **image,
            "annotations": [
                {key: ann[key] for key in ("id", "category_id", "iscrowd", "segmentation")} for ann in anns
            ],
        }
        for image, anns in zip(index.images, index.annotations)
    ]
    return [
        ShardTask(
            index=i,
            count=count,
            images=tuple(entries[i * total // count : (i + 1) * total // count]),
            images_uri=images_uri,
            out_uri=out_uri,
            on_error=on_error,
            endpoint_url=endpoint_url,
        )
        for i in range(count)
    ]


# --------------------------------------------------------------------------- the dataset


def prepare_dataset(
    json_uri: str,
    images_uri: str,
    out_uri: str,
    *,
    images_per_shard: int = 1000,
    on_error: str = "raise",
    endpoint_url: str | None = None,
    executor: Executor | None = None,
    progress: bool = True,
    name: str | None = None,
    image_ids: Sequence[int] | str | None = None,
    categories: Sequence[str | int] | None = None,
) -> Manifest:
    """Convert a COCO-format dataset to shards at ``out_uri`` and return its manifest.

    Args:
        json_uri: the annotation file (a local path or a URI).
        images_uri: the folder or prefix holding the images named by ``file_name``.
        out_uri: where the shards, ``report.json`` and (last) ``manifest.json`` go.
        images_per_shard: about this many images per shard.
        on_error: ``"raise"``: the first bad record (annotation or image) raises a ValueError
            naming it and no manifest is written; ``"skip"``: bad records are left out and
            listed in the manifest's ``skipped`` and in ``report.json``.
        endpoint_url: an S3-compatible endpoint for every ``s3://`` URI (not a secret).
        executor: maps :func:`convert_shard` over the shards to write (see
            :func:`local_executor`, :func:`serial_executor`, ``uniinst.ray.prepare.ray_executor``);
            default a local process pool.
        progress: log one line per finished shard at INFO (else at DEBUG).
        name: a name stored in the manifest's source (default: the last part of ``out_uri``).
        image_ids: keep only these images: ids, or the URI of a file with one id per line.
        categories: keep only these categories (names or ids) and their annotations.

    A rerun keeps every shard whose done marker matches the plan and whose bytes have the
    marker's sha256 (so each finished shard is read once), and writes the rest.
    """
    if on_error not in _ON_ERROR_MODES:
        raise ValueError(f"on_error must be one of {_ON_ERROR_MODES}, got {on_error!r}")
    level = logging.INFO if progress else logging.DEBUG
    src_fs, src_root = filesystem_for(images_uri, endpoint_url=endpoint_url)
    if isinstance(src_fs, LocalFileSystem) and not os.path.isdir(src_root):
        raise FileNotFoundError(f"image folder {images_uri} does not exist")
    index = load_annotations(
        json_uri, on_error=on_error, endpoint_url=endpoint_url, image_ids=image_ids, categories=categories
    )
    if not index.images:
        raise ValueError(f"no images to convert in {redact_uri(json_uri)} (after the image and category filters)")
    tasks = plan_shards(
        index, images_uri, out_uri, images_per_shard=images_per_shard, on_error=on_error, endpoint_url=endpoint_url
    )
    out_fs, out_root = filesystem_for(out_uri, endpoint_url=endpoint_url)
    results = _finished_shards(out_fs, out_root, tasks)
    todo = [task for task in tasks if task.index not in results]
    logger.log(
        level,
        "%s: %d shards planned, %d already written, %d to write",
        redact_uri(out_uri), len(tasks), len(results), len(todo),
    )

    start = time.perf_counter()
    written_bytes = 0
    for result in (executor or local_executor())(convert_shard, todo):
        results[result.index] = result
        written_bytes += result.info.bytes
        logger.log(
            level,
            "shard %d/%d done (%s: %d images, %.1f MB, %.1f MB/s)",
            len(results), len(tasks), result.info.path, result.info.num_images,
            result.info.bytes / 1e6, result.info.bytes / 1e6 / max(result.seconds, 1e-9),
        )
    if len(results) != len(tasks):
        raise RuntimeError(f"the executor returned {len(results)} of {len(tasks)} shards for {redact_uri(out_uri)}")
    if todo:
        elapsed = time.perf_counter() - start
        logger.log(level, "wrote %d shards, %.1f MB in %.1f s", len(todo), written_bytes / 1e6, elapsed)

    ordered = [results[i] for i in range(len(tasks))]
    skipped = index.skipped + [message for r in ordered for message in r.skipped]
    report = {
        "images_written": sum(r.info.num_images for r in ordered),
        "annotations_written": sum(r.info.num_annotations for r in ordered),
        "images_skipped": sum(len(r.skipped) for r in ordered),
        "annotations_skipped": len(index.skipped) + sum(r.annotations_skipped for r in ordered),
        "messages": skipped,
    }
    source = {
        "name": name or out_uri.rstrip("/").rsplit("/", 1)[-1],
        "json": redact_uri(json_uri),
        "images": redact_uri(images_uri),
        "images_per_shard": images_per_shard,
        "on_error": on_error,
    }
    if isinstance(image_ids, str):
        source["image_ids"] = redact_uri(image_ids)
    if categories is not None:
        source["categories"] = list(categories)
    manifest = Manifest(
        categories=index.categories,
        shards=[r.info for r in ordered],
        num_images=report["images_written"],
        num_annotations=report["annotations_written"],
        source=source,
        skipped=skipped,
    )
    _put_atomically(out_fs, join(out_root, REPORT_NAME), json.dumps(report, indent=2).encode())
    _put_atomically(out_fs, join(out_root, MANIFEST_NAME), manifest.to_json().encode())
    logger.log(
        level,
        "%s complete: %d images, %d annotations in %d shards; skipped %d images, %d annotations",
        join(redact_uri(out_uri), MANIFEST_NAME), manifest.num_images, manifest.num_annotations, len(tasks),
        report["images_skipped"], report["annotations_skipped"],
    )
    return manifest


def _finished_shards(fs: fsspec.AbstractFileSystem, root: str, tasks: Sequence[ShardTask]) -> dict[int, ShardResult]:
    """Make ``root`` ready for (re)writing ``tasks`` (see :func:`_clear_for_rerun`) and return
    the shards already written for this plan, by index: those whose done marker matches the
    plan and whose bytes still have the marker's sha256. The others lose their marker."""
    names = _clear_for_rerun(fs, root, tasks)
    finished = {}
    for task in tasks:
        if task.name not in names or task.name + DONE_SUFFIX not in names:
            continue
        done = _recorded_result(fs, root, task)
        if done is None:
            logger.info("%s does not match this plan: rewriting it", task.name)
            fs.rm_file(join(root, task.name + DONE_SUFFIX))
        else:
            finished[task.index] = done
    # Reading each finished shard once (in chunks, a few at a time) finds one that rotted or
    # was overwritten since: its size alone may not change.
    paths = [join(root, done.info.path) for done in finished.values()]
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        digests = list(pool.map(lambda path: file_digest(fs, path)[0], paths))
    for done, sha256 in zip(list(finished.values()), digests):
        if sha256 != done.info.sha256:
            logger.warning(
                "%s is corrupt (its sha256 is %s, its done marker says %s): rewriting it",
                done.info.path, sha256, done.info.sha256,
            )
            fs.rm_file(join(root, done.info.path + DONE_SUFFIX))
            del finished[done.index]
    return finished


def _clear_for_rerun(fs: fsspec.AbstractFileSystem, root: str, tasks: Sequence[ShardTask]) -> set[str]:
    """Remove the manifest and report (the dataset is incomplete until this run writes them
    again), then the temporary files of an earlier run (one killed while writing) and shards
    of another plan. Returns the names left in ``root``."""
    fs.makedirs(root, exist_ok=True)
    fs.invalidate_cache(root)  # another process may have written here since this one looked
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        names = set()
    for name in (MANIFEST_NAME, REPORT_NAME):
        if name in names:
            fs.rm_file(join(root, name))
    planned = {task.name for task in tasks} | {task.name + DONE_SUFFIX for task in tasks}
    stale = sorted(n for n in names if _TMP_MARK in n or (_SHARD_FILE.fullmatch(n) and n not in planned))
    for name in stale:
        logger.info("removing %s (a leftover of an earlier run)", name)
        fs.rm_file(join(root, name))
    return names - {MANIFEST_NAME, REPORT_NAME, *stale}


def _recorded_result(fs: fsspec.AbstractFileSystem, root: str, task: ShardTask) -> ShardResult | None:
    """What the done marker of ``task`` records, or None if it is unreadable, is for another
    plan or does not match the shard's size."""
    try:
        marker = json.loads(fs.cat_file(join(root, task.name + DONE_SUFFIX)))
        info = ShardInfo(**marker["info"])
        done = ShardResult(task.index, info, list(marker["skipped"]), int(marker["annotations_skipped"]))
        valid = (
            marker["fingerprint"] == task.fingerprint()
            and info.path == task.name
            and fs.size(join(root, task.name)) == info.bytes
        )
    except (ValueError, KeyError, TypeError):
        return None
    return done if valid else None


def parse_categories(text: str) -> list[str | int]:
    """``"person,3"`` -> ``["person", 3]``: comma-separated category names or ids."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"no categories in {text!r}")
    return [int(item) if item.isdigit() else item for item in items]


def format_summary(manifest: Manifest, out_uri: str) -> str:
    """A few lines saying where the dataset is and what it holds, for the command line."""
    lines = [
        f"manifest: {join(redact_uri(out_uri), MANIFEST_NAME)}",
        f"  {manifest.num_images} images, {manifest.num_annotations} annotations, "
        f"{len(manifest.categories)} categories in {len(manifest.shards)} shards "
        f"({sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB)",
        f"  skipped: {len(manifest.skipped)} records (report: {join(redact_uri(out_uri), REPORT_NAME)})",
    ]
    lines += [f"    {message}" for message in manifest.skipped[:20]]
    if len(manifest.skipped) > 20:
        lines.append(f"    ... and {len(manifest.skipped) - 20} more")
    return "\n".join(lines)

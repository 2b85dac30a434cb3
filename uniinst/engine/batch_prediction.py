"""Predicting a collection of images (files, folders, globs, object-storage prefixes) into
``predictions.jsonl``: one JSON object per image, written as it goes and resumable.

The output folder (a path or URI) holds ``parts/part-NNNNNN.jsonl`` (each written whole as a
chunk of images is done; a rerun skips every image they hold), then, once all are done,
``predictions.jsonl`` (one line per readable image, in input order), ``summary.json`` and,
with drawing, a PNG per image. An image that cannot be read is named in the summary and
skipped. The model is anything with ``predict(batch)``, ``transform``, ``label_names`` and
``category_ids``: a checkpoint's model or an exported program.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from uniinst.atomic_file import atomic_output
from uniinst.data.coco import CocoRecord
from uniinst.data.collate import collate
from uniinst.data.transforms import EvalTransform
from uniinst.evaluation.coco_results import instances_to_coco_results
from uniinst.redact import redact_uri
from uniinst.structures import Batch, Instances
from uniinst.visualize import draw_instances

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
PARTS = "parts"


class Predictor(Protocol):
    transform: EvalTransform
    label_names: list[str]
    category_ids: list[int]

    def predict(self, batch: Batch) -> list[Instances]: ...


def _is_uri(text: str) -> bool:
    return "://" in text


def list_images(inputs: Sequence[str], *, endpoint_url: str | None = None) -> list[str]:
    """The image files that ``inputs`` name, each once, in the order given (a folder's or a
    prefix's images sorted, found at any depth; a glob's sorted). An input that names nothing
    is an error naming it."""
    found: list[str] = []
    for text in inputs:
        if _is_uri(text):
            matches = _list_prefix(text, endpoint_url)
        elif Path(text).is_dir():
            matches = sorted(str(p) for p in Path(text).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif Path(text).is_file():
            matches = [text]
        else:
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not matches:
            raise ValueError(f"no images at {redact_uri(text)}")
        found.extend(matches)
    return list(dict.fromkeys(found))


def _list_prefix(uri: str, endpoint_url: str | None) -> list[str]:
    from uniinst.data.storage import filesystem_for

    fs, path = filesystem_for(uri, endpoint_url=endpoint_url)
    protocol = uri.split("://", 1)[0]
    if fs.isfile(path):
        return [uri]
    names = fs.find(path) if fs.exists(path) else []
    return sorted(f"{protocol}://{n}" for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)


def read_image(source: str, *, endpoint_url: str | None = None) -> np.ndarray:
    """An image file (path or URI) as uint8 RGB, turned as its EXIF orientation says (as a
    viewer shows it); a file that is not a readable image is a ValueError naming it."""
    try:
        if _is_uri(source):
            from uniinst.data.storage import filesystem_for

            fs, path = filesystem_for(source, endpoint_url=endpoint_url)
            data: Any = io.BytesIO(fs.cat_file(path))
        else:
            data = source
        with Image.open(data) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {redact_uri(source)}: {exc}") from exc


def predict_image(model: Predictor, image: np.ndarray) -> Instances:
    """The instances ``model`` finds in one uint8 RGB image, at its size."""
    h, w = image.shape[:2]
    none = np.zeros((0, h, w), np.uint8)
    record = CocoRecord(image=image, masks=none, labels=np.zeros(0, np.int64), image_id=0, file_name="",
                        crowd_masks=none)
    (instances,) = model.predict(collate([model.transform(record, np.random.default_rng(0))]))
    return instances


def image_record(file: str, image: np.ndarray, instances: Instances, model: Predictor) -> dict:
    """The ``predictions.jsonl`` object of one image: ``file``, ``height``, ``width`` and its
    ``instances``, each with ``label`` (the class name), ``category_id``, ``score``, ``bbox``
    ([x, y, w, h]) and ``segmentation`` (COCO RLE)."""
    results = instances_to_coco_results(instances, 0, model.category_ids)
    by_category = dict(zip(model.category_ids, model.label_names))
    return {
        "file": redact_uri(file),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "instances": [
            {"label": by_category[r["category_id"]], **{k: r[k] for k in ("category_id", "score", "bbox", "segmentation")}}
            for r in results
        ],
    }


def png_bytes(image: np.ndarray, instances: Instances, model: Predictor, score_thresh: float) -> bytes:
    out = io.BytesIO()
    Image.fromarray(draw_instances(image, instances, model.label_names, score_thresh=score_thresh)).save(out, "PNG")
    return out.getvalue()


@dataclass
class Outcome:
    """What became of one image: its record, or the reason it could not be read; and its
    drawing when asked for."""

    file: str
    record: dict | None = None
    error: str | None = None
    png: bytes | None = None

    def line(self) -> dict:
        return self.record if self.record is not None else {"file": redact_uri(self.file), "error": self.error}

    @classmethod
    def from_line(cls, file: str, line: str, *, png: bytes | None = None) -> Outcome:
        """The outcome whose :meth:`line` is the JSON ``line`` (as a replica sends it back)."""
        entry = json.loads(line)
        if "error" in entry:
            return cls(file, error=entry["error"], png=png or None)
        return cls(file, record=entry, png=png or None)


def predict_file(
    model: Predictor, file: str, *, endpoint_url: str | None = None, draw_thresh: float | None = None
) -> Outcome:
    """Read, predict and (with ``draw_thresh``) draw one image; an unreadable one is an
    :class:`Outcome` with its error, not an exception."""
    try:
        image = read_image(file, endpoint_url=endpoint_url)
    except ValueError as exc:
        return Outcome(file, error=str(exc))
    instances = predict_image(model, image)
    png = None if draw_thresh is None else png_bytes(image, instances, model, draw_thresh)
    return Outcome(file, record=image_record(file, image, instances, model), png=png)


class Destination:
    """A local folder or an object-storage prefix (written through fsspec) to put files under;
    every file appears whole or not at all."""

    def __init__(self, root: str, *, endpoint_url: str | None = None) -> None:
        self.root = root.rstrip("/")
        self._fs = None
        if _is_uri(root):
            from uniinst.data.storage import filesystem_for

            self._fs, self._path = filesystem_for(self.root, endpoint_url=endpoint_url)
        else:
            self._path = self.root

    def write(self, name: str, data: bytes) -> None:
        target = f"{self._path}/{name}"
        if self._fs is not None:
            self._fs.pipe_file(target, data)
            return
        with atomic_output(target) as f:
            f.write(data)

    def read(self, name: str) -> bytes:
        target = f"{self._path}/{name}"
        if self._fs is not None:
            return self._fs.cat_file(target)
        return Path(target).read_bytes()

    def names(self, folder: str) -> list[str]:
        """The files directly in ``folder``, sorted (none where it does not exist)."""
        target = f"{self._path}/{folder}"
        if self._fs is not None:
            return sorted(Path(p).name for p in self._fs.ls(target, detail=False)) if self._fs.exists(target) else []
        return sorted(p.name for p in Path(target).glob("*") if p.is_file() and not p.name.startswith("."))


@dataclass
class PredictionRun:
    """The state of one prediction job in its :class:`Destination`: the parts written so far,
    new parts as chunks finish, the final files at the end."""

    dest: Destination
    done: dict[str, dict] = field(default_factory=dict)
    parts: int = 0
    started: float = field(default_factory=time.perf_counter)
    new: int = 0

    @classmethod
    def open(cls, dest: Destination) -> PredictionRun:
        """The job in ``dest``, with the images earlier runs finished."""
        run = cls(dest)
        for name in dest.names(PARTS):
            run.parts += 1
            for line in dest.read(f"{PARTS}/{name}").decode().splitlines():
                entry = json.loads(line)
                run.done[entry["file"]] = entry
        return run

    def todo(self, files: Iterable[str]) -> list[str]:
        return [f for f in files if redact_uri(f) not in self.done]

    def add(self, outcomes: Sequence[Outcome], *, total: int) -> None:
        """Write a finished chunk: its part, then its drawings."""
        lines = [o.line() for o in outcomes]
        self.dest.write(f"{PARTS}/part-{self.parts:06d}.jsonl", "".join(json.dumps(e) + "\n" for e in lines).encode())
        self.parts += 1
        for outcome, entry in zip(outcomes, lines):
            self.done[entry["file"]] = entry
            if outcome.png is not None:
                self.dest.write(f"{Path(outcome.file).stem}.png", outcome.png)
        self.new += len(outcomes)
        rate = self.new / max(time.perf_counter() - self.started, 1e-9)
        logger.info("predicted %d/%d images (%.1f img/s)", len(self.done), total, rate)

    def finish(self, files: Sequence[str]) -> dict[str, Any]:
        """``predictions.jsonl`` (readable images, in the order of ``files``) and
        ``summary.json``; returns the summary."""
        entries = [self.done[redact_uri(f)] for f in files]
        readable = [e for e in entries if "error" not in e]
        self.dest.write("predictions.jsonl", "".join(json.dumps(e) + "\n" for e in readable).encode())
        elapsed = time.perf_counter() - self.started
        summary = {
            "images": len(files),
            "predicted": len(readable),
            "instances": sum(len(e["instances"]) for e in readable),
            "resumed": len(files) - self.new,
            "unreadable": [{"file": e["file"], "error": e["error"]} for e in entries if "error" in e],
            "seconds": round(elapsed, 2),
            "images_per_second": round(self.new / elapsed, 2) if self.new and elapsed > 0 else None,
        }
        self.dest.write("summary.json", json.dumps(summary, indent=2).encode())
        return summary


def chunked(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(
    model: Predictor,
    files: Sequence[str],
    dest: Destination,
    *,
    endpoint_url: str | None = None,
    draw_thresh: float | None = None,
    chunk: int = 16,
) -> dict[str, Any]:
    """Predict ``files`` in this process into ``dest`` (resuming what it holds); returns the
    summary."""
    run = PredictionRun.open(dest)
    for part in chunked(run.todo(files), chunk):
        run.add([predict_file(model, f, endpoint_url=endpoint_url, draw_thresh=draw_thresh) for f in part],
                total=len(files))
    return run.finish(files)


def format_summary(summary: dict[str, Any], dest: str) -> str:
    resumed = f", {summary['resumed']} done by an earlier run" if summary["resumed"] else ""
    rate = f" ({summary['images_per_second']} img/s)" if summary["images_per_second"] else ""
    return (
        f"{summary['predicted']} of {summary['images']} images predicted{resumed}, "
        f"{summary['instances']} instances, {len(summary['unreadable'])} unreadable{rate}: "
        f"{redact_uri(dest)}/predictions.jsonl"
    )

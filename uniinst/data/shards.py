"""The Parquet shard format of a dataset: one row per image, plus a JSON manifest.

A dataset at a URI (a local folder or an object-store prefix) is::

    <uri>/manifest.json          written last: its presence marks the dataset complete
    <uri>/shard-00000-of-00008.parquet
    ...

Each row holds the image's original encoded bytes (never re-encoded) and its annotations with
masks as compressed COCO RLE, so a row decodes to exactly the :class:`CocoRecord` that the
JSON reader gives for the same image.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

from uniinst.data.coco import CocoRecord
from uniinst.data.storage import filesystem_for, join

SCHEMA_VERSION = 1
FORMAT = "uniinst-shards"
MANIFEST_NAME = "manifest.json"

ANNOTATION_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int64()),
        ("iscrowd", pa.bool_()),
        ("rle", pa.binary()),  # compressed RLE counts; the size is the row's (height, width)
        ("bbox", pa.list_(pa.float64(), 4)),  # x, y, w, h as in COCO
        ("area", pa.float64()),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),
        ("annotations", pa.list_(ANNOTATION_TYPE)),
    ]
)


class ShardError(ValueError):
    """A shard that cannot be used: missing, truncated, corrupt, unreadable, or holding a row
    that does not decode. The one-line message names the shard and what is wrong with it."""

    def __init__(self, message: str) -> None:
        # One line, whatever the underlying error printed; kept apart from ``args``, which
        # frameworks that pass the error on (Ray Data) append their own lines to.
        self.message = " ".join(str(message).split())
        super().__init__(self.message)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.parquet"


@dataclass
class ShardInfo:
    path: str  # relative to the dataset URI
    num_images: int
    num_annotations: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """What a shard dataset holds. ``categories`` keep their original ids; contiguous class
    ids follow their order sorted by id, as in :class:`CocoDataset`."""

    categories: list[dict]
    shards: list[ShardInfo]
    num_images: int
    num_annotations: int
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT

    @property
    def contiguous_to_cat_id(self) -> list[int]:
        return sorted(c["id"] for c in self.categories)

    @property
    def cat_id_to_contiguous(self) -> dict[int, int]:
        return {cat_id: i for i, cat_id in enumerate(self.contiguous_to_cat_id)}

    @property
    def class_names(self) -> list[str]:
        names = {c["id"]: c["name"] for c in self.categories}
        return [names[i] for i in self.contiguous_to_cat_id]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} manifest")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{source}: schema version {data.get('schema_version')!r}, this uniinst reads {SCHEMA_VERSION}"
            )
        try:
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed manifest: {exc}") from exc


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> Manifest:
    """The manifest of the shard dataset at ``uri``; a clear error if it is absent (an
    unfinished or failed conversion leaves none)."""
    fs, root = filesystem_for(uri, endpoint_url=endpoint_url)
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {uri}: not a shard dataset, or its conversion did not finish"
        )
    with fs.open(path, "r") as f:
        return Manifest.from_json(f.read(), source=join(uri, MANIFEST_NAME))


def shard_uris(uri: str, manifest: Manifest) -> list[str]:
    return [join(uri, s.path) for s in manifest.shards]


def file_digest(fs: Any, path: str, *, chunk_size: int = 1 << 20) -> tuple[str, int]:
    """The sha256 and size of the file at ``path`` on ``fs``, read in chunks: a shard is
    never held whole in memory to check it."""
    sha, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def check_digest(sha256: str, size: int, *, expected_sha256: str, expected_bytes: int, where: str) -> None:
    """A :class:`ShardError` naming ``where`` unless a shard's sha256 and size are the ones its
    manifest records."""
    if size != expected_bytes:
        raise ShardError(f"{where} is {size} bytes but the manifest says {expected_bytes}: truncated or replaced")
    if sha256 != expected_sha256:
        raise ShardError(f"{where} is corrupt: its sha256 is {sha256}, the manifest says {expected_sha256}")


def verify_shard(fs: Any, path: str, info: ShardInfo, *, where: str) -> None:
    """A :class:`ShardError` naming ``where`` unless the file at ``path`` has the size and
    sha256 that ``info`` records."""
    sha256, size = file_digest(fs, path)
    check_digest(sha256, size, expected_sha256=info.sha256, expected_bytes=info.bytes, where=where)


def annotation_row(ann_id: int, category_id: int, iscrowd: bool, rle: Mapping[str, Any]) -> dict[str, Any]:
    """One annotation of a row, from a compressed RLE (``counts`` bytes or str)."""
    counts = rle["counts"]
    rle = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return {
        "id": int(ann_id),
        "category_id": int(category_id),
        "iscrowd": bool(iscrowd),
        "rle": rle["counts"],
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
    }


def decode_image(data: bytes, *, height: int, width: int, where: str) -> np.ndarray:
    """Decode encoded image bytes to uint8 RGB ``[H, W, 3]``, checking the stored size; a
    :class:`ShardError` naming ``where`` if they do not decode to it."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            size = pil.size
            pixels = np.asarray(pil.convert("RGB"), dtype=np.uint8).copy() if size == (width, height) else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ShardError(f"{where}: cannot decode the image bytes: {exc}") from exc
    if pixels is None:
        raise ShardError(f"{where}: image is {size[0]}x{size[1]} (WxH) but the row says {width}x{height}")
    return pixels


def decode_row(row: Mapping[str, Any], cat_id_to_contiguous: Mapping[int, int], *, where: str = "shard row") -> CocoRecord:
    """A shard row (a mapping with the :data:`SHARD_SCHEMA` fields) as a :class:`CocoRecord`;
    a :class:`ShardError` naming ``where`` and the image if it does not decode."""
    image_id = int(row["image_id"])
    height, width = int(row["height"]), int(row["width"])
    where = f"{where} (image id {image_id}, {row['file_name']})"
    image = decode_image(row["image"], height=height, width=width, where=where)
    anns = list(row["annotations"] if row["annotations"] is not None else [])
    if anns:
        rles = [{"size": [height, width], "counts": bytes(a["rle"])} for a in anns]
        try:
            masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        except Exception as exc:
            raise ShardError(f"{where}: cannot decode the RLE masks: {exc}") from exc
    else:
        masks = np.zeros((0, height, width), dtype=np.uint8)
    crowd = np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)
    try:
        labels = np.array([cat_id_to_contiguous[int(a["category_id"])] for a, c in zip(anns, crowd) if not c], np.int64)
    except KeyError as exc:
        raise ShardError(f"{where}: category id {exc.args[0]} is not in the manifest") from None
    return CocoRecord(
        image=image,
        masks=masks[~crowd],
        labels=labels,
        image_id=image_id,
        file_name=str(row["file_name"]),
        crowd_masks=masks[crowd],
    )

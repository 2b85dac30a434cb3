"""Preparing Parquet shards from COCO-format data: content, object storage, reruns, bad input,
OCHuman-style subsets, credentials, the Ray executor and the command line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.conftest import REPO, coco_tiny_root
from uniinst.cli import main
from uniinst.data.coco import CocoDataset
from uniinst.data.prepare import (
    DONE_SUFFIX,
    REPORT_NAME,
    convert_shard,
    local_executor,
    prepare_dataset,
    read_image_ids,
    serial_executor,
)
from uniinst.data.shards import MANIFEST_NAME, decode_row, read_manifest, shard_uris
from uniinst.data.storage import filesystem_for

COCO_TINY = coco_tiny_root()
needs_coco_tiny = pytest.mark.skipif(COCO_TINY is None, reason="coco_tiny data not found")

SQUARE = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]


def _write_jpeg(path: Path, height: int = 12, width: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def _small_coco(root: Path, num_images: int = 2) -> Path:
    """``num_images`` 12x16 JPEGs (ids 1..N, one square annotation each) and their JSON
    under ``root``; returns the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    ids = range(1, num_images + 1)
    for i in ids:
        _write_jpeg(root / "images" / f"{i}.jpg", seed=i)
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 12, "width": 16} for i in ids],
        "annotations": [
            {"id": 100 + i, "image_id": i, "category_id": 2, "segmentation": SQUARE, "bbox": [2, 2, 6, 4], "iscrowd": 0}
            for i in ids
        ],
        "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _rows(uri: str, endpoint_url: str | None = None) -> list[dict]:
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    rows = []
    for shard_uri in shard_uris(uri, manifest):
        fs, path = filesystem_for(shard_uri, endpoint_url=endpoint_url)
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def _assert_rows_match_json_reader(rows: list[dict], dataset: CocoDataset, cat_id_to_contiguous: dict) -> None:
    position = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    for row in rows:
        expected = dataset.load(position[row["image_id"]])
        assert row["image"] == (dataset.image_root / expected.file_name).read_bytes()
        got = decode_row(row, cat_id_to_contiguous)
        assert got.image_id == expected.image_id and got.file_name == expected.file_name
        np.testing.assert_array_equal(got.image, expected.image)
        np.testing.assert_array_equal(got.masks, expected.masks)
        np.testing.assert_array_equal(got.labels, expected.labels)
        np.testing.assert_array_equal(got.crowd_masks, expected.crowd_masks)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingExecutor:
    """Runs shards serially, remembering which it was asked to convert."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.converted: list[str] = []
        self.fail_after = fail_after

    def __call__(self, convert, tasks):
        for task in tasks:
            if self.fail_after is not None and len(self.converted) == self.fail_after:
                raise RuntimeError("killed")
            self.converted.append(task.name)
            yield convert(task)


# --------------------------------------------------------------------------- coco_tiny


@pytest.fixture(scope="module")
def coco_tiny_train() -> CocoDataset:
    if COCO_TINY is None:
        pytest.skip("coco_tiny data not found")
    return CocoDataset(COCO_TINY / "annotations" / "instances_train2017.json", COCO_TINY / "train2017")


@needs_coco_tiny
def test_coco_tiny_to_local_shards(coco_tiny_train, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare_dataset(
        str(coco_tiny_train.gt_json_path), str(coco_tiny_train.image_root), str(out),
        images_per_shard=32, executor=serial_executor,
    )
    assert (manifest.num_images, manifest.num_annotations, len(manifest.categories)) == (80, 705, 80)
    assert [s.path for s in manifest.shards] == [f"shard-0000{i}-of-00003.parquet" for i in range(3)]
    assert [s.num_images for s in manifest.shards] == [26, 27, 27]
    assert manifest.skipped == [] and manifest.class_names == coco_tiny_train.class_names
    assert read_manifest(str(out)).to_json() == manifest.to_json()
    for info in manifest.shards:
        data = (out / info.path).read_bytes()
        assert _sha256(data) == info.sha256 and len(data) == info.bytes

    rows = _rows(str(out))
    assert [r["image_id"] for r in rows] == sorted(coco_tiny_train.image_ids)
    assert sum(len(r["annotations"]) for r in rows) == 705
    assert sum(a["iscrowd"] for r in rows for a in r["annotations"]) == 6
    _assert_rows_match_json_reader(rows, coco_tiny_train, manifest.cat_id_to_contiguous)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report == {
        "images_written": 80, "annotations_written": 705, "images_skipped": 0, "annotations_skipped": 0, "messages": []
    }


@needs_coco_tiny
def test_coco_tiny_from_and_to_s3(coco_tiny_train, s3_server, s3_bucket, tmp_path):
    # A 12-image subset keeps the upload small: the JSON and the images go to the bucket too,
    # so both the source and the destination are read through the S3 endpoint.
    fs, _ = filesystem_for(s3_bucket, endpoint_url=s3_server)
    bucket = s3_bucket.removeprefix("s3://")
    subset = sorted(coco_tiny_train.image_ids)[::7]
    fs.put_file(str(coco_tiny_train.gt_json_path), f"{bucket}/src/ann.json")
    for image_id in subset:
        file_name = coco_tiny_train.load(coco_tiny_train.image_ids.index(image_id)).file_name
        fs.put_file(str(coco_tiny_train.image_root / file_name), f"{bucket}/src/images/{file_name}")

    out = f"{s3_bucket}/coco_tiny"
    manifest = prepare_dataset(
        f"{s3_bucket}/src/ann.json", f"{s3_bucket}/src/images", out,
        images_per_shard=5, endpoint_url=s3_server, executor=serial_executor, image_ids=subset,
    )
    assert manifest.num_images == len(subset) and len(manifest.shards) == 3
    fs.invalidate_cache()
    for info in manifest.shards:
        assert _sha256(fs.cat_file(f"{bucket}/coco_tiny/{info.path}")) == info.sha256
    assert not any(".tmp-" in p for p in fs.ls(f"{bucket}/coco_tiny", detail=False))
    rows = _rows(out, endpoint_url=s3_server)
    assert [r["image_id"] for r in rows] == subset
    _assert_rows_match_json_reader(rows, coco_tiny_train, manifest.cat_id_to_contiguous)

    # The same subset converted from local files to a local folder gives byte-identical shards.
    local = prepare_dataset(
        str(coco_tiny_train.gt_json_path), str(coco_tiny_train.image_root), str(tmp_path / "local"),
        images_per_shard=5, executor=serial_executor, image_ids=subset,
    )
    assert [s.sha256 for s in local.shards] == [s.sha256 for s in manifest.shards]


# --------------------------------------------------------------------------- reruns


def test_rerun_rewrites_only_missing_shards(tmp_path):
    json_path = _small_coco(tmp_path / "src", num_images=6)
    images, out = str(tmp_path / "src" / "images"), tmp_path / "out"

    first = CountingExecutor()
    manifest = prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=first)
    names = [s.path for s in manifest.shards]
    assert first.converted == names and len(names) == 3
    mtimes = {n: (out / n).stat().st_mtime_ns for n in names}

    (out / names[1]).unlink()
    (out / (names[1] + DONE_SUFFIX)).unlink()
    (out / f"{names[0]}.tmp-deadbeef").write_bytes(b"half a shard")
    second = CountingExecutor()
    again = prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=second)
    assert second.converted == [names[1]]
    assert again.to_json() == manifest.to_json()
    assert all((out / n).stat().st_mtime_ns == mtimes[n] for n in (names[0], names[2]))
    assert not list(out.glob("*.tmp-*"))

    third = CountingExecutor()
    unchanged = prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=third)
    assert unchanged.to_json() == manifest.to_json()
    assert third.converted == []

    # A different plan replaces the shards of the old one.
    single = prepare_dataset(str(json_path), images, str(out), images_per_shard=6, executor=serial_executor)
    assert [s.path for s in single.shards] == ["shard-00000-of-00001.parquet"]
    only = "shard-00000-of-00001.parquet"
    assert sorted(p.name for p in out.glob("shard-*")) == [only, only + DONE_SUFFIX]


def test_run_killed_before_the_manifest_is_incomplete_then_resumes(tmp_path):
    json_path = _small_coco(tmp_path / "src", num_images=6)
    images, out = str(tmp_path / "src" / "images"), tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=CountingExecutor(fail_after=1))
    assert (out / "shard-00000-of-00003.parquet").is_file() and not (out / MANIFEST_NAME).exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_manifest(str(out))

    resumed = CountingExecutor()
    manifest = prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=resumed)
    assert resumed.converted == ["shard-00001-of-00003.parquet", "shard-00002-of-00003.parquet"]
    assert manifest.num_images == 6 and read_manifest(str(out)).num_images == 6


def _flip_middle(data: bytes, count: int = 64) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + count]) + data[middle + count :]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_rerun_rewrites_a_corrupt_shard_of_the_same_size(tmp_path, caplog, request, store):
    json_path = _small_coco(tmp_path / "src", num_images=6)
    images = str(tmp_path / "src" / "images")
    endpoint = request.getfixturevalue("s3_server") if store == "s3" else None
    out = f"{request.getfixturevalue('s3_bucket')}/out" if store == "s3" else str(tmp_path / "out")
    kwargs = dict(images_per_shard=2, endpoint_url=endpoint, progress=False)
    manifest = prepare_dataset(str(json_path), images, out, executor=serial_executor, **kwargs)
    fs, root = filesystem_for(out, endpoint_url=endpoint)
    victim = manifest.shards[1].path
    original = fs.cat_file(f"{root}/{victim}")
    fs.pipe_file(f"{root}/{victim}", _flip_middle(original))

    rerun = CountingExecutor()
    with caplog.at_level(logging.DEBUG, logger="uniinst.data.prepare"):
        again = prepare_dataset(str(json_path), images, out, executor=rerun, **kwargs)
    assert rerun.converted == [victim]
    assert fs.cat_file(f"{root}/{victim}") == original
    assert again.to_json() == manifest.to_json()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"{victim} is corrupt")
    assert "3 shards planned, 2 already written, 1 to write" in caplog.text


def test_rerun_removes_the_old_manifest_before_touching_shards(tmp_path):
    json_path = _small_coco(tmp_path / "src", num_images=4)
    images, out = str(tmp_path / "src" / "images"), tmp_path / "out"
    prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=serial_executor)
    (out / "shard-00001-of-00002.parquet").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset(str(json_path), images, str(out), images_per_shard=2, executor=CountingExecutor(fail_after=0))
    assert not (out / MANIFEST_NAME).exists() and not (out / REPORT_NAME).exists()


def _live_children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``, from /proc (zombies excluded)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue  # it ended while we looked
        if int(ppid) == pid and state != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _many_images(root: Path, count: int, size: int = 512) -> Path:
    """``count`` synthetic images (hard links to 4 distinct ones) and their JSON; returns its path."""
    from uniinst.data.synthetic import generate_synthetic_coco

    source = generate_synthetic_coco(root, splits={"base": 4}, image_size=size, num_classes=4, seed=0)["base"]
    data = json.loads(source.read_text())
    (root / "many").mkdir()
    images, annotations = [], []
    for k in range(count):
        base = data["images"][k % len(data["images"])]
        name = f"{k:05d}.jpg"
        os.link(root / "base" / base["file_name"], root / "many" / name)
        images.append({**base, "id": k + 1, "file_name": name})
        for ann in (a for a in data["annotations"] if a["image_id"] == base["id"]):
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": k + 1})
    path = root / "many.json"
    path.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return path


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_sigkilled_prepare_takes_its_workers_along_and_the_rerun_cleans_up(tmp_path):
    json_path = _many_images(tmp_path / "src", count=1200)
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "uniinst.cli", "prepare", "--json", str(json_path), "--images",
        str(tmp_path / "src" / "many"), "--out", str(out), "--workers", "2", "--images-per-shard", "400",
    ]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Both workers are writing a shard (a staged file each) when the parent is killed.
        _wait_for(lambda: len(list(out.glob("*.tmp-*"))) >= 2, 120, "two shards being written")
        children = _live_children(first.pid)
        assert len(children) >= 2, children
        first.kill()
        first.wait()
        _wait_for(lambda: not any(map(_alive, children)), 3, f"the workers {sorted(children)} to end")
    finally:
        first.kill()
        first.wait()
    assert list(out.glob("*.tmp-*")) and not (out / MANIFEST_NAME).exists()

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "(a leftover of an earlier run)" in rerun.stderr
    assert read_manifest(str(out)).num_images == 1200
    assert not list(out.glob("*.tmp-*"))


# --------------------------------------------------------------------------- bad input


def _bad_case(root: Path, case: str) -> Path:
    """Two good images with one annotation each, then one fault."""
    json_path = _small_coco(root, num_images=2)
    data = json.loads(json_path.read_text())
    bad_ann = {"id": 7, "image_id": 1, "category_id": 2, "segmentation": SQUARE, "iscrowd": 0}
    if case == "missing image":
        data["images"][1]["file_name"] = "missing.jpg"
    elif case == "undecodable image":
        (root / "images" / "2.jpg").write_bytes(b"not a jpeg at all" * 20)
    elif case == "truncated image":
        # Big enough that the header survives: only decoding every pixel finds the cut.
        _write_jpeg(root / "images" / "2.jpg", 96, 128, seed=2)
        data["images"][1].update(height=96, width=128)
        blob = (root / "images" / "2.jpg").read_bytes()
        (root / "images" / "2.jpg").write_bytes(blob[: 2 * len(blob) // 3])
    elif case == "unknown image":
        data["annotations"].append({**bad_ann, "image_id": 9})
    elif case == "unknown category":
        data["annotations"].append({**bad_ann, "category_id": 3})
    elif case == "degenerate polygon":
        data["annotations"].append({**bad_ann, "segmentation": [[1.0, 1.0, 3.0, 3.0, 5.0, 5.0]]})
    elif case == "bbox out of bounds":
        data["annotations"].append({**bad_ann, "bbox": [10.0, 2.0, 8.0, 4.0]})  # reaches x=18 in a 16-wide image
    json_path.write_text(json.dumps(data))
    return json_path


BAD_CASES = {
    # case: (pattern naming the record, images skipped, annotations skipped)
    "missing image": (r"image id 2 \(.*missing\.jpg\): file does not exist", 1, 1),
    "undecodable image": (r"image id 2 \(.*2\.jpg\): cannot decode", 1, 1),
    "truncated image": (r"image id 2 \(.*2\.jpg\): cannot decode", 1, 1),
    "unknown image": (r"annotation 7 .*ann\.json.*unknown image 9", 0, 1),
    "unknown category": (r"annotation 7 .*ann\.json.*unknown category 3", 0, 1),
    "degenerate polygon": (r"annotation 7 .*zero area", 0, 1),
    "bbox out of bounds": (r"annotation 7 .*'bbox'.*outside", 0, 1),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_naming_the_record_and_writes_no_manifest(tmp_path, case):
    pattern = BAD_CASES[case][0]
    json_path = _bad_case(tmp_path / "src", case)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=pattern):
        prepare_dataset(str(json_path), str(tmp_path / "src" / "images"), str(out), executor=serial_executor)
    assert not (out / MANIFEST_NAME).exists() and not (out / REPORT_NAME).exists()
    assert not list(out.glob("*.tmp-*")) and not list(out.glob("*.parquet"))


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_skipped_counted_and_listed(tmp_path, case):
    pattern, images_skipped, annotations_skipped = BAD_CASES[case]
    json_path = _bad_case(tmp_path / "src", case)
    out = tmp_path / "out"
    manifest = prepare_dataset(
        str(json_path), str(tmp_path / "src" / "images"), str(out), on_error="skip", executor=serial_executor
    )
    assert len(manifest.skipped) == 1 and re.search(pattern, manifest.skipped[0])
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["images_skipped"] == images_skipped and report["annotations_skipped"] == annotations_skipped
    assert report["images_written"] == 2 - images_skipped == manifest.num_images
    # Both good annotations are kept unless their image was the one skipped.
    assert report["annotations_written"] == 2 - images_skipped == manifest.num_annotations
    assert report["messages"] == manifest.skipped
    assert [r["image_id"] for r in _rows(str(out))] == [1, 2][: 2 - images_skipped]


def test_bbox_check_also_in_the_json_reader(tmp_path):
    json_path = _bad_case(tmp_path, "bbox out of bounds")
    with pytest.raises(ValueError, match=r"annotation 7 .*bbox.*outside the 16x12"):
        CocoDataset(json_path, tmp_path / "images")
    ds = CocoDataset(json_path, tmp_path / "images", on_error="skip")
    assert len(ds.skipped) == 1 and ds.num_instances(0) == 1
    # Within the 1-pixel tolerance is fine: [0, 0, 16.9, 12.9] in a 16x12 image.
    data = json.loads(json_path.read_text())
    data["annotations"][-1]["bbox"] = [-0.9, -0.5, 16.9, 12.9]
    json_path.write_text(json.dumps(data))
    assert CocoDataset(json_path, tmp_path / "images").num_instances(0) == 2


def test_shards_need_unique_annotation_ids(tmp_path):
    json_path = _small_coco(tmp_path / "src", num_images=2)
    data = json.loads(json_path.read_text())
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotation 101 .*twice"):
        prepare_dataset(
            str(json_path), str(tmp_path / "src" / "images"), str(tmp_path / "out"), executor=serial_executor
        )


# --------------------------------------------------------------------------- OCHuman


def _ochuman_like(root: Path) -> tuple[Path, dict[int, list[np.ndarray]]]:
    """Three images, person masks as string RLE with keypoints (as OCHuman's COCO-style
    files), plus one non-person annotation; returns the JSON and the person masks by image."""
    (root / "images").mkdir(parents=True)
    height, width = 20, 24
    images, annotations, masks = [], [], {}
    rng = np.random.default_rng(0)
    for k, image_id in enumerate((10, 11, 12)):
        name = f"{image_id:06d}.jpg"
        _write_jpeg(root / "images" / name, height, width, seed=image_id)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        masks[image_id] = []
        for j in range(2):
            mask = np.zeros((height, width), np.uint8)
            y, x = rng.integers(0, 10, 2)
            mask[y : y + 8, x : x + 10] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({
                "id": 1000 + 10 * k + j, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask.sum()),
                "keypoints": [0] * 51, "num_keypoints": 0,
            })
            masks[image_id].append(mask)
        annotations.append({
            "id": 2000 + k, "image_id": image_id, "category_id": 2, "iscrowd": 0, "segmentation": SQUARE,
        })
    categories = [
        {"id": 1, "name": "person", "supercategory": "person", "keypoints": ["nose"] * 17, "skeleton": [[1, 2]]},
        {"id": 2, "name": "dog"},
    ]
    path = root / "ochuman_coco_format_val_range_0.00_1.00.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, masks


def test_ochuman_like_subset_of_people(tmp_path):
    json_path, masks = _ochuman_like(tmp_path / "src")
    ids_file = tmp_path / "val_ids.txt"
    ids_file.write_text("12\n\n10\n")
    out = tmp_path / "out"
    manifest = prepare_dataset(
        str(json_path), str(tmp_path / "src" / "images"), str(out), executor=serial_executor,
        image_ids=str(ids_file), categories=["person"],
    )
    assert manifest.categories == [{"id": 1, "name": "person"}] and manifest.class_names == ["person"]
    assert (manifest.num_images, manifest.num_annotations) == (2, 4)
    assert manifest.source["image_ids"] == str(ids_file) and manifest.source["categories"] == ["person"]
    rows = _rows(str(out))
    assert [r["image_id"] for r in rows] == [10, 12]
    for row in rows:
        record = decode_row(row, manifest.cat_id_to_contiguous)
        np.testing.assert_array_equal(record.masks, np.stack(masks[row["image_id"]]))
        assert record.labels.tolist() == [0, 0] and len(record.crowd_masks) == 0


def test_image_id_file_errors_name_the_file_and_line(tmp_path):
    json_path, _ = _ochuman_like(tmp_path / "src")
    bad = tmp_path / "ids.txt"
    bad.write_text("10\n11\nlucky 13\n")
    with pytest.raises(ValueError, match=r"ids\.txt, line 3: .*'lucky 13'"):
        read_image_ids(str(bad))
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("10\n99\n")
    with pytest.raises(ValueError, match=r"unknown\.txt lists 1 image ids that are not in .*: 99"):
        prepare_dataset(str(json_path), str(tmp_path / "src" / "images"), str(tmp_path / "out"), image_ids=str(unknown))
    with pytest.raises(ValueError, match=r"category 'cat' is not in"):
        prepare_dataset(str(json_path), str(tmp_path / "src" / "images"), str(tmp_path / "out"), categories=["cat"])


# --------------------------------------------------------------------------- credentials


def test_credentials_in_uris_are_never_stored_or_logged(tmp_path, caplog):
    # The memory filesystem takes any key, so a URI carrying credentials really is read.
    json_path = _small_coco(tmp_path / "src", num_images=2)
    data = json.loads(json_path.read_text())
    data["images"][1]["file_name"] = "missing.jpg"
    mem = fsspec.filesystem("memory")
    json_uri = "memory://alice:s3cr3t@store/ann.json?X-Amz-Signature=t0ken"
    images_uri = "memory://alice:s3cr3t@store/images"
    mem.pipe_file(json_uri.removeprefix("memory://"), json.dumps(data).encode())
    mem.pipe_file(images_uri.removeprefix("memory://") + "/1.jpg", (tmp_path / "src" / "images" / "1.jpg").read_bytes())
    out = tmp_path / "out"
    try:
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(ValueError) as raised:
                prepare_dataset(json_uri, images_uri, str(out), executor=serial_executor)
            manifest = prepare_dataset(json_uri, images_uri, str(out), on_error="skip", executor=serial_executor)
    finally:
        mem.rm("alice:s3cr3t@store", recursive=True)
    assert "image id 2 (memory://store/images/missing.jpg)" in str(raised.value)
    assert manifest.source["json"] == "memory://store/ann.json" and manifest.source["images"] == "memory://store/images"
    assert manifest.num_images == 1 and len(manifest.skipped) == 1
    logs = [r.getMessage() for r in caplog.records if r.name.startswith("uniinst")]  # fsspec's own debug lines aside
    stored = [p.read_bytes().decode("latin-1") for p in out.iterdir()] + [str(raised.value)] + logs
    assert logs and not [text for text in stored if "s3cr3t" in text or "t0ken" in text or "alice" in text]


# --------------------------------------------------------------------------- executors


def test_ray_executor_matches_local(ray_local, s3_server, s3_bucket, tmp_path, capsys):
    from uniinst.ray.prepare import ray_executor

    json_path = _small_coco(tmp_path / "src", num_images=4)
    images = str(tmp_path / "src" / "images")
    local = prepare_dataset(
        str(json_path), images, str(tmp_path / "local"), images_per_shard=2, executor=local_executor(2)
    )
    # The Ray tasks write to S3: the endpoint travels with each task, the credentials with the workers' environment.
    out = f"{s3_bucket}/ray"
    remote = prepare_dataset(
        str(json_path), images, out, images_per_shard=2, endpoint_url=s3_server, executor=ray_executor(max_in_flight=1)
    )
    assert len(local.shards) == 2
    assert [s.sha256 for s in remote.shards] == [s.sha256 for s in local.shards]
    assert read_manifest(out, endpoint_url=s3_server).to_json() == remote.to_json()

    bad = _bad_case(tmp_path / "bad", "undecodable image")
    with pytest.raises(ValueError, match=r"image id 2 \(.*2\.jpg\): cannot decode"):
        prepare_dataset(str(bad), str(tmp_path / "bad" / "images"), str(tmp_path / "bad_out"), executor=ray_executor())

    # The job entrypoint and `uniinst prepare --ray` join the running Ray and write the same shards.
    job = runpy.run_path(str(REPO / "ray_jobs" / "prepare_data.py"), run_name="prepare_data")
    args = ["--json", str(json_path), "--images", images, "--images-per-shard", "2"]
    assert job["main"]([*args, "--out", f"{out}_job", "--endpoint-url", s3_server]) == 0
    assert main(["prepare", *args, "--out", str(tmp_path / "cli"), "--ray"]) == 0
    assert "4 images, 4 annotations" in capsys.readouterr().out
    for manifest in (read_manifest(f"{out}_job", endpoint_url=s3_server), read_manifest(str(tmp_path / "cli"))):
        assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in local.shards]


def test_convert_shard_alone_writes_shard_then_marker(tmp_path):
    from uniinst.data.coco import CocoAnnotations
    from uniinst.data.prepare import plan_shards

    json_path = _small_coco(tmp_path / "src", num_images=3)
    index = CocoAnnotations(json.loads(json_path.read_text()), source=str(json_path), require_ids=True)
    tasks = plan_shards(index, str(tmp_path / "src" / "images"), str(tmp_path / "out"), images_per_shard=2)
    assert [len(t.images) for t in tasks] == [1, 2]
    assert [t.name for t in tasks] == ["shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"]
    (tmp_path / "out").mkdir()
    result = convert_shard(tasks[1])
    marker = json.loads((tmp_path / "out" / (tasks[1].name + DONE_SUFFIX)).read_text())
    assert marker["info"]["sha256"] == _sha256((tmp_path / "out" / tasks[1].name).read_bytes()) == result.info.sha256
    assert marker["fingerprint"] == tasks[1].fingerprint() != tasks[0].fingerprint()
    assert (result.info.num_images, result.info.num_annotations) == (2, 2)


# --------------------------------------------------------------------------- command line


def test_cli_prepare_skip_mode(tmp_path, capsys):
    json_path = _bad_case(tmp_path / "src", "missing image")
    out = tmp_path / "out"
    code = main([
        "prepare", "--json", str(json_path), "--images", str(tmp_path / "src" / "images"), "--out", str(out),
        "--on-error", "skip", "--images-per-shard", "1", "--workers", "1",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"manifest: {out / MANIFEST_NAME}" in printed
    assert "1 images, 1 annotations, 2 categories in 2 shards" in printed
    assert "skipped: 1 records" in printed and "missing.jpg" in printed
    assert read_manifest(str(out)).num_images == 1


def test_cli_prepare_errors(tmp_path, capsys):
    json_path, _ = _ochuman_like(tmp_path / "src")
    images = str(tmp_path / "src" / "images")
    missing = tmp_path / "nope" / "ann.json"
    assert main(["prepare", "--json", str(missing), "--images", images, "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err
    ids = tmp_path / "ids.txt"
    ids.write_text("10\n1x\n")
    code = main([
        "prepare", "--json", str(json_path), "--images", images, "--out", str(tmp_path / "out"),
        "--image-ids", str(ids), "--categories", "person", "--workers", "1",
    ])
    assert code == 2 and "ids.txt, line 2" in capsys.readouterr().err
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_prepare_imports_no_ray():
    code = "import sys, uniinst.data.prepare, uniinst.data.shards, uniinst.cli; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

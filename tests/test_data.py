"""Tests of the data pipeline: COCO reading, transforms, collation, sampling and the synthetic generator."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from uniinst.data.coco import CocoDataset, CocoRecord
from uniinst.data.collate import collate, make_targets
from uniinst.data.dataset import InstanceSegDataset, TrainingSampler, build_eval_loader, build_train_loader
from uniinst.data.synthetic import generate_synthetic_coco, occlusion_stats
from uniinst.data.transforms import EvalTransform, ResizeShortestEdge, TrainTransform, resize_masks
from uniinst.structures import Sample


def _coco_tiny_root() -> Path | None:
    candidates = [Path(os.environ["UNIINST_COCO_TINY"])] if os.environ.get("UNIINST_COCO_TINY") else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny")
    for root in candidates:
        if (root / "annotations" / "instances_val2017.json").is_file():
            return root
    return None


COCO_TINY = _coco_tiny_root()
needs_coco_tiny = pytest.mark.skipif(COCO_TINY is None, reason="coco_tiny data not found")


@pytest.fixture(scope="module")
def coco_tiny() -> dict[str, CocoDataset]:
    assert COCO_TINY is not None
    return {
        split: CocoDataset(COCO_TINY / "annotations" / f"instances_{split}2017.json", COCO_TINY / f"{split}2017")
        for split in ("train", "val")
    }


# --------------------------------------------------------------------------- coco_tiny


@needs_coco_tiny
@pytest.mark.parametrize("split, expected", [("train", 705), ("val", 815)])
def test_coco_tiny_every_annotation_is_read(coco_tiny, split, expected):
    ds = coco_tiny[split]
    raw = json.loads(ds.gt_json_path.read_text())
    assert len(raw["annotations"]) == expected
    assert len(ds) == 80 and ds.image_ids == sorted(im["id"] for im in raw["images"])
    assert ds.skipped == []
    total, crowd_total = 0, 0
    for index in range(len(ds)):
        record = ds.load(index)
        h, w = record.image.shape[:2]
        assert record.masks.shape[1:] == (h, w) and record.crowd_masks.shape[1:] == (h, w)
        assert record.masks.dtype == np.uint8 and record.labels.dtype == np.int64
        assert len(record.labels) == len(record.masks) == ds.num_instances(index)
        assert set(np.unique(record.masks)) <= {0, 1}
        if len(record.crowd_masks):
            assert record.crowd_masks.reshape(len(record.crowd_masks), -1).any(axis=1).all()
        total += len(record.masks) + len(record.crowd_masks)
        crowd_total += len(record.crowd_masks)
    assert total == expected
    assert crowd_total == sum(1 for a in raw["annotations"] if a["iscrowd"])


@needs_coco_tiny
def test_coco_tiny_masks_match_pycocotools(coco_tiny):
    from pycocotools.coco import COCO

    ds = coco_tiny["val"]
    coco = COCO(str(ds.gt_json_path))
    crowd_image = next(a["image_id"] for a in coco.dataset["annotations"] if a["iscrowd"])
    for image_id in (ds.image_ids[0], ds.image_ids[17], crowd_image):
        record = ds.load(ds.image_ids.index(image_id))
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=image_id)), key=lambda a: a["id"])
        plain = [a for a in anns if not a["iscrowd"]]
        crowd = [a for a in anns if a["iscrowd"]]
        # The reader keeps the JSON order of annotations; compare as sets of (label, mask).
        expected = {(ds.cat_id_to_contiguous[a["category_id"]], coco.annToMask(a).tobytes()) for a in plain}
        got = {(int(lab), m.tobytes()) for lab, m in zip(record.labels, record.masks)}
        assert got == expected
        assert {m.tobytes() for m in record.crowd_masks} == {coco.annToMask(a).tobytes() for a in crowd}
    assert len(ds.load(ds.image_ids.index(crowd_image)).crowd_masks) >= 1


@needs_coco_tiny
def test_coco_tiny_categories_and_sizes(coco_tiny):
    ds = coco_tiny["train"]
    raw = json.loads(ds.gt_json_path.read_text())
    cat_ids = sorted(c["id"] for c in raw["categories"])
    assert len(ds.categories) == 80 and ds.contiguous_to_cat_id == cat_ids
    assert max(cat_ids) == 90  # COCO's ids have gaps, the contiguous ones do not
    assert all(ds.cat_id_to_contiguous[c] == i for i, c in enumerate(ds.contiguous_to_cat_id))
    assert ds.class_names[0] == "person" and [c["id"] for c in ds.categories] == cat_ids
    info = {im["id"]: im for im in raw["images"]}
    record = ds.load(5)
    assert record.image.dtype == np.uint8 and record.image.shape == (
        info[record.image_id]["height"],
        info[record.image_id]["width"],
        3,
    )
    assert record.file_name == info[record.image_id]["file_name"]


# --------------------------------------------------------------------------- bad input


def _write_jpeg(path: Path, height: int = 12, width: int = 16) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, quality=95)


def _tiny_coco(tmp_path: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    """A 12x16 image folder and a JSON naming it; returns the JSON path."""
    (tmp_path / "images").mkdir(exist_ok=True)
    _write_jpeg(tmp_path / "images" / "a.jpg")
    data = {
        "images": images or [{"id": 1, "file_name": "a.jpg", "height": 12, "width": 16}],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


SQUARE = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]


def test_reads_all_segmentation_formats(tmp_path):
    # 12x16 image, column-major RLE: skip 14 pixels, set 5 (column 1, rows 2..6), rest off.
    uncompressed = {"size": [12, 16], "counts": [14, 5, 12 * 16 - 19]}
    expected_rle = np.zeros((12, 16), dtype=np.uint8)
    expected_rle[2:7, 1] = 1
    compressed = mask_utils.encode(np.asfortranarray(expected_rle))
    compressed = {"size": [12, 16], "counts": compressed["counts"].decode("ascii")}
    path = _tiny_coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 5, "segmentation": SQUARE, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": compressed, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": uncompressed, "iscrowd": 1},
        ],
    )
    ds = CocoDataset(str(path), str(tmp_path / "images"))
    assert ds.class_names == ["a", "b"] and ds.cat_id_to_contiguous == {2: 0, 5: 1}
    record = ds.load(0)
    assert isinstance(record, CocoRecord)
    assert record.labels.tolist() == [1, 0]
    assert record.masks[0].sum() > 0 and record.masks[0][4, 5] == 1 and record.masks[0][10, 12] == 0
    np.testing.assert_array_equal(record.masks[1], expected_rle)
    np.testing.assert_array_equal(record.crowd_masks, expected_rle[None])
    assert ds.gt_json_path == path


def test_unknown_category_names_annotation(tmp_path):
    path = _tiny_coco(tmp_path, [{"id": 77, "image_id": 1, "category_id": 3, "segmentation": SQUARE}])
    with pytest.raises(ValueError, match=r"annotation 77 .*ann\.json.*category_id"):
        CocoDataset(path, tmp_path / "images")


def test_unknown_image_names_annotation(tmp_path):
    path = _tiny_coco(tmp_path, [{"id": 78, "image_id": 9, "category_id": 2, "segmentation": SQUARE}])
    with pytest.raises(ValueError, match=r"annotation 78 .*ann\.json.*image_id"):
        CocoDataset(path, tmp_path / "images")


@pytest.mark.parametrize(
    "segmentation, reason",
    [
        ([[1.0, 1.0, 5.0, 5.0]], "coordinates"),  # two points
        ([[1.0, 1.0, 3.0, 3.0, 5.0, 5.0]], "zero area"),  # collinear
        ([], "empty"),
        ({"size": [12, 16], "counts": [12 * 16]}, "zero area"),
        ({"size": [10, 16], "counts": [160]}, "size"),
    ],
)
def test_degenerate_segmentation_names_annotation(tmp_path, segmentation, reason):
    path = _tiny_coco(tmp_path, [{"id": 79, "image_id": 1, "category_id": 2, "segmentation": segmentation}])
    with pytest.raises(ValueError, match=rf"annotation 79 .*{reason}"):
        CocoDataset(path, tmp_path / "images")


def test_skip_mode_counts_bad_annotations(tmp_path):
    path = _tiny_coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 2, "segmentation": SQUARE},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": SQUARE},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [[1.0, 1.0, 5.0, 5.0]]},
        ],
    )
    ds = CocoDataset(path, tmp_path / "images", on_error="skip")
    assert len(ds.skipped) == 2
    assert "annotation 2" in ds.skipped[0] and "annotation 3" in ds.skipped[1]
    assert len(ds.load(0).masks) == 1
    with pytest.raises(ValueError, match="on_error"):
        CocoDataset(path, tmp_path / "images", on_error="ignore")


@pytest.mark.parametrize(
    "polygon",
    [
        [20.0, 2.0, 28.0, 2.0, 28.0, 6.0, 20.0, 6.0],  # right of the 16-wide image
        [2.0, -9.0, 8.0, -9.0, 8.0, -1.0, 2.0, -1.0],  # above it
        [-10.0, 2.0, 0.3, 2.0, 0.3, 6.0, -10.0, 6.0],  # reaches in by less than a pixel centre
    ],
)
def test_polygon_outside_its_image_names_annotation_image_and_file(tmp_path, polygon):
    path = _tiny_coco(tmp_path, [{"id": 80, "image_id": 1, "category_id": 2, "segmentation": [polygon]}])
    with pytest.raises(ValueError, match=r"annotation 80 in .*ann\.json: .*polygon 0 lies outside image 1 \(16x12"):
        CocoDataset(path, tmp_path / "images")


def test_polygon_slightly_past_the_border_is_kept_and_one_outside_skipped(tmp_path):
    # COCO polygons reach a little past the border: the part inside counts.
    past_border = [[-0.8, -0.5, 16.6, -0.5, 16.6, 12.4, -0.8, 12.4]]
    outside = [[20.0, 2.0, 28.0, 2.0, 28.0, 6.0, 20.0, 6.0]]
    path = _tiny_coco(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 2, "segmentation": past_border},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [SQUARE[0], outside[0]]},
        ],
    )
    ds = CocoDataset(path, tmp_path / "images", on_error="skip")
    assert len(ds.skipped) == 1 and "annotation 2" in ds.skipped[0] and "polygon 1 lies outside" in ds.skipped[0]
    assert ds.load(0).masks.shape == (1, 12, 16) and ds.load(0).masks[0].all()


def _train_json_like(synth_data: Path, out: Path, keep) -> Path:
    """The synthetic training JSON with its annotations passed through ``keep``."""
    data = json.loads((synth_data / "annotations" / "instances_train.json").read_text())
    data["annotations"] = keep(data["annotations"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "instances_train.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "keep, contents",
    [
        (lambda anns: [], r"8 images, 0 annotations\)"),
        (lambda anns: [{**a, "iscrowd": 1} for a in anns[:3]], r"8 images, 3 annotations, all crowd\)"),
    ],
)
def test_training_on_a_file_without_usable_annotations_names_it(synth_data, tmp_path, keep, contents):
    from conftest import tiny_config
    from uniinst.engine.local import train_local

    train_json = _train_json_like(synth_data, tmp_path / "ann", keep)
    cfg = tiny_config(
        synth_data, tmp_path / "run", f"data.train.json={train_json}", "data.val.json=", "solver.max_iter=1"
    )
    message = rf"instances_train\.json: no image with a usable annotation to train on \({contents}"
    with pytest.raises(ValueError, match=message):
        train_local(cfg)


def test_missing_image_folder_and_file(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 12, "width": 16},
        {"id": 2, "file_name": "missing.jpg", "height": 12, "width": 16},
    ]
    path = _tiny_coco(tmp_path, [], images)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CocoDataset(path, tmp_path / "nowhere")
    ds = CocoDataset(path, tmp_path / "images")
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg.*image id 2"):
        ds.load(1)


def test_corrupt_and_mis_sized_images_name_the_file(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 12, "width": 16},
        {"id": 2, "file_name": "garbage.jpg", "height": 12, "width": 16},
        {"id": 3, "file_name": "truncated.jpg", "height": 120, "width": 160},
        {"id": 4, "file_name": "a.jpg", "height": 16, "width": 12},
    ]
    path = _tiny_coco(tmp_path, [], images)
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    _write_jpeg(tmp_path / "big.jpg", 120, 160)
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    ds = CocoDataset(path, tmp_path / "images")
    assert ds.load(0).image.shape == (12, 16, 3)
    with pytest.raises(ValueError, match=r"garbage\.jpg.*image id 2"):
        ds.load(1)
    with pytest.raises(ValueError, match=r"truncated\.jpg.*image id 3"):
        ds.load(2)
    with pytest.raises(ValueError, match=r"a\.jpg.*image id 4"):
        ds.load(3)


# --------------------------------------------------------------------------- transforms


def test_resize_shortest_edge_sizes():
    rng = np.random.default_rng(0)
    assert ResizeShortestEdge([800], 1333).get_size(480, 640, rng) == (800, 1067)
    assert ResizeShortestEdge([800], 1333).get_size(640, 480, rng) == (1067, 800)
    # 100x1000 at short 800 would be 800x8000: capped to long side 1333, short 100 * 1333/1000.
    assert ResizeShortestEdge([800], 1333).get_size(100, 1000, rng) == (133, 1333)
    multi = ResizeShortestEdge((640, 672, 704), 1333)
    shorts = {min(multi.get_size(480, 640, rng)) for _ in range(60)}
    assert shorts == {640, 672, 704}


def _record(height: int = 20, width: int = 30) -> CocoRecord:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((2, height, width), dtype=np.uint8)
    masks[0, 2:9, 3:7] = 1
    masks[1, 10:18, 20:29] = 1
    image[masks[0] == 1] = (255, 0, 0)
    return CocoRecord(
        image=image, masks=masks, labels=np.array([3, 1]), image_id=42, file_name="x.jpg", crowd_masks=masks[:0]
    )


def test_flip_is_consistent_between_image_and_masks():
    record = _record()
    rng = np.random.default_rng(0)
    plain = TrainTransform(short_edge=(20,), flip_prob=0.0)(record, rng)
    flipped = TrainTransform(short_edge=(20,), flip_prob=1.0)(record, rng)
    assert plain.image.shape == (3, 20, 30) and plain.image.dtype == torch.uint8
    torch.testing.assert_close(plain.image, torch.from_numpy(record.image).permute(2, 0, 1))
    torch.testing.assert_close(flipped.image, plain.image.flip(-1))
    torch.testing.assert_close(flipped.masks, plain.masks.flip(-1))
    # The red square and its mask move together: columns 3..6 become 23..26.
    assert flipped.masks[0, 2:9, 23:27].all() and flipped.masks[0].sum() == 28
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None]
    assert (flipped.image[:, flipped.masks[0].bool()] == red).all()
    assert flipped.labels.tolist() == [3, 1] and flipped.orig_size == (20, 30) and flipped.image_id == 42


def test_resize_keeps_binary_masks_and_drops_vanished_instances():
    record = _record(40, 40)
    record.masks = np.zeros((2, 40, 40), dtype=np.uint8)
    record.masks[0, 8:32, 4:20] = 1
    record.masks[1, 1, 1] = 1  # a single pixel the 4x downscale never samples
    small = resize_masks(record.masks, (10, 10))
    assert set(np.unique(small)) <= {0, 1} and small[0].sum() == 6 * 4
    sample = EvalTransform(short_edge=10)(record, np.random.default_rng(0))
    assert isinstance(sample, Sample)
    assert sample.image.shape == (3, 10, 10) and sample.masks.shape == (1, 10, 10)
    assert sample.labels.tolist() == [3] and sample.labels.dtype == torch.int64
    assert sample.orig_size == (40, 40)


# --------------------------------------------------------------------------- collate


def _sample(height: int, width: int, boxes: list[tuple[int, int, int, int]], image_id: int = 0) -> Sample:
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8)
    for g, (y1, y2, x1, x2) in enumerate(boxes):
        masks[g, y1:y2, x1:x2] = 1
    image = torch.randint(1, 255, (3, height, width), dtype=torch.uint8)
    return Sample(image, masks, torch.arange(len(boxes), dtype=torch.int64), image_id, (2 * height, 2 * width))


def test_collate_pads_to_32_and_builds_targets():
    samples = [_sample(70, 50, [(3, 7, 5, 10), (60, 70, 0, 50)], 1), _sample(40, 90, [(0, 40, 89, 90)], 2)]
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 96, 96) and batch.images.dtype == torch.uint8
    assert batch.image_sizes == [(70, 50), (40, 90)] and batch.orig_sizes == [(140, 100), (80, 180)]
    assert batch.image_ids == [1, 2]
    torch.testing.assert_close(batch.images[0, :, :70, :50], samples[0].image)
    assert batch.images[0, :, 70:].sum() == 0 and batch.images[0, :, :, 50:].sum() == 0
    for sample, targets in zip(samples, batch.targets):
        padded = torch.zeros((len(sample.masks), 96, 96), dtype=torch.uint8)
        padded[:, : sample.masks.shape[1], : sample.masks.shape[2]] = sample.masks
        assert targets.masks.shape == (len(sample.masks), 24, 24) and targets.masks.dtype == torch.float32
        torch.testing.assert_close(targets.masks, padded[:, 2::4, 2::4].float())
    # Rows 3..6, columns 5..9: box (5, 3, 10, 7), centre (7.5, 5.0).
    torch.testing.assert_close(batch.targets[0].boxes, torch.tensor([[5.0, 3.0, 10.0, 7.0], [0.0, 60.0, 50.0, 70.0]]))
    torch.testing.assert_close(batch.targets[0].centers, torch.tensor([[7.5, 5.0], [25.0, 65.0]]))
    torch.testing.assert_close(batch.targets[1].boxes, torch.tensor([[89.0, 0.0, 90.0, 40.0]]))


def test_make_targets_centre_of_mass_matches_loop():
    mask = torch.zeros((1, 9, 11), dtype=torch.uint8)
    mask[0, 1:3, 2:9] = 1  # an L shape: a bar and a leg
    mask[0, 3:8, 2:4] = 1
    targets = make_targets(mask, torch.tensor([4]), (32, 32))
    sx = sy = n = 0.0
    for r in range(9):
        for c in range(11):
            if mask[0, r, c]:
                sx, sy, n = sx + c + 0.5, sy + r + 0.5, n + 1
    torch.testing.assert_close(targets.centers, torch.tensor([[sx / n, sy / n]]))
    torch.testing.assert_close(targets.boxes, torch.tensor([[2.0, 1.0, 9.0, 8.0]]))
    assert targets.labels.dtype == torch.int64 and targets.masks.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        make_targets(torch.zeros((1, 4, 4), dtype=torch.uint8), torch.tensor([0]), (32, 32))


def test_collate_single_image_without_instances():
    batch = collate([_sample(33, 20, [])])
    assert batch.images.shape == (1, 3, 64, 32)
    targets = batch.targets[0]
    assert len(targets) == 0 and targets.labels.dtype == torch.int64
    assert targets.masks.shape == (0, 16, 8) and targets.boxes.shape == (0, 4) and targets.centers.shape == (0, 2)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("size", [10, 11])
def test_training_sampler_ranks_partition_each_epoch(size):
    world = 2
    streams = [iter(TrainingSampler(size, seed=3, rank=r, world_size=world)) for r in range(world)]
    interleaved = [next(streams[g % world]) for g in range(3 * size)]
    # Rank streams interleaved give one process's stream: the same global batches.
    assert interleaved == list(itertools.islice(TrainingSampler(size, seed=3), 3 * size))
    epochs = [interleaved[e * size : (e + 1) * size] for e in range(3)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(size))  # no index twice in an epoch, across ranks
        by_rank = [epoch[(r - e * size) % world :: world] for r in range(world)]
        assert not set(by_rank[0]) & set(by_rank[1])
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_training_sampler_continues_the_global_stream_after_a_resize():
    # Two ranks trained 3 batches of 2 (12 images); three ranks take over from image 12.
    full = list(itertools.islice(TrainingSampler(10, seed=1), 40))
    streams = [iter(TrainingSampler(10, seed=1, rank=r, world_size=3, start_position=12)) for r in range(3)]
    assert [next(streams[g % 3]) for g in range(24)] == full[12:36]


def test_training_sampler_is_deterministic_and_resumable():
    def take(n, **kwargs):
        return list(itertools.islice(TrainingSampler(13, **kwargs), n))

    assert take(40, seed=5) == take(40, seed=5)
    assert take(40, seed=5) != take(40, seed=6)
    for start in (0, 7, 13, 30):
        assert take(20, seed=5, start=start) == take(start + 20, seed=5)[start:]
        sharded = dict(seed=5, rank=1, world_size=3)
        assert take(9, start=start, **sharded) == take(start + 9, **sharded)[start:]
    with pytest.raises(ValueError):
        TrainingSampler(1, world_size=2)


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco(out, splits={"train": 6}, image_size=64, max_instances=4, seed=11)
    return out


def test_train_loader_resumes_exactly(tiny_synthetic):
    source = CocoDataset(tiny_synthetic / "annotations" / "instances_train.json", tiny_synthetic / "train")
    dataset = InstanceSegDataset(source, TrainTransform(short_edge=(48, 64, 80), max_size=100), seed=2)
    full = list(itertools.islice(build_train_loader(dataset, batch_size=2, seed=4), 5))  # crosses epochs
    resumed = list(itertools.islice(build_train_loader(dataset, batch_size=2, seed=4, start_iter=3), 2))
    for a, b in zip(full[3:], resumed):
        assert a.image_ids == b.image_ids
        torch.testing.assert_close(a.images, b.images)
        torch.testing.assert_close(a.targets[0].masks, b.targets[0].masks)
    # An image seen in two epochs gets fresh augmentation draws (epoch is part of the seed).
    sizes = {}
    for batch in full:
        for image_id, size in zip(batch.image_ids, batch.image_sizes):
            sizes.setdefault(image_id, set()).add(size)
    assert any(len(s) > 1 for s in sizes.values())
    evaluated = list(build_eval_loader(InstanceSegDataset(source, EvalTransform(short_edge=64)), batch_size=4))
    assert [i for b in evaluated for i in b.image_ids] == source.image_ids


def test_skip_empty_uses_the_json(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 12, "width": 16},
        {"id": 2, "file_name": "not_there.jpg", "height": 12, "width": 16},
        {"id": 3, "file_name": "a.jpg", "height": 12, "width": 16},
    ]
    crowd = {"size": [12, 16], "counts": [14, 5, 173]}
    path = _tiny_coco(
        tmp_path,
        [
            {"id": 1, "image_id": 3, "category_id": 2, "segmentation": SQUARE},
            {"id": 2, "image_id": 2, "category_id": 2, "segmentation": crowd, "iscrowd": 1},
        ],
        images,
    )
    source = CocoDataset(path, tmp_path / "images")
    assert len(InstanceSegDataset(source, EvalTransform(short_edge=12))) == 3
    kept = InstanceSegDataset(source, EvalTransform(short_edge=12), skip_empty=True)
    assert len(kept) == 1 and kept[0].image_id == 3 and kept[0].masks.shape == (1, 12, 16)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic(tmp_path):
    kwargs = dict(splits={"train": 3, "val": 2}, image_size=(48, 64), num_classes=8, max_instances=5)
    first = generate_synthetic_coco(tmp_path / "a", seed=1, **kwargs)
    second = generate_synthetic_coco(tmp_path / "b", seed=1, **kwargs)
    other = generate_synthetic_coco(tmp_path / "c", seed=2, **kwargs)
    assert set(first) == {"train", "val"}
    assert first["train"] == tmp_path / "a" / "annotations" / "instances_train.json"
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()
        for image in sorted((tmp_path / "a" / split).glob("*.jpg")):
            a = np.asarray(Image.open(image))
            b = np.asarray(Image.open(tmp_path / "b" / split / image.name))
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="num_classes"):
        generate_synthetic_coco(tmp_path / "d", num_classes=9)


def test_synthetic_classes_are_the_shapes_named_in_order(tmp_path):
    paths = generate_synthetic_coco(
        tmp_path, splits={"val": 6}, image_size=96, num_classes=2, shapes=("ring", "cross", "circle"),
        min_instances=1, max_instances=1, seed=3,
    )
    ds = CocoDataset(paths["val"], tmp_path / "val")
    assert ds.class_names == ["ring", "cross"]
    for index in range(len(ds)):
        record = ds.load(index)
        (mask,), (label,) = record.masks, record.labels
        rows, cols = np.nonzero(mask)
        centre = mask[(rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2]
        # A ring's hole and a cross's arms: the centre of its box is empty for a ring only.
        assert centre == (ds.class_names[label] == "cross")
    with pytest.raises(ValueError, match="distinct names among circle"):
        generate_synthetic_coco(tmp_path / "b", shapes=("circle", "blob"))
    with pytest.raises(ValueError, match="num_classes must be between 1 and the 2 shapes"):
        generate_synthetic_coco(tmp_path / "c", num_classes=3, shapes=("circle", "ring"))


def test_synthetic_annotations_are_visible_disjoint_masks(tiny_synthetic):
    ds = CocoDataset(tiny_synthetic / "annotations" / "instances_train.json", tiny_synthetic / "train")
    assert ds.class_names == ["circle", "square", "triangle", "ellipse"] and ds.contiguous_to_cat_id == [1, 2, 3, 4]
    raw = json.loads(ds.gt_json_path.read_text())
    bbox_of = {a["id"]: a["bbox"] for a in raw["annotations"]}
    assert len(ds) == 6
    for index in range(len(ds)):
        record = ds.load(index)
        assert record.image.shape == (64, 64, 3) and 1 <= len(record.masks) <= 4
        assert record.masks.sum(axis=0).max() <= 1  # one visible owner per pixel
        assert (record.masks.reshape(len(record.masks), -1).sum(axis=1) >= 20).all()
    first = ds.load(0).masks[0]
    rows, cols = np.nonzero(first)
    ann = min((a for a in raw["annotations"] if a["image_id"] == ds.image_ids[0]), key=lambda a: a["id"])
    assert bbox_of[ann["id"]] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    assert ann["area"] == first.sum()


def test_heavy_occlusion_split_overlaps_more(tmp_path):
    kwargs = dict(splits={"val": 16}, image_size=96, min_instances=3, max_instances=5, seed=0)
    normal = occlusion_stats(generate_synthetic_coco(tmp_path / "n", occlusion="normal", **kwargs)["val"])
    heavy = occlusion_stats(generate_synthetic_coco(tmp_path / "h", occlusion="heavy", **kwargs)["val"])
    assert normal["num_images"] == heavy["num_images"] == 16
    assert heavy["overlap_fraction"] > 0.4 and heavy["overlap_fraction"] > normal["overlap_fraction"] + 0.25
    assert heavy["mean_max_iou"] > normal["mean_max_iou"]


def test_occlusion_stats_by_hand(tmp_path):
    # Image 1: boxes A, B with IoU 16*10 / (20*10 + 16*10 - 160) = 0.8; C apart. Image 2: a lone box.
    anns = [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 20, 10]},
        {"id": 2, "image_id": 1, "bbox": [4, 0, 16, 10]},
        {"id": 3, "image_id": 1, "bbox": [50, 50, 5, 5]},
        {"id": 4, "image_id": 2, "bbox": [0, 0, 5, 5]},
    ]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": anns, "categories": []}))
    stats = occlusion_stats(path)
    assert stats["num_images"] == 2 and stats["num_instances"] == 4
    assert stats["overlap_fraction"] == pytest.approx(0.5)
    assert stats["mean_max_iou"] == pytest.approx(0.4)


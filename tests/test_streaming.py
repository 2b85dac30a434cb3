"""Streaming shard datasets with Ray Data: exact round trips through S3, the stream's batches,
epochs and resume, failures, training and evaluation from shards."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY, _free_port, coco_tiny_root
from pycocotools import mask as mask_utils

from uniinst.cli import main
from uniinst.data.coco import CocoDataset
from uniinst.data.collate import collate
from uniinst.data.prepare import prepare_dataset, serial_executor
from uniinst.data.shards import ShardError, decode_row, read_manifest
from uniinst.data.storage import filesystem_for
from uniinst.data.stream_plan import StreamPosition
from uniinst.data.transforms import EvalTransform, TrainTransform
from uniinst.engine.checkpoint import checkpoint_name, load_checkpoint
from uniinst.engine.local import train_local
from uniinst.engine.metrics import read_metrics
from uniinst.structures import Batch, Sample

COCO_TINY = coco_tiny_root()
needs_coco_tiny = pytest.mark.skipif(COCO_TINY is None, reason="coco_tiny data not found")


def _prepare(json_path, images, out, **kwargs):
    return prepare_dataset(str(json_path), str(images), str(out), executor=serial_executor, progress=False, **kwargs)


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.image_ids == b.image_ids
    assert a.image_sizes == b.image_sizes and a.orig_sizes == b.orig_sizes
    assert a.images.dtype == b.images.dtype and torch.equal(a.images, b.images)
    assert len(a.targets) == len(b.targets)
    for ta, tb in zip(a.targets, b.targets):
        for name in ("labels", "masks", "point_masks", "boxes", "centers"):
            x, y = getattr(ta, name), getattr(tb, name)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


def _take(stream, n):
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


# --------------------------------------------------------------------------- no Ray needed


def test_library_modules_import_no_ray():
    code = (
        "import sys, uniinst.data.shards, uniinst.data.prepare, uniinst.engine.local, uniinst.cli; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _random_sample(rng, h, w, num, image_id):
    masks = np.zeros((num, h, w), np.uint8)
    for g in range(num):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        masks[g, y : y + rng.integers(2, h - y), x : x + rng.integers(2, w - x)] = 1
        masks[g] &= rng.random((h, w)) < 0.8
        masks[g, y, x] = 1
    return Sample(
        image=torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)),
        masks=torch.from_numpy(masks),
        labels=torch.from_numpy(rng.integers(0, 5, num).astype(np.int64)),
        image_id=image_id,
        orig_size=(h * 2, w * 2),
    )


def test_stream_collate_equals_collate():
    from uniinst.ray.data import collate_stream, to_stream_sample

    rng = np.random.default_rng(0)
    # Odd sizes (not multiples of 4) and an image without instances.
    samples = [_random_sample(rng, 37, 50, 3, 1), _random_sample(rng, 64, 29, 0, 2), _random_sample(rng, 45, 61, 5, 3)]
    expected = collate(samples)
    got = collate_stream([to_stream_sample(s) for s in samples])
    _assert_batches_equal(got, expected)
    assert expected.images.shape == (3, 3, 64, 64)
    # What the stream ships is 16x smaller than the full masks.
    shipped = to_stream_sample(samples[0]).masks
    assert shipped.dtype == torch.uint8 and shipped.shape == (3, 10, 13)
    _assert_batches_equal(
        collate_stream([to_stream_sample(s) for s in samples], size_divisibility=64), collate(samples, size_divisibility=64)
    )


def test_label_to_category_matches_names_or_requires_the_same_classes():
    from uniinst.data.shards import Manifest
    from uniinst.ray.evaluate import label_to_category

    manifest = Manifest(categories=[{"id": 7, "name": "b"}, {"id": 1, "name": "person"}], shards=[], num_images=0, num_annotations=0)
    assert label_to_category(manifest, num_classes=2) == [1, 7]
    assert label_to_category(manifest, num_classes=3, class_names=["cat", "person", "b"]) == [-1, 1, 7]
    with pytest.raises(ValueError, match="2 categories"):
        label_to_category(manifest, num_classes=3)
    with pytest.raises(ValueError, match="none of the model's classes"):
        label_to_category(manifest, num_classes=1, class_names=["dog"])


def test_train_on_shards_checks_the_number_of_classes(synth_data, tmp_path):
    from conftest import tiny_config

    shards = tmp_path / "shards"
    _prepare(synth_data / "annotations" / "instances_train.json", synth_data / "train", shards, images_per_shard=4)
    cfg = tiny_config(synth_data, tmp_path / "run", "data.train.json=", f"data.train.shards={shards}", "model.num_classes=7")
    from uniinst.ray.shard_split import open_split

    with pytest.raises(ValueError, match="num_classes=7.*4 categories"):
        train_local(cfg, open_split=open_split)
    # The core's own opener reads COCO JSON only, and says what reads shards.
    with pytest.raises(ValueError, match="^data.train.shards: shard datasets are read by the Ray layer; pass "):
        train_local(cfg)


# --------------------------------------------------------------------------- coco_tiny through S3


@pytest.fixture(scope="module")
def coco_tiny_s3(s3_server, tmp_path_factory):
    """16 coco_tiny train images as shards on the S3 endpoint (4 shards), and the JSON reader."""
    if COCO_TINY is None:
        pytest.skip("coco_tiny data not found")
    json_path = COCO_TINY / "annotations" / "instances_train2017.json"
    reader = CocoDataset(json_path, COCO_TINY / "train2017")
    subset = sorted(reader.image_ids)[::5][:16]
    bucket = f"stream-{uuid.uuid4().hex[:8]}"
    fs, _ = filesystem_for(f"s3://{bucket}", endpoint_url=s3_server)
    fs.mkdir(bucket)
    uri = f"s3://{bucket}/coco_tiny"
    manifest = _prepare(json_path, COCO_TINY / "train2017", uri, images_per_shard=4, endpoint_url=s3_server, image_ids=subset)
    assert manifest.num_images == 16
    return uri, manifest, reader, subset


@needs_coco_tiny
def test_coco_tiny_rows_from_s3_decode_to_the_json_readers_records(ray_local, s3_server, coco_tiny_s3):
    from uniinst.ray.data import read_shards

    uri, manifest, reader, subset = coco_tiny_s3
    ds, got_manifest = read_shards(uri, endpoint_url=s3_server)
    assert got_manifest.num_images == 16
    rows = list(ds.iter_rows())
    assert [r["image_id"] for r in rows] == subset
    for row in rows:
        record = decode_row(row, manifest.cat_id_to_contiguous)
        expected = reader.load(reader.image_ids.index(row["image_id"]))
        assert record.file_name == expected.file_name
        assert np.array_equal(record.image, expected.image)
        assert np.array_equal(record.masks, expected.masks) and np.array_equal(record.labels, expected.labels)
        assert np.array_equal(record.crowd_masks, expected.crowd_masks)


@needs_coco_tiny
def test_coco_tiny_streams_from_s3_as_the_json_reader_batches(ray_local, s3_server, coco_tiny_s3):
    from uniinst.ray.train_stream import TrainStream

    uri, _, reader, subset = coco_tiny_s3
    transform = EvalTransform(short_edge=96, max_size=160)
    stream = TrainStream(
        uri, batch_size=4, transform=transform, endpoint_url=s3_server, shuffle_files=False, shuffle_buffer_size=0
    )
    batches = _take(stream, 4)
    kept = [i for i in subset if reader.num_instances(reader.image_ids.index(i)) > 0]
    assert [i for b in batches for i in b.image_ids] == kept
    rng = np.random.default_rng(0)
    for batch in batches:
        samples = [transform(reader.load(reader.image_ids.index(i)), rng) for i in batch.image_ids]
        _assert_batches_equal(batch, collate(samples))


# --------------------------------------------------------------------------- epochs, seeds, resume


@pytest.fixture(scope="module")
def synth_shards(synth_data, tmp_path_factory):
    """The synthetic train (8 images, 4 shards) and val (4 images, 2 shards) sets as local shards."""
    root = tmp_path_factory.mktemp("synth_shards")
    for split in ("train", "val"):
        _prepare(synth_data / "annotations" / f"instances_{split}.json", synth_data / split, root / split, images_per_shard=2)
    return root


def _synth_stream(uri, seed, **kwargs):
    from uniinst.ray.train_stream import TrainStream

    transform = TrainTransform(short_edge=(48, 64), max_size=64, flip_prob=0.5)
    return TrainStream(str(uri), batch_size=2, transform=transform, seed=seed, shuffle_buffer_size=3, **kwargs)


def test_epochs_reshuffle_reproducibly_and_resume_exactly(ray_local, synth_shards):
    uri = synth_shards / "train"
    num_images = read_manifest(str(uri)).num_images  # 8, all with instances
    straight = _take(_synth_stream(uri, seed=5), 8)  # two epochs of 4 batches
    epoch0 = [i for b in straight[:4] for i in b.image_ids]
    epoch1 = [i for b in straight[4:] for i in b.image_ids]
    assert len(epoch0) == num_images and sorted(epoch0) == sorted(epoch1) == sorted(set(epoch0))
    assert epoch0 != epoch1

    again = _take(_synth_stream(uri, seed=5), 8)
    for a, b in zip(straight, again):
        _assert_batches_equal(a, b)  # same order and the same augmentation
    other = _take(_synth_stream(uri, seed=6), 4)
    assert [i for b in other for i in b.image_ids] != epoch0

    # Resuming after 5 batches continues with batch 5 (inside epoch 1) exactly.
    resumed = _take(_synth_stream(uri, seed=5, start_iter=5), 3)
    for a, b in zip(resumed, straight[5:]):
        _assert_batches_equal(a, b)


def test_image_split_ranks_take_the_global_stream_of_one_process(ray_local, synth_shards):
    from uniinst.ray.train_stream import TrainStream

    uri, world = str(synth_shards / "train"), 3
    kw = dict(
        transform=TrainTransform(short_edge=(48, 64), max_size=64, flip_prob=0.5), seed=5, shuffle_buffer_size=3,
        split="images",
    )
    one = _take(TrainStream(uri, batch_size=world, **kw), 4)  # 12 images: an epoch and a half
    ranks = [_take(TrainStream(uri, batch_size=1, rank=r, world_size=world, **kw), 4) for r in range(world)]
    for k, batch in enumerate(one):
        parts = [ranks[r][k] for r in range(world)]
        assert batch.image_ids == [p.image_ids[0] for p in parts]
        for i, part in enumerate(parts):
            h, w = part.image_sizes[0]
            assert torch.equal(batch.images[i, :, :h, :w], part.images[0, :, :h, :w])  # same augmentation
            assert torch.equal(batch.targets[i].labels, part.targets[0].labels)
    epoch0 = [i for b in one for i in b.image_ids][:8]
    assert len(set(epoch0)) == 8  # no image reaches two ranks within an epoch

    resumed = _take(TrainStream(uri, batch_size=1, rank=1, world_size=world, start_iter=2, **kw), 2)
    for a, b in zip(resumed, ranks[1][2:]):
        _assert_batches_equal(a, b)
    # A checkpoint's position taken with 3 ranks, continued by one process.
    state = TrainStream(uri, batch_size=1, world_size=world, **kw).state_after(2)
    assert state == {"split": "images", "images": 6}
    rest = _take(TrainStream(uri, batch_size=1, resume=state, **kw), 2)
    assert [b.image_ids[0] for b in rest] == [i for b in one for i in b.image_ids][6:8]


def test_shard_split_ranks_train_on_their_own_pieces_and_resume_at_another_size(ray_local, synth_shards):
    from uniinst.ray.train_stream import TrainStream

    uri = str(synth_shards / "train")  # 8 images in 4 shards of 2
    kw = dict(transform=TrainTransform(short_edge=(48, 64), max_size=64, flip_prob=0.5), seed=5, shuffle_buffer_size=3)
    streams = [TrainStream(uri, batch_size=1, rank=r, world_size=2, **kw) for r in range(2)]
    plan = streams[0].plan
    position = plan.start(StreamPosition(), 2)
    ranks = [_take(s, 6) for s in streams]  # an epoch and a half of 4 images a rank
    for r, batches in enumerate(ranks):
        part = plan.rank_epoch(position, r)
        assert [b.image_ids[0] for b in batches[:4]] == part.order
        assert len(part.shards) == 2  # the 2 shards of its 4 images, not all 4
    epoch0 = [b.image_ids[0] for r in range(2) for b in ranks[r][:4]]
    assert sorted(epoch0) == sorted(plan.epoch_images(0))  # every image once

    # Same size: rank 1 resumed after 2 batches continues exactly.
    state = streams[1].state_after(2)
    assert state == {"split": "shards", "epoch": 0, "segments": [[2, 2]]}
    resumed = _take(TrainStream(uri, batch_size=1, rank=1, world_size=2, resume=state, **kw), 4)
    for a, b in zip(resumed, ranks[1][2:]):
        _assert_batches_equal(a, b)  # same images, order and augmentation
    # One process resumed from that position trains on the 4 images the two ranks had left
    # of epoch 0, each augmented as it would have been, then on all of epoch 1.
    alone = _take(TrainStream(uri, batch_size=1, resume=state, **kw), 12)
    left = {b.image_ids[0] for r in range(2) for b in ranks[r][2:4]}
    assert {b.image_ids[0] for b in alone[:4]} == left
    assert sorted(b.image_ids[0] for b in alone[4:]) == sorted(plan.epoch_images(1))
    by_id = {b.image_ids[0]: b for r in range(2) for b in ranks[r][2:4]}
    for batch in alone[:4]:
        _assert_batches_equal(batch, by_id[batch.image_ids[0]])


def test_the_scheduling_loop_of_every_shard_dataset_is_paced(ray_local, synth_shards, monkeypatch):
    import uniinst.ray.data as ray_data

    ds, manifest = ray_data.read_shards(str(synth_shards / "train"))
    step = ray_data.DecodeStep(TrainTransform(short_edge=(48,), max_size=64), manifest.cat_id_to_contiguous, ["#0"])
    decoded = ray_data.decode_rows(ds, step)
    assert ray_data.PacedSchedulingLoop in decoded.context.custom_execution_callback_classes

    # time.sleep is the time module's, shared with Ray's own threads: count this thread's calls.
    slept: list[float] = []
    here, sleep = threading.get_ident(), ray_data.time.sleep
    monkeypatch.setattr(ray_data.time, "sleep", lambda s: slept.append(s) if threading.get_ident() == here else sleep(s))
    loop = ray_data.PacedSchedulingLoop()
    loop.on_execution_step(None)  # a step that returns at once (nothing running) waits out the rest
    assert len(slept) == 1 and 0 < slept[0] <= ray_data.SCHEDULING_STEP_S
    loop._last -= 1.0  # a step that blocked in ray.wait for a second is not held back
    loop.on_execution_step(None)
    assert len(slept) == 1


def test_a_placement_caps_the_pipelines_object_store_and_reaches_the_stream(ray_local, synth_shards):
    import ray

    import uniinst.ray.data as ray_data
    from uniinst.config import load_config
    from uniinst.ray.train_stream import train_stream

    placement = ray_data.DataPlacement(resource="data", object_store_mib=64)
    assert placement.remote_args() == {"resources": {"data": 1}}
    ds, _ = ray_data.read_shards(str(synth_shards / "train"), placement=placement)
    assert ds.context.execution_options.resource_limits.object_store_memory == 64 * 2**20
    unplaced, _ = ray_data.read_shards(str(synth_shards / "train"))
    assert unplaced.context.execution_options.resource_limits.object_store_memory != 64 * 2**20

    # From a config: the resource as given; with no cap set, half the cluster's store over the workers.
    cfg = load_config(
        CONFIGS / "synth_R18_uniinst.yaml", [f"data.train.shards={synth_shards / 'train'}", "ray.data_resource=data"]
    )
    stream = train_stream(cfg, rank=1, world_size=2)
    store = ray.cluster_resources()["object_store_memory"]
    assert stream.options.placement == ray_data.DataPlacement("data", int(store / 4 / 2**20))
    stream.close()


# --------------------------------------------------------------------------- failures


def test_corrupt_shard_bytes_name_the_shard(ray_local, synth_shards, tmp_path):
    uri = tmp_path / "corrupt"
    shutil.copytree(synth_shards / "train", uri)
    victim = uri / read_manifest(str(uri)).shards[2].path
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    victim.write_bytes(bytes(data))
    stream = _synth_stream(uri, seed=0, shuffle_files=False)
    with pytest.raises(ShardError, match=f"{victim.name} is corrupt"):
        _take(stream, 4)
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name} is listed in the manifest but does not exist"):
        _take(_synth_stream(uri, seed=0, shuffle_files=False), 4)


def test_a_shard_with_fewer_rows_than_its_manifest_entry_is_named(ray_local, synth_shards, tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    uri = tmp_path / "short"
    shutil.copytree(synth_shards / "train", uri)
    manifest_path = uri / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    victim = uri / manifest["shards"][1]["path"]
    pq.write_table(pq.read_table(victim).slice(0, 1), victim)  # 1 of its 2 rows, checksums updated
    data = victim.read_bytes()
    manifest["shards"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"shard {victim} holds 1 images but the manifest lists 2"):
        _take(_synth_stream(uri, seed=0), 1)


class _RestartableS3:
    """A moto S3 endpoint on a fixed port that can be stopped and started again; moto keeps
    its buckets in this process, so a restarted endpoint serves the same data."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def restartable_s3(aws_test_env):
    s3 = _RestartableS3()
    s3.start()
    # Up until the module ends: a closed stream may still be finishing a prefetched read.
    yield s3
    s3.stop()


def test_s3_endpoint_restarted_mid_stream_resumes_or_fails_clearly(ray_local, synth_data, restartable_s3):
    s3 = restartable_s3
    fs, _ = filesystem_for("s3://restart", endpoint_url=s3.endpoint)
    fs.mkdir("restart")
    uri = "s3://restart/synth"
    _prepare(synth_data / "annotations" / "instances_train.json", synth_data / "train", uri, images_per_shard=2, endpoint_url=s3.endpoint)
    stream = _synth_stream(uri, seed=0, endpoint_url=s3.endpoint)
    seen = [next(stream).image_ids]
    s3.stop()
    timer = threading.Timer(1.5, s3.start)
    timer.start()
    outcome = None
    try:
        # The rest of epoch 0 and all of epoch 1, whose shards are read during or after the outage.
        seen += [next(stream).image_ids for _ in range(7)]
    except RuntimeError as exc:
        outcome = str(exc)
    finally:
        stream.close()
        timer.join()
    if outcome is None:
        epochs = [sorted(i for b in seen[k : k + 4] for i in b) for k in (0, 4)]
        assert epochs[0] == epochs[1] and len(epochs[0]) == 8
    else:
        assert "shard" in outcome or "images but" in outcome, outcome


# --------------------------------------------------------------------------- training and evaluation


def test_uniinst_train_and_evaluate_on_shards(ray_local, synth_shards, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *TINY,
        "data.synthetic=false",
        f"data.train.shards={synth_shards / 'train'}",
        f"data.val.shards={synth_shards / 'val'}",
        "solver.max_iter=3",
        "solver.amp=false",
        "data.shuffle_buffer=4",
        "model.inference.score_thresh=0.0",
    ]
    assert main(["train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(out), *overrides]) == 0
    manifest = read_manifest(str(synth_shards / "train"))
    ckpt = load_checkpoint(out / "checkpoints" / checkpoint_name(3))
    assert ckpt["iteration"] == 3 and ckpt["meta"]["class_names"] == manifest.class_names
    assert ckpt["config"]["model"]["num_classes"] == len(manifest.categories) == 4
    losses = [row["train/loss"] for row in read_metrics(out / "metrics.jsonl") if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    report = json.loads((out / "eval" / "iter_0000003" / "metrics.json").read_text())
    assert 0.0 <= report["AP"] <= 1.0 and report["extra"]["images"] == 4
    assert len(json.loads((out / "eval" / "iter_0000003" / "results.json").read_text())) > 0

    # The same checkpoint from the command line, OCHuman-style: an id subset and one category.
    val = read_manifest(str(synth_shards / "val"))
    gt_ids = sorted(r for r in _val_ids(synth_shards))[:2]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, gt_ids)) + "\n")
    name = val.categories[0]["name"]
    args = [
        "evaluate", "--shards", str(synth_shards / "val"), "--checkpoint", str(out / "checkpoints" / checkpoint_name(3)),
        "--out", str(tmp_path / "ev"), "--image-ids", str(tmp_path / "ids.txt"), "--categories", name,
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["extra"]["images"] == 2 and report["extra"]["category_ids"] == [val.categories[0]["id"]]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {r["image_id"] for r in results} <= set(gt_ids)
    assert {r["category_id"] for r in results} <= {val.categories[0]["id"]}


def test_training_on_shards_resumes_exactly(ray_local, synth_data, synth_shards, tmp_path):
    from conftest import tiny_config

    from uniinst.ray.shard_split import open_split

    common = (
        "data.train.json=", f"data.train.shards={synth_shards / 'train'}", "data.val.json=",
        "train.checkpoint_period=2", "train.keep_checkpoints=10", "train.log_period=100",
    )
    train_local(tiny_config(synth_data, tmp_path / "a", "solver.max_iter=4", *common), open_split=open_split)
    first = train_local(tiny_config(synth_data, tmp_path / "b", "solver.max_iter=2", *common), open_split=open_split)
    assert first.iteration == 2
    # Resumes in the middle of the first epoch: 4 of its 8 images were trained on.
    resumed = train_local(tiny_config(synth_data, tmp_path / "b", "solver.max_iter=4", *common), open_split=open_split)
    assert resumed.iteration == 4
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / checkpoint_name(4))
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / checkpoint_name(4))
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def _val_ids(synth_shards):
    from uniinst.ray.evaluate import gt_from_shards

    return [im["id"] for im in gt_from_shards(str(synth_shards / "val"))["images"]]


@needs_coco_tiny
def test_ground_truth_from_shards_scores_perfect_predictions(s3_server, coco_tiny_s3):
    from uniinst.evaluation.coco_eval import evaluate_segm
    from uniinst.ray.evaluate import coco_from_dict, gt_from_shards

    uri, manifest, reader, subset = coco_tiny_s3
    gt = gt_from_shards(uri, endpoint_url=s3_server)
    assert [im["id"] for im in gt["images"]] == subset
    assert len(gt["annotations"]) == manifest.num_annotations and len(gt["categories"]) == 80
    # Every mask decodes to the JSON reader's.
    by_image = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in subset[:4]:
        record = reader.load(reader.image_ids.index(image_id))
        anns = [a for a in by_image[image_id] if not a["iscrowd"]]
        masks = mask_utils.decode([a["segmentation"] for a in anns]).transpose(2, 0, 1)
        assert np.array_equal(masks, record.masks)

    def perfect(anns):
        return [
            {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
            for a in anns if not a["iscrowd"]
        ]

    assert evaluate_segm(coco_from_dict(gt), perfect(gt["annotations"]))["AP"] == pytest.approx(1.0)

    # OCHuman-style: a subset of images and one category (person there). Only its predictions
    # are perfect; restricting the evaluation to it scores 1.0, the full set does not.
    some = subset[:6]
    sub = gt_from_shards(uri, endpoint_url=s3_server, image_ids=some)
    assert [im["id"] for im in sub["images"]] == some
    assert {a["image_id"] for a in sub["annotations"]} <= set(some)
    chosen = sub["annotations"][0]["category_id"]
    results = perfect(a for a in sub["annotations"] if a["category_id"] == chosen)
    assert results
    coco = coco_from_dict(sub)
    assert evaluate_segm(coco, results, image_ids=some, category_ids=[chosen])["AP"] == pytest.approx(1.0)
    assert evaluate_segm(coco, results, image_ids=some)["AP"] < 0.5
    with pytest.raises(ValueError, match="not in"):
        gt_from_shards(uri, endpoint_url=s3_server, image_ids=[some[0], 10**9])

"""``uniinst predict`` over collections: files, folders and globs (and S3 prefixes with --ray)
to predictions.jsonl with COCO RLE masks, unreadable images named and skipped, and a rerun that
resumes without redoing finished images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY
from pycocotools import mask as mask_util

from uniinst.cli import main
from uniinst.config import load_config, to_dict
from uniinst.engine.batch_prediction import Destination, list_images, predict_images
from uniinst.engine.checkpoint import save_checkpoint
from uniinst.engine.inference_model import load_model_for_inference
from uniinst.modeling.uniinst import build_model

SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model that reports its 3 best candidates per image (so every image has
    instances), trained on a dataset whose categories are numbered 11..14."""
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", [
        *TINY, "model.inference.score_thresh=0", "model.inference.max_detections=3",
    ])
    torch.manual_seed(0)
    state = {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
             "meta": {"class_names": SHAPES, "category_ids": [11, 12, 13, 14]}}
    return save_checkpoint(state, tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture
def images(synth_data, tmp_path):
    """Six val images in a folder tree and one file that is not an image."""
    root = tmp_path / "images"
    (root / "more").mkdir(parents=True)
    val = sorted((synth_data / "val").glob("*.jpg"))
    for i, src in enumerate(val + val[:2]):
        shutil.copy(src, (root / "more" if i >= 3 else root) / f"img{i}.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    return root


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folders_globs_and_files_are_listed_once_in_order(images):
    files = list_images([str(images / "img1.jpg"), str(images), str(images / "more" / "*.jpg")])
    assert files[0] == str(images / "img1.jpg")
    assert len(files) == len(set(files)) == 7 and str(images / "broken.jpg") in files
    with pytest.raises(ValueError, match=r"no images at .*nowhere"):
        list_images([str(images / "nowhere")])


def test_every_image_gets_its_instances_and_an_unreadable_one_is_named(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--draw"]) == 0
    captured = capsys.readouterr()
    assert "6 of 7 images predicted, 18 instances, 1 unreadable" in captured.out
    assert "broken.jpg" in captured.err
    records = _lines(out / "predictions.jsonl")
    assert [r["file"] for r in records] == [f for f in list_images([str(images)]) if "broken" not in f]
    for record in records:
        assert len(record["instances"]) == 3
        for inst in record["instances"]:
            assert inst["label"] == SHAPES[inst["category_id"] - 11]
            mask = mask_util.decode(inst["segmentation"])
            assert mask.shape == (record["height"], record["width"])
            assert inst["bbox"] == pytest.approx(mask_util.toBbox(inst["segmentation"]).tolist())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable"][0]["file"].endswith("broken.jpg") and summary["predicted"] == 6
    assert len(list(out.glob("*.png"))) == 6


def test_a_rerun_resumes_without_redoing_finished_images(checkpoint, images, tmp_path):
    files = list_images([str(images)])
    model = load_model_for_inference(checkpoint, device=torch.device("cpu"))
    whole = tmp_path / "whole"
    predict_images(model, files, Destination(str(whole)))

    class Counting:
        """The model, counting the images it is asked to predict."""

        def __init__(self, inner):
            self.inner, self.seen = inner, 0
            self.transform, self.label_names, self.category_ids = inner.transform, inner.label_names, inner.category_ids

        def predict(self, batch):
            self.seen += len(batch.image_ids)
            return self.inner.predict(batch)

    resumed = tmp_path / "resumed"
    predict_images(model, files[:4], Destination(str(resumed)), chunk=2)  # a job stopped after two chunks
    counting = Counting(model)
    summary = predict_images(counting, files, Destination(str(resumed)), chunk=2)
    assert summary["resumed"] == 4 and counting.seen == 3  # only the three images the first run did not reach
    assert (resumed / "predictions.jsonl").read_text() == (whole / "predictions.jsonl").read_text()


def test_a_ray_job_over_an_s3_prefix_writes_and_resumes_there(
    ray_local, s3_server, s3_bucket, checkpoint, images, tmp_path, capsys
):
    from uniinst.data.storage import filesystem_for, upload_file
    from uniinst.ray.predict import predict_images_ray

    for path in sorted(images.rglob("*.jpg")):
        upload_file(path, f"{s3_bucket}/images/{path.relative_to(images)}", endpoint_url=s3_server)
    files = list_images([f"{s3_bucket}/images/"], endpoint_url=s3_server)
    assert len(files) == 7
    out = f"{s3_bucket}/preds"
    dest = Destination(out, endpoint_url=s3_server)
    predict_images_ray(str(checkpoint), files[:3], dest, endpoint_url=s3_server)  # stopped after three
    args = ["predict", f"{s3_bucket}/images/", "--checkpoint", str(checkpoint), "--out", out, "--ray",
            "--replicas", "2", "--endpoint-url", s3_server, "--draw"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "6 of 7 images predicted, 3 done by an earlier run" in captured.out and "broken.jpg" in captured.err
    fs, root = filesystem_for(out, endpoint_url=s3_server)
    records = [json.loads(line) for line in fs.cat_file(f"{root}/predictions.jsonl").decode().splitlines()]
    assert len(records) == 6 and all(len(r["instances"]) == 3 for r in records)
    assert len([p for p in fs.ls(root) if p.endswith(".png")]) == 4  # the images this run predicted

    local = tmp_path / "local"
    predict_images(load_model_for_inference(checkpoint, device=torch.device("cpu")), files,
                   Destination(str(local), endpoint_url=s3_server), endpoint_url=s3_server)
    mine = _lines(local / "predictions.jsonl")
    assert [r["file"] for r in records] == [r["file"] for r in mine]
    for a, b in zip(records, mine):
        assert [i["category_id"] for i in a["instances"]] == [i["category_id"] for i in b["instances"]]
        np.testing.assert_allclose([i["score"] for i in a["instances"]], [i["score"] for i in b["instances"]], atol=1e-5)

"""Export: the NMS-free program in ONNX Runtime and TorchScript predicts what eager PyTorch does,
at several image sizes, and ``uniinst predict`` runs the exported file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from uniinst.cli import main
from uniinst.data.coco import CocoDataset, CocoRecord
from uniinst.data.collate import collate
from uniinst.engine.exported_model import ExportedModel
from uniinst.engine.inference_model import load_model_for_inference, run_batch
from uniinst.engine.local import train_local

# Sizes the training never saw, a side below one FPN cell at P7 and a non-multiple of 32.
SIZES = [(128, 128), (96, 200), (257, 131), (40, 33)]


@pytest.fixture(scope="module")
def trained(synth_data, tmp_path_factory):
    """A checkpoint after 30 iterations on the synthetic shapes, and its ONNX and TorchScript
    exports (a low score threshold, so that every image has instances to compare)."""
    out = tmp_path_factory.mktemp("export")
    cfg = tiny_config(synth_data, out / "run", "solver.max_iter=30")
    ckpt = train_local(cfg, resume=False).checkpoint
    files = {"onnx": out / "model.onnx", "torchscript": out / "model.ts"}
    for fmt, dest in files.items():
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(dest),
                     "model.inference.score_thresh=0.01"]) == 0
    return ckpt, files


def _paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of each mask of ``a`` with the mask of ``b`` at the same index (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1)
    union = (a | b).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))


def _val_images(synth_data, sizes):
    """Val images of the synthetic set resized to each of ``sizes`` (the content a model detects)."""
    dataset = CocoDataset(synth_data / "annotations" / "instances_val.json", synth_data / "val")
    images = []
    for i, size in enumerate(sizes):
        image = torch.from_numpy(dataset.load(i % len(dataset)).image).permute(2, 0, 1)[None].float()
        images.append(torch.nn.functional.interpolate(image, size=size, mode="bilinear")[0].round().byte())
    return images


def _batch(image: torch.Tensor):
    from uniinst.structures import Sample

    h, w = image.shape[-2:]
    sample = Sample(image=image, masks=torch.zeros((0, h, w), dtype=torch.uint8),
                    labels=torch.zeros(0, dtype=torch.long), image_id=0, orig_size=(h, w))
    return collate([sample])


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_the_exported_program_predicts_what_eager_pytorch_does_at_every_size(trained, synth_data, backend):
    ckpt, files = trained
    eager = load_model_for_inference(ckpt, device=torch.device("cpu"), overrides=["model.inference.score_thresh=0.01"])
    exported = ExportedModel(files[backend], backend=backend)
    compared = 0
    for image in _val_images(synth_data, SIZES):
        batch = _batch(image)
        (want,) = run_batch(eager.model, batch)
        (got,) = exported.predict(batch)
        assert len(got) == len(want)
        assert torch.equal(got.labels, want.labels)
        assert torch.allclose(got.scores, want.scores, atol=1e-4, rtol=0)
        ious = _paired_iou(got.masks, want.masks)
        assert bool((ious >= 0.99).all()), f"{backend} at {tuple(image.shape[-2:])}: IoU {ious.min():.3f}"
        compared += len(want)
    assert compared >= 20  # the comparison is not vacuous


def test_predict_runs_the_onnx_file_and_draws_the_images(trained, synth_data, tmp_path, capsys):
    _, files = trained
    images = sorted((synth_data / "val").glob("*.jpg"))[:2]
    out = tmp_path / "png"
    assert main(["predict", *map(str, images), "--checkpoint", str(files["onnx"]), "--backend", "onnx",
                 "--out", str(out), "--score-thresh", "0.0", "--draw"]) == 0
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(p.stem for p in images)
    assert "2 of 2 images predicted" in capsys.readouterr().out


def test_export_refuses_nms_and_predict_refuses_a_file_it_cannot_run(trained, tmp_path, capsys):
    ckpt, files = trained
    refused = ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "model.inference.nms=mask"]
    assert main(refused) == 2
    assert "only NMS-free inference exports" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    image = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (64, 48)).save(image)
    for path, backend in [(broken, "onnx"), (files["onnx"], "torchscript")]:
        args = ["predict", str(image), "--checkpoint", str(path), "--backend", backend, "--out", str(tmp_path / "o")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0]
    assert main(["predict", str(image), "--checkpoint", str(files["onnx"]), "--backend", "onnx", "--out",
                 str(tmp_path / "o"), "model.inference.score_thresh=0.5"]) == 2
    assert "give --config and overrides to uniinst export" in capsys.readouterr().err


def test_masks_of_a_resized_image_come_back_at_its_size_close_to_eager(trained, synth_data):
    """The transform scales a 64×64 image to 128×128; the program's masks at that scale are
    resized back (0/1 masks, where eager resizes probabilities): same instances, same
    size, masks that differ along the edges only."""
    ckpt, files = trained
    eager = load_model_for_inference(ckpt, device=torch.device("cpu"), overrides=["model.inference.score_thresh=0.01"])
    exported = ExportedModel(files["onnx"], backend="onnx")
    rng = np.random.default_rng(0)
    ious = []
    for image in _val_images(synth_data, [(64, 64), (64, 64)]):
        none = np.zeros((0, 64, 64), np.uint8)
        record = CocoRecord(image=image.permute(1, 2, 0).numpy(), masks=none, labels=np.zeros(0, np.int64),
                            image_id=0, file_name="x", crowd_masks=none)
        batch = collate([exported.transform(record, rng)])
        assert batch.image_sizes[0] == (128, 128)
        (want,), (got,) = run_batch(eager.model, batch), exported.predict(batch)
        assert got.masks.shape[1:] == (64, 64) and torch.equal(got.labels, want.labels)
        ious.append(_paired_iou(got.masks, want.masks))
    ious = torch.cat(ious)
    print(f"resized: {len(ious)} instances, IoU min {ious.min():.3f} mean {ious.mean():.3f}")
    assert ious.mean() >= 0.9

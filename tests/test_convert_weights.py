"""The authors' UniInst R-50 checkpoint, as its code defines it (tests/data/adelaidet_uniinst_r50/),
converted onto this project's model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS, REPO

from uniinst.cli import main
from uniinst.config import load_config
from uniinst.engine.adelaidet_weights import convert_state_dict, target_key
from uniinst.engine.exported_model import ExportedModel
from uniinst.engine.inference_model import load_model_for_inference
from uniinst.evaluation.categories import COCO_CLASS_NAMES
from uniinst.modeling.uniinst import build_model
from uniinst.structures import Batch

KEYS = REPO / "tests" / "data" / "adelaidet_uniinst_r50" / "keys.json"
AUTHORS = ["model.backbone.style=caffe", "model.backbone.pretrained=false"]


def _authors_state() -> dict[str, torch.Tensor]:
    """An AdelaiDet UniInst R-50 state dict with the authors' key names and shapes, random values."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in json.loads(KEYS.read_text()).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(270000)
        elif key.endswith("running_var"):  # a variance: positive
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


@pytest.fixture(scope="module")
def model():
    return build_model(load_config(CONFIGS / "uniinst_R50_3x.yaml", AUTHORS).model)


def test_every_key_of_the_authors_r50_maps_unchanged_and_loads_strictly(model):
    source = _authors_state()
    weights, ignored = convert_state_dict(source, model.state_dict(), source_name="authors.pth")
    assert sorted(ignored) == sorted([f"proposal_generator.oym_head.scales.{i}.scale" for i in range(5)]
                                     + ["mask_head.sizes_of_interest"])
    assert len(weights) == len(source) - len(ignored) == len(model.state_dict())
    for key, value in source.items():
        if key not in ignored:
            assert weights[target_key(key)] is value
    model.load_state_dict(weights)  # strict
    assert target_key("backbone.bottom_up.res4.5.conv2.norm.running_var") == "backbone.layer3.5.bn2.running_var"
    assert target_key("backbone.fpn_lateral5.weight") == "backbone.fpn.inner_blocks.2.0.weight"
    assert target_key("mask_branch.tower.4.bias") == "mask_branch.predictor.bias"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"proposal_generator.oym_head.bbox_pred.weight": torch.zeros(4)}), "bbox_pred.weight"),
        (lambda s: s.update({"proposal_generator.oym_head.cls_score.bias": torch.zeros(81)}), r"cls_score.bias is \[81\]"),
        (lambda s: s.pop("controller.weight"), "head.controller.weight"),
    ],
)
def test_a_key_that_does_not_fit_is_an_error_naming_it(model, change, message):
    source = _authors_state()
    change(source)
    with pytest.raises(ValueError, match=message):
        convert_state_dict(source, model.state_dict(), source_name="authors.pth")


def test_convert_weights_writes_a_checkpoint_that_predicts_as_the_weights_loaded_directly(model, tmp_path, capsys):
    source = _authors_state()
    src, out = tmp_path / "UniInst_MS_R_50_3x.pth", tmp_path / "converted.pt"
    torch.save({"model": source, "iteration": 269999}, src)
    assert main(["convert-weights", str(src), "--out", str(out)]) == 0
    assert "6 source keys unused" in capsys.readouterr().out

    loaded = load_model_for_inference(out, device=torch.device("cpu"))
    assert loaded.label_names == list(COCO_CLASS_NAMES)
    assert loaded.cfg.model.backbone.style == "caffe"
    weights, _ = convert_state_dict(source, model.state_dict(), source_name="authors.pth")
    model.load_state_dict(weights)
    model.eval()
    images = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        (expected,) = model(images, [(96, 128)], orig_sizes=[(96, 128)])
        (got,) = loaded.model(images, [(96, 128)], orig_sizes=[(96, 128)])
    assert len(got) == len(expected) > 0
    torch.testing.assert_close(got.scores, expected.scores)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.masks, expected.masks)

    # Export takes the converted checkpoint as it is: its caffe-style (BGR) input included.
    exported = tmp_path / "converted.ts"
    assert main(["export", "--checkpoint", str(out), "--format", "torchscript", "--out", str(exported)]) == 0
    program = ExportedModel(exported, backend="torchscript")
    assert program.label_names == list(COCO_CLASS_NAMES)
    (from_file,) = program.predict(Batch(images=images, image_sizes=[(96, 128)], orig_sizes=[(96, 128)],
                                         image_ids=[0], targets=[]))
    assert torch.equal(from_file.labels, expected.labels) and torch.equal(from_file.masks, expected.masks)
    torch.testing.assert_close(from_file.scores, expected.scores, atol=1e-4, rtol=0)


def test_convert_weights_refuses_a_leftover_key_in_one_line(tmp_path, capsys):
    source = _authors_state()
    source["proposal_generator.oym_head.ctrness.weight"] = torch.zeros(1, 256, 3, 3)
    src = tmp_path / "other.pth"
    torch.save({"model": source}, src)
    assert main(["convert-weights", str(src), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src) in err[0] and "ctrness.weight" in err[0]
    assert not (tmp_path / "x.pt").exists()

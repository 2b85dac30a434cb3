"""detectron2's MSRA ImageNet backbones (``R-50.pkl``) as a training start: every blob lands on
the trunk weight of the same role, nothing but numpy arrays is unpickled, and a blob, style or
file that does not fit is refused naming it."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY

from uniinst.config import load_config
from uniinst.engine.checkpoint import load_initial_weights
from uniinst.modeling.uniinst import build_model

# ResNet-50 as detectron2 names its Caffe2 blobs (c2_model_loading.py): stage, blocks,
# bottleneck and output channels.
STAGES = [(2, 3, 64, 256), (3, 4, 128, 512), (4, 6, 256, 1024), (5, 3, 512, 2048)]


def msra_r50_blobs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    blobs = {"conv1_w": rng.normal(size=(64, 3, 7, 7)), "pred_w": rng.normal(size=(1000, 2048)),
             "pred_b": rng.normal(size=1000), "conv1_w_momentum": np.zeros((64, 3, 7, 7))}
    blobs["res_conv1_bn_s"], blobs["res_conv1_bn_b"] = rng.normal(size=64), rng.normal(size=64)
    in_ch = 64
    for stage, blocks, mid, out in STAGES:
        for i in range(blocks):
            name = f"res{stage}_{i}"
            shapes = {"branch2a": (mid, in_ch, 1, 1), "branch2b": (mid, mid, 3, 3), "branch2c": (out, mid, 1, 1)}
            if i == 0:
                shapes["branch1"] = (out, in_ch, 1, 1)
            for branch, shape in shapes.items():
                blobs[f"{name}_{branch}_w"] = rng.normal(size=shape)
                blobs[f"{name}_{branch}_bn_s"] = rng.normal(size=shape[0])
                blobs[f"{name}_{branch}_bn_b"] = rng.normal(size=shape[0])
            in_ch = out
    return {k: v.astype(np.float32) for k, v in blobs.items()}


def _write(path, blobs) -> str:
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return str(path)


def _model(style: str = "caffe", norm: str = "FrozenBN"):
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", [
        *TINY, "model.backbone.depth=50", "model.backbone.width=64", f"model.backbone.style={style}",
        "model.backbone.pretrained=false", f"model.backbone.norm={norm}", "model.backbone.freeze_at=2",
    ])
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_every_msra_blob_lands_on_the_trunk_weight_of_its_role(tmp_path, norm):
    blobs = msra_r50_blobs()
    model = _model(norm=norm)
    fpn_before = {k: v.clone() for k, v in model.backbone.fpn.state_dict().items()}
    assert load_initial_weights(model, _write(tmp_path / "R-50.pkl", blobs)) == []
    bb = model.backbone
    t = torch.from_numpy
    assert torch.equal(bb.stem.conv1.weight, t(blobs["conv1_w"]))
    assert torch.equal(bb.stem.bn1.weight, t(blobs["res_conv1_bn_s"]))
    # Stage res{N} is torchvision's layer{N-1}; branch2a/b/c the three convs, branch1 the shortcut.
    block = bb.layer3[0]
    assert torch.equal(block.conv1.weight, t(blobs["res4_0_branch2a_w"]))
    assert torch.equal(block.conv2.weight, t(blobs["res4_0_branch2b_w"]))
    assert torch.equal(block.conv3.weight, t(blobs["res4_0_branch2c_w"]))
    assert torch.equal(block.bn3.bias, t(blobs["res4_0_branch2c_bn_b"]))
    assert torch.equal(block.downsample[0].weight, t(blobs["res4_0_branch1_w"]))
    assert torch.equal(block.downsample[1].weight, t(blobs["res4_0_branch1_bn_s"]))
    assert torch.equal(bb.layer4[2].bn2.bias, t(blobs["res5_2_branch2b_bn_b"]))
    # No running statistics in these files: the BN is the affine map of its scale and shift.
    assert torch.equal(block.bn1.running_mean, torch.zeros(256)) and torch.equal(block.bn1.running_var, torch.ones(256))
    assert all(torch.equal(v, fpn_before[k]) for k, v in bb.fpn.state_dict().items())


def test_a_pickle_that_is_not_only_arrays_is_refused_before_it_runs(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"conv1_w": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pkl is not a detectron2 MSRA backbone.*not only numpy arrays"):
        load_initial_weights(_model(), str(path))
    assert not (tmp_path / "ran").exists()


def test_an_unknown_blob_a_missing_one_and_the_other_style_are_named(tmp_path):
    blobs = msra_r50_blobs()
    with pytest.raises(ValueError, match=r"blob 'fc1000_w' is not part of a detectron2 MSRA ResNet"):
        load_initial_weights(_model(), _write(tmp_path / "a.pkl", {**blobs, "fc1000_w": blobs["pred_w"]}))
    del blobs["res3_1_branch2b_w"]
    with pytest.raises(ValueError, match=r"b\.pkl does not fit the backbone.*layer2\.1\.conv2\.weight"):
        load_initial_weights(_model(), _write(tmp_path / "b.pkl", blobs))
    with pytest.raises(ValueError, match=r"caffe-style MSRA backbone: set model\.backbone\.style=caffe"):
        load_initial_weights(_model("pytorch"), _write(tmp_path / "c.pkl", msra_r50_blobs()))

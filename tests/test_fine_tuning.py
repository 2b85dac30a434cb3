"""model.weights: a new run starts from a checkpoint's weights (fine-tuning), also to another class count."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import CONFIGS, TINY, TINY_SYNTHETIC

from uniinst.cli import main
from uniinst.config import load_config
from uniinst.engine.checkpoint import CLASSIFIER_KEYS, load_initial_weights, save_checkpoint
from uniinst.modeling.uniinst import build_model


def _model(*overrides: str) -> torch.nn.Module:
    return build_model(load_config(CONFIGS / "synth_R18_uniinst.yaml", [*TINY, *overrides]).model)


@pytest.fixture
def four_class_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = _model("model.num_classes=4")
    # A trained run's checkpoint: its optimiser and iteration must not come along.
    path = save_checkpoint({"model": source.state_dict(), "iteration": 500, "optimizer": {}}, tmp_path / "four.pt")
    return path, source.state_dict()


def test_another_class_count_starts_only_the_classifier_afresh(four_class_checkpoint, caplog):
    path, source = four_class_checkpoint
    torch.manual_seed(2)
    model = _model("model.num_classes=6")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="uniinst.engine.checkpoint"):
        skipped = load_initial_weights(model, str(path))
    assert skipped == list(CLASSIFIER_KEYS)
    assert "4 classes, the model 6; skipped head.cls_logits.weight, head.cls_logits.bias" in caplog.text
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key] if key in skipped else source[key]), key

    same = _model("model.num_classes=4")
    assert load_initial_weights(same, str(path), announce=False) == []
    assert all(torch.equal(v, source[k]) for k, v in same.state_dict().items())


def test_weights_come_from_object_storage_too(four_class_checkpoint, s3_bucket, s3_server):
    from uniinst.data.storage import upload_file

    path, source = four_class_checkpoint
    upload_file(path, f"{s3_bucket}/runs/four.pt", endpoint_url=s3_server)
    model = _model("model.num_classes=4")
    assert load_initial_weights(model, f"{s3_bucket}/runs/four.pt", endpoint_url=s3_server, announce=False) == []
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"model\.weights: s3://.*/runs/gone\.pt does not exist"):
        load_initial_weights(model, f"{s3_bucket}/runs/gone.pt", endpoint_url=s3_server)


def test_weights_of_another_architecture_are_an_error_naming_a_key(four_class_checkpoint):
    path, _ = four_class_checkpoint
    with pytest.raises(ValueError, match=r"four\.pt does not fit the configured model: .*first: "):
        load_initial_weights(_model("model.num_classes=4", "model.fpn_channels=64"), str(path))


def test_a_run_from_a_4_class_checkpoint_trains_a_6_class_model(four_class_checkpoint, tmp_path, caplog):
    path, _ = four_class_checkpoint
    out = tmp_path / "six"
    args = [
        "train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(out), *TINY,
        *TINY_SYNTHETIC, "model.num_classes=6", f"model.weights={path}", "solver.max_iter=3", "train.eval_period=0",
    ]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert f"initialised from {path}" in caplog.text and "skipped head.cls_logits.weight" in caplog.text
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(iterations) == 1 and max(iterations) == 3  # from iteration 0, not the checkpoint's 500
    assert json.loads((out / "synthetic" / "annotations" / "instances_train.json").read_text())["categories"][5]


def test_a_missing_weights_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    args = [
        "train", "--config", str(CONFIGS / "synth_R18_uniinst.yaml"), "--output-dir", str(tmp_path / "run"), *TINY,
        *TINY_SYNTHETIC, f"model.weights={tmp_path / 'nowhere.pt'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.pt" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weights_of_the_other_backbone_style_are_refused(tmp_path):
    # Caffe and pytorch styles share names and shapes: only the stored config tells them apart.
    caffe = load_config(CONFIGS / "uniinst_R50_3x.yaml", ["model.backbone.style=caffe", "model.backbone.pretrained=false"])
    path = save_checkpoint(
        {"model": build_model(caffe.model).state_dict(), "config": {"model": {"backbone": {"style": "caffe"}}}},
        tmp_path / "caffe.pt",
    )
    pytorch = load_config(CONFIGS / "uniinst_R50_3x.yaml", ["model.backbone.pretrained=false"])
    with pytest.raises(ValueError, match="set model.backbone.style=caffe"):
        load_initial_weights(build_model(pytorch.model), str(path))

"""The one way a checkpoint becomes a model for inference: its stored config (or a given one)
with overrides, strict weights, eval mode, and no pretrained download."""

import pytest
import torch

from conftest import CONFIGS, TINY
from uniinst.config import load_config, to_dict
from uniinst.engine.inference_model import inference_model, load_model_for_inference
from uniinst.modeling.uniinst import build_model


def _state(*overrides: str) -> dict:
    cfg = load_config(CONFIGS / "synth_R18_uniinst.yaml", [*TINY, *overrides])
    torch.manual_seed(0)
    stored = to_dict(cfg)
    # As a run that started from ImageNet weights stores it: rebuilding must not fetch them
    # (this machine has no internet, so a download attempt fails the test).
    stored["model"]["backbone"]["pretrained"] = True
    return {"model": build_model(cfg.model).state_dict(), "config": stored, "meta": {"class_names": ["a", "b", "c", "d"]}}


def test_a_loaded_state_gives_its_model_in_eval_mode_with_the_overrides():
    state = _state()
    loaded = inference_model(state, source="ck.pt", device=torch.device("cpu"), overrides=["model.inference.nms=mask"])
    assert not loaded.model.training and loaded.cfg.model.inference.nms == "mask"
    assert loaded.class_names == ["a", "b", "c", "d"] and loaded.label_names == loaded.class_names
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state["model"].items())
    assert state["config"]["model"]["inference"]["nms"] == "none"  # the state is not changed


def test_a_file_loads_the_same_and_a_misfit_names_the_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(_state(), path)
    loaded = load_model_for_inference(path, device=torch.device("cpu"))
    assert loaded.cfg.model.num_classes == 4 and not loaded.cfg.model.backbone.pretrained
    with pytest.raises(ValueError, match=r"ck\.pt.*shape"):
        load_model_for_inference(path, device=torch.device("cpu"), overrides=["model.num_classes=6"])

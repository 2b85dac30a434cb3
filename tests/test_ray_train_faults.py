"""SyncBN under Ray Train: converted for several GPU workers with the keys of BatchNorm2d, as
BatchNorm2d for one worker, refused for several CPU workers (torch's SyncBatchNorm runs on GPU
tensors only) before anything starts."""

from __future__ import annotations

import logging

import pytest
from torch import nn

pytest.importorskip("ray")

from conftest import tiny_config  # noqa: E402
from uniinst.engine.checkpoint import load_model_weights  # noqa: E402
from uniinst.modeling.uniinst import build_model  # noqa: E402
from uniinst.modeling.sync_batchnorm import convert_sync_batchnorm  # noqa: E402
from uniinst.ray.train import train_ray  # noqa: E402

SYNC_BN = ["model.backbone.norm=SyncBN", "model.mask_branch.norm=SyncBN", "model.backbone.freeze_at=0"]


@pytest.mark.parametrize("key", ["model.backbone.norm", "model.mask_branch.norm"])
def test_syncbn_on_several_cpu_workers_is_refused_before_anything_starts(key, synth_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(synth_data, out, f"{key}=SyncBN", "ray.num_workers=2", "ray.use_gpu=false")
    with pytest.raises(ValueError, match=rf"^{key}=SyncBN needs GPU workers \(ray.use_gpu=true\)"):
        train_ray(cfg)
    assert not out.exists()


def test_syncbn_layers_keep_the_keys_of_batchnorm_so_checkpoints_load_in_one_process(synth_data, tmp_path):
    cfg = tiny_config(synth_data, tmp_path, *SYNC_BN)
    model = build_model(cfg.model)
    plain_keys = list(model.state_dict())
    convert_sync_batchnorm(model, cfg.model, world=2)

    for part in (model.backbone, model.mask_branch):
        norms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert list(model.state_dict()) == plain_keys
    single = build_model(cfg.model)
    load_model_weights(single, {"model": model.state_dict()}, "a SyncBN checkpoint")


def test_syncbn_with_one_worker_stays_batchnorm_and_says_so(synth_data, tmp_path, caplog):
    cfg = tiny_config(synth_data, tmp_path, *SYNC_BN)
    model = build_model(cfg.model)
    with caplog.at_level(logging.INFO, logger="uniinst.modeling.sync_batchnorm"):
        convert_sync_batchnorm(model, cfg.model, world=1)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert "model.backbone.norm=SyncBN with one process: it normalises as BatchNorm2d" in caplog.text

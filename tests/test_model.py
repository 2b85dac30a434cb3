"""The assembled model: training step, NMS-free inference, the baseline, and torch-only use."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, TINY
from uniinst.config import load_config
from uniinst.data.collate import collate
from uniinst.modeling.uniinst import build_model
from uniinst.structures import Sample


def _cfg(*extra):
    return load_config(CONFIGS / "synth_R18_uniinst.yaml", [*TINY, *extra])


def _sample(h, w, boxes, image_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    labels = torch.arange(len(boxes), dtype=torch.long) % 4
    return Sample(image, masks, labels, image_id, (h, w))


def _batch():
    return collate([_sample(96, 128, [(10, 10, 60, 50), (40, 30, 100, 90)]), _sample(128, 96, [], image_id=1, seed=1)])


def test_torchvision_ops_are_usable():
    # Guards against a torch/torchvision pair that does not match (torchvision::nms missing).
    import torchvision.ops

    assert torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0]), 0.5).tolist() == [0]


def test_library_imports_no_ray():
    code = (
        "import sys, uniinst, uniinst.cli, uniinst.engine.local, uniinst.modeling.uniinst, uniinst.evaluation.inference;"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["uniinst", "condinst"])
def test_train_step_gives_finite_losses_and_gradients_everywhere(arch):
    torch.manual_seed(0)
    model = build_model(_cfg(f"model.arch={arch}").model)
    batch = _batch()  # the second image has no instance at all
    losses = model(batch.images, batch.image_sizes, batch.targets)
    expected = {"loss_cls", "loss_mask", "loss_rank", "loss_aux"} if arch == "uniinst" else {"loss_cls", "loss_mask"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient (DDP would hang): {missing[:5]}"


def test_a_batch_without_instances_still_trains():
    model = build_model(_cfg().model)
    batch = collate([_sample(64, 64, [])])
    losses = model(batch.images, batch.image_sizes, batch.targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0


def test_padding_is_zero_after_normalisation():
    model = build_model(_cfg().model)
    images = torch.full((1, 3, 64, 96), 200, dtype=torch.uint8)
    x = model.normalize(images, [(50, 70)])
    assert torch.all(x[..., 50:, :] == 0) and torch.all(x[..., :, 70:] == 0)
    assert torch.all(x[..., :50, :70] != 0)


@pytest.mark.parametrize(
    "overrides, order, mean, std",
    [
        ([], [0, 1, 2], [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),  # torchvision's RGB input
        (["model.backbone.style=caffe", "model.backbone.depth=50"], [2, 1, 0], [103.53, 116.28, 123.675], [1.0] * 3),
        (["model.pixel_mean=[10,20,30]", "model.pixel_std=[2,4,8]"], [0, 1, 2], [10, 20, 30], [2, 4, 8]),
    ],
)
def test_the_input_follows_the_backbone_style(overrides, order, mean, std):
    # The MSRA weights of the authors' models take BGR less the mean, torchvision's RGB over the std.
    model = build_model(_cfg(*overrides).model)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    expected = (images[:, order].float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(images, [(32, 32)]), expected)


def test_inference_scores_follow_the_spec_and_keep_at_most_100():
    torch.manual_seed(0)
    model = build_model(_cfg("model.inference.score_thresh=0.0").model).eval()
    with torch.no_grad():
        for m in model.head.modules():  # spread the scores so that ties do not decide the order
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.weight, std=0.05)
        batch = collate([_sample(128, 160, [(10, 10, 60, 50)])])
        (inst,) = model(batch.images, batch.image_sizes, orig_sizes=[(256, 320)])
        out, _, sizes = model.features(batch.images, batch.image_sizes)
    assert len(inst) == 100
    assert inst.masks.shape == (100, 256, 320) and inst.masks.dtype == torch.bool
    expected = (
        out.cls_logits[0].sigmoid()
        * out.filters[0].sigmoid()[:, None]
        * out.iou_preds[0].clamp(0, 1)[:, None]
    )
    # Naive reference of spec §5: per level top 100 over (locations x classes), then top 100 overall.
    per_level = [lvl.flatten().topk(min(100, lvl.numel())).values for lvl in expected.split(sizes)]
    reference = torch.cat(per_level).topk(100).values
    assert torch.allclose(inst.scores, reference, atol=1e-6)
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    assert inst.boxes.shape == (100, 4)


def test_inference_threshold_drops_low_scores():
    model = build_model(_cfg("model.inference.score_thresh=0.5").model).eval()
    batch = collate([_sample(64, 64, [])])
    with torch.no_grad():
        (inst,) = model(batch.images, batch.image_sizes)
    assert len(inst) == 0 and inst.masks.shape == (0, 64, 64)


@pytest.mark.parametrize("nms", ["none", "mask", "matrix"])
def test_baseline_inference_with_and_without_nms(nms):
    torch.manual_seed(0)
    model = build_model(_cfg("model.arch=condinst", f"model.inference.nms={nms}", "model.inference.score_thresh=0.0").model)
    model.eval()
    batch = collate([_sample(64, 96, [(5, 5, 30, 30)])])
    with torch.no_grad():
        (inst,) = model(batch.images, batch.image_sizes)
    assert 0 < len(inst) <= 100
    assert inst.masks.shape[1:] == (64, 96)
    if nms == "mask":
        # After mask NMS no two kept masks of one class overlap above the threshold.
        from uniinst.modeling.nms import mask_iou_matrix

        iou = mask_iou_matrix(inst.masks)
        same = inst.labels[:, None] == inst.labels[None, :]
        iou.fill_diagonal_(0)
        assert float((iou * same).max()) <= 0.5


def test_model_runs_with_torch_alone_end_to_end():
    """Build, one optimiser step, then inference on an image, with no Ray and no data files."""
    from uniinst.engine.trainer import Trainer

    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg.model)
    trainer = Trainer(model, cfg, device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = trainer.step(_batch())
    assert trainer.iteration == 1 and np.isfinite(metrics["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    batch = collate([_sample(100, 140, [])])
    with torch.no_grad():
        (inst,) = model(batch.images, batch.image_sizes, orig_sizes=batch.orig_sizes)
    assert inst.masks.shape[1:] == (100, 140)

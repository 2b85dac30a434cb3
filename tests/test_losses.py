"""Tests for the focal and Dice losses, mask IoU and the distributed normaliser."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist

from uniinst.losses.dice import dice_coefficient, dice_loss, mask_iou
from uniinst.losses.distributed import reduce_mean, world_size
from uniinst.losses.focal import focal_loss_on_logits, focal_loss_on_probs


def test_focal_on_probs_hand_values():
    probs = torch.tensor([0.9, 0.2, 0.6])
    targets = torch.tensor([1.0, 0.0, 1.0])
    expected = torch.tensor([
        0.25 * 0.1**2 * -math.log(0.9),
        0.75 * 0.2**2 * -math.log(0.8),
        0.25 * 0.4**2 * -math.log(0.6),
    ])
    torch.testing.assert_close(focal_loss_on_probs(probs, targets, reduction="none"), expected)
    torch.testing.assert_close(focal_loss_on_probs(probs, targets), expected.sum())
    torch.testing.assert_close(focal_loss_on_probs(probs, targets, reduction="mean"), expected.mean())
    # gamma = 0 and alpha < 0 reduce to plain binary cross-entropy.
    bce = torch.nn.functional.binary_cross_entropy(probs, targets, reduction="none")
    torch.testing.assert_close(focal_loss_on_probs(probs, targets, alpha=-1, gamma=0.0, reduction="none"), bce)


def test_focal_on_probs_is_finite_at_zero_and_one():
    probs = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = focal_loss_on_probs(probs, targets, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0] > 1.0 and loss[1] > 1.0  # confidently wrong: large but finite
    assert loss[2].item() == pytest.approx(0.0, abs=1e-6) and loss[3].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert torch.isfinite(probs.grad).all()


def test_focal_on_logits_equals_focal_on_sigmoid():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    targets = (torch.rand(6, 5, generator=gen) > 0.7).float()
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(
            focal_loss_on_logits(logits, targets, reduction=reduction),
            focal_loss_on_probs(torch.sigmoid(logits), targets, reduction=reduction),
            rtol=1e-4, atol=1e-6,
        )


def test_focal_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        focal_loss_on_probs(torch.tensor([0.5]), torch.tensor([1.0]), reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        focal_loss_on_logits(torch.tensor([0.5]), torch.tensor([1.0]), reduction="max")


def test_dice_hand_cases():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    pred = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])
    expected = torch.tensor([2 * 1 / (2 + 2 + 1e-5), 2 * 1 / (0.5 + 2 + 1e-5)])
    torch.testing.assert_close(dice_coefficient(pred, target), expected)
    torch.testing.assert_close(dice_loss(pred, target), 1 - expected)
    assert dice_coefficient(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 0.0
    assert dice_coefficient(torch.zeros(0, 2, 2), torch.zeros(0, 2, 2)).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        dice_coefficient(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))


def test_mask_iou_hand_case_and_empty_union():
    pred = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([1 / 3, 0.0]))
    torch.testing.assert_close(mask_iou(pred[:1], target[:1].bool()), torch.tensor([1 / 3]))


def test_reduce_mean_without_process_group():
    assert not dist.is_initialized()
    value = torch.tensor([3.0, 5.0])
    assert world_size() == 1
    torch.testing.assert_close(reduce_mean(value), torch.tensor([3.0, 5.0]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_reduce_mean_with_single_process_gloo_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        value = torch.tensor([3.0, 5.0])
        reduced = reduce_mean(value)
        assert world_size() == 1
        torch.testing.assert_close(reduced, torch.tensor([3.0, 5.0]))
        torch.testing.assert_close(value, torch.tensor([3.0, 5.0]))
        assert reduced.data_ptr() != value.data_ptr()
    finally:
        dist.destroy_process_group()

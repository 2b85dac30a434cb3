"""Tests for the focal and Dice losses, mask IoU and the distributed normaliser."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist

from uniinst.losses.dice import dice_coefficient, dice_loss, mask_iou
from uniinst.losses.distributed import reduce_mean, world_size
from uniinst.losses.focal import focal_loss_on_joint_logits, focal_loss_on_logits


def naive_joint_focal(a, b, t, alpha=0.25, gamma=2.0):
    """The authors' formula in float64: focal loss of p = σ(a)·σ(b) through plain logs."""
    p = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    t = t.double()
    ce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce


def test_focal_on_joint_logits_hand_values():
    # σ(ln 9) = 0.9, σ(0) = 0.5, σ(ln 3) = 0.75: p = 0.45, 0.25, 0.5625.
    cls_logits = torch.tensor([math.log(9.0), 0.0, math.log(3.0)])
    filter_logits = torch.tensor([0.0, 0.0, math.log(3.0)])
    targets = torch.tensor([1.0, 0.0, 1.0])
    expected = torch.tensor([
        0.25 * 0.55**2 * -math.log(0.45),
        0.75 * 0.25**2 * -math.log(0.75),
        0.25 * 0.4375**2 * -math.log(0.5625),
    ])
    loss = focal_loss_on_joint_logits(cls_logits, filter_logits, targets, reduction="none")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(focal_loss_on_joint_logits(cls_logits, filter_logits, targets), expected.sum())
    torch.testing.assert_close(
        focal_loss_on_joint_logits(cls_logits, filter_logits, targets, reduction="mean"), expected.mean()
    )
    # gamma = 0 and alpha < 0 reduce to plain binary cross-entropy of p.
    probs = torch.sigmoid(cls_logits) * torch.sigmoid(filter_logits)
    bce = torch.nn.functional.binary_cross_entropy(probs, targets, reduction="none")
    torch.testing.assert_close(
        focal_loss_on_joint_logits(cls_logits, filter_logits, targets, alpha=-1, gamma=0.0, reduction="none"), bce
    )


def test_focal_on_joint_logits_matches_float64_reference_values_and_gradients():
    grid = torch.tensor([-20.0, -9.0, -3.0, -0.5, 0.0, 0.7, 4.0, 12.0, 20.0])
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    a, b = a.reshape(-1, 1).expand(-1, 2), b.reshape(-1, 1).expand(-1, 2)
    targets = torch.tensor([[1.0, 0.0]]).expand_as(a)
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    loss = focal_loss_on_joint_logits(a32, b32, targets, reduction="none")
    expected = naive_joint_focal(a64, b64, targets)
    # Relative agreement down to 1e-12; below it, the negatives at p < 1e-8, whose
    # log(1 − p) ≈ −p float32 holds to its absolute precision only (a loss of order p³).
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-12)
    assert (expected > 1e-12).sum() > 100
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a32.grad.double(), a64.grad, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(b32.grad.double(), b64.grad, rtol=1e-4, atol=1e-12)


def test_focal_on_joint_logits_keeps_the_gradient_at_tiny_and_saturated_p():
    # A positive at p = σ(a)·σ(0) = 5e-7: dL/dp = −α·((1 − p)²/p − 2(1 − p)·log p) ≈ −5.0e5
    # (a clamp of p at 1e-6 leaves −α·2(1 − p)·(−log 1e-6) ≈ −6.9).
    p = 5e-7
    cls_logit = torch.tensor([math.log(2 * p / (1 - 2 * p))], requires_grad=True)
    focal_loss_on_joint_logits(cls_logit, torch.zeros(1), torch.ones(1)).backward()
    dp_da = p * (1 - 2 * p)
    expected = -0.25 * ((1 - p) ** 2 / p - 2 * (1 - p) * math.log(p))
    assert cls_logit.grad.item() / dp_da == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(-5.0e5, rel=1e-4)
    # Where p rounds to 0 or 1 in float32, the loss and its gradient stay finite and right:
    # log p = logσ(a) + logσ(b) and log(1 − p) = log(σ(−a) + σ(a)·σ(−b)) need no rounding.
    a = torch.tensor([-120.0, 60.0, 60.0, -120.0], requires_grad=True)
    b = torch.tensor([0.0, 60.0, 60.0, 0.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = focal_loss_on_joint_logits(a, b, targets, reduction="none")
    log_p0 = -120.0 - math.log(2.0)
    log_1mp1 = -60.0 + math.log(2.0)
    torch.testing.assert_close(loss[:2], torch.tensor([0.25 * -log_p0, 0.75 * -log_1mp1]))
    assert loss[2].item() == 0.0 and loss[3].item() == 0.0
    loss.sum().backward()
    # The confident misses keep the logit gradients of BCE on σ: −α·(1 − σ(a)) = −0.25 for the
    # positive; (1 − α)·σ(−a)/(1 − p) = 0.75/2 for the negative, and the same for b.
    torch.testing.assert_close(a.grad, torch.tensor([-0.25, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(b.grad, torch.tensor([-0.125, 0.375, 0.0, 0.0]))


def test_focal_on_logits_equals_focal_on_joint_logits_with_a_saturated_filter():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    targets = (torch.rand(6, 5, generator=gen) > 0.7).float()
    saturated = torch.full((6, 1), 100.0)  # σ = 1 in float32, logσ = −e^{−100}
    for reduction in ("none", "sum", "mean"):
        torch.testing.assert_close(
            focal_loss_on_logits(logits, targets, reduction=reduction),
            focal_loss_on_joint_logits(logits, saturated, targets, reduction=reduction),
            rtol=1e-4, atol=1e-6,
        )


def test_focal_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        focal_loss_on_joint_logits(torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([1.0]), reduction="max")
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

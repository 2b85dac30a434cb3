"""Network pieces of spec §1 and §3 against hand-computed cases and naive loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from uniinst.modeling.aligned_bilinear import aligned_bilinear
from uniinst.modeling.backbone import ResNetFPN
from uniinst.modeling.dynamic_mask_head import DynamicMaskHead, parse_dynamic_params
from uniinst.modeling.head import UniInstHead
from uniinst.modeling.locations import compute_locations
from uniinst.modeling.mask_branch import MaskBranch
from uniinst.modeling.max_filter import MaxFiltering3D

# ---------------------------------------------------------------- aligned_bilinear


def test_aligned_bilinear_hand_computed_factor_2():
    # [0, 1] -> pad right [0, 1, 1] -> 5 samples [0, .5, 1, 1, 1] -> pad left 1 -> crop 4.
    x = torch.tensor([[[[0.0, 1.0]]]])
    expected = torch.tensor([[0.0, 0.0, 0.5, 1.0]] * 2)
    assert torch.allclose(aligned_bilinear(x, 2)[0, 0], expected)


def test_aligned_bilinear_hand_computed_factor_4():
    # [0, 4] -> [0, 4, 4] -> 9 samples [0, 1, 2, 3, 4, 4, 4, 4, 4] -> pad left 2 -> crop 8.
    x = torch.tensor([[[[0.0, 4.0]]]])
    out = aligned_bilinear(x, 4)
    assert out.shape == (1, 1, 4, 8)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 4.0]))
    assert torch.allclose(out[0, 0], out[0, 0, :1].expand(4, 8))


@pytest.mark.parametrize("factor", [2, 4])
def test_aligned_bilinear_cell_centres_land_on_output_index(factor):
    # Low-res cell (i, j) carries the output index f·j + f//2 (resp. f·i + f//2) it should map to;
    # the output must then be its own index between the first and last cell centres, and the
    # edge value outside them.
    h, w = 3, 5
    half = factor // 2
    cols = torch.arange(w, dtype=torch.float32) * factor + half
    rows = torch.arange(h, dtype=torch.float32) * factor + half
    x = torch.stack([cols.expand(h, w), rows[:, None].expand(h, w)])[None]
    out = aligned_bilinear(x, factor)
    assert out.shape == (1, 2, factor * h, factor * w)
    out_x = torch.arange(factor * w, dtype=torch.float32).clamp(half, (w - 1) * factor + half)
    out_y = torch.arange(factor * h, dtype=torch.float32).clamp(half, (h - 1) * factor + half)
    assert torch.allclose(out[0, 0], out_x.expand(factor * h, factor * w), atol=1e-5)
    assert torch.allclose(out[0, 1], out_y[:, None].expand(factor * h, factor * w), atol=1e-5)


def test_aligned_bilinear_factor_one_is_identity_and_bad_factor_raises():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(aligned_bilinear(x, 1), x)
    with pytest.raises(ValueError):
        aligned_bilinear(x, 0)


# ---------------------------------------------------------------- compute_locations


def test_compute_locations_2x3_stride_8():
    expected = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]], dtype=torch.float32)
    loc = compute_locations(2, 3, 8)
    assert loc.dtype == torch.float32
    assert torch.equal(loc, expected)
    assert torch.equal(compute_locations(1, 2, 5), torch.tensor([[2.0, 2.0], [7.0, 2.0]]))


# ---------------------------------------------------------------- DynamicMaskHead


def _reference_dynamic_masks(mask_feats, params, locations, levels, image_idx, scales, mask_feat_stride, factor):
    """One instance at a time: explicit coordinate channels, explicit parameter slicing
    (all weights first, then all biases), per-layer matrix products."""
    _, C, H, W = mask_feats.shape
    shapes = [(8, C + 2), (8, 8), (1, 8)]
    out = []
    for k in range(params.shape[0]):
        p = params[k]
        rel = torch.zeros(2, H, W)
        for i in range(H):
            for j in range(W):
                px = j * mask_feat_stride + mask_feat_stride // 2
                py = i * mask_feat_stride + mask_feat_stride // 2
                s = scales[int(levels[k])]
                rel[0, i, j] = (locations[k, 0] - px) / s
                rel[1, i, j] = (locations[k, 1] - py) / s
        x = torch.cat([rel, mask_feats[int(image_idx[k])]]).reshape(C + 2, H * W)
        offset = 0
        ws = []
        for o, i in shapes:
            ws.append(p[offset : offset + o * i].reshape(o, i))
            offset += o * i
        bs = []
        for o, _ in shapes:
            bs.append(p[offset : offset + o])
            offset += o
        assert offset == p.numel()
        for layer, (w, b) in enumerate(zip(ws, bs)):
            x = w @ x + b[:, None]
            if layer < len(shapes) - 1:
                x = torch.relu(x)
        out.append(aligned_bilinear(x.reshape(1, 1, H, W), factor)[0, 0])
    return torch.stack(out)


def test_dynamic_mask_head_num_params():
    assert DynamicMaskHead().num_params == 169
    assert DynamicMaskHead(in_channels=4, channels=16, num_layers=2).num_params == (6 * 16 + 16) + (16 + 1)


def test_parse_dynamic_params_layout():
    params = torch.arange(169, dtype=torch.float32)[None].repeat(2, 1)
    weights, biases = parse_dynamic_params(params, 8, 8, 3)
    assert [tuple(w.shape) for w in weights] == [(2, 8, 10), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8), (2, 8), (2, 1)]
    assert weights[0][0, 1, 0] == 10  # row-major [out, in]
    assert weights[1][0, 0, 0] == 80
    assert weights[2][0, 0, 0] == 144
    assert biases[0][0, 0] == 152 and biases[2][0, 0] == 168
    with pytest.raises(ValueError):
        parse_dynamic_params(params[:, :100], 8, 8, 3)


@pytest.mark.parametrize("rel_coord_norm", ["stride", "soi"])
def test_dynamic_mask_head_matches_per_instance_loop(rel_coord_norm):
    g = torch.Generator().manual_seed(0)
    head = DynamicMaskHead(rel_coord_norm=rel_coord_norm)
    mask_feats = torch.randn(2, 8, 5, 6, generator=g)
    n = 5
    params = torch.randn(n, 169, generator=g) * 0.5
    locations = torch.rand(n, 2, generator=g) * torch.tensor([48.0, 40.0])
    levels = torch.tensor([0, 3, 1, 4, 2])
    image_idx = torch.tensor([0, 1, 0, 1, 1])
    out = head(mask_feats, params, locations, levels, image_idx)
    scales = (8, 16, 32, 64, 128) if rel_coord_norm == "stride" else (64, 128, 256, 512, 1024)
    ref = _reference_dynamic_masks(mask_feats, params, locations, levels, image_idx, scales, 8, 2)
    assert out.shape == (n, 10, 12)
    assert torch.allclose(out, ref, atol=1e-5)


def test_dynamic_mask_head_no_instances():
    head = DynamicMaskHead()
    empty_long = torch.zeros(0, dtype=torch.long)
    out = head(torch.randn(2, 8, 5, 6), torch.zeros(0, 169), torch.zeros(0, 2), empty_long, empty_long)
    assert out.shape == (0, 10, 12)


# ---------------------------------------------------------------- MaxFiltering3D


def test_max_filtering_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    channels = 8
    module = MaxFiltering3D(channels, kernel_size=3, tau=2, num_groups=4)
    with torch.no_grad():
        module.conv.weight.normal_(generator=g)
        module.conv.bias.normal_(generator=g)
        module.norm.weight.uniform_(0.5, 1.5, generator=g)
        module.norm.bias.normal_(generator=g)
    feats = [torch.randn(1, channels, s, s, generator=g) for s in (8, 4, 2)]
    out = module(feats)

    with torch.no_grad():
        conv = [module.conv(x) for x in feats]
        for level, x in enumerate(feats):
            h, w = x.shape[-2:]
            depth = [
                F.interpolate(conv[k], size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
                for k in (level - 1, level, level + 1)
                if 0 <= k < len(feats)
            ]
            centre = 0 if level == 0 else 1
            pooled = torch.empty(channels, h, w)
            for c in range(channels):
                for i in range(h):
                    for j in range(w):
                        best = -math.inf
                        for d in range(centre - 1, centre + 2):
                            for di in (-1, 0, 1):
                                for dj in (-1, 0, 1):
                                    if 0 <= d < len(depth) and 0 <= i + di < h and 0 <= j + dj < w:
                                        best = max(best, float(depth[d][c, i + di, j + dj]))
                        pooled[c, i, j] = best
            ref = torch.relu(module.norm(pooled[None] + x))
            assert out[level].shape == x.shape
            assert torch.allclose(out[level], ref, atol=1e-5), f"level {level}"


def test_max_filtering_rejects_odd_tau():
    with pytest.raises(ValueError):
        MaxFiltering3D(8, tau=1, num_groups=4)


# ---------------------------------------------------------------- UniInstHead


def _levels(channels):
    return [torch.randn(2, channels, s, s + 1) for s in (8, 4, 2, 1, 1)]


def test_uniinst_head_shapes_and_init():
    head = UniInstHead(16, 3, num_convs=2, num_params=169, num_groups=4)
    feats = _levels(16)
    out = head(feats)
    for x, cls, ctrl, iou, filt in zip(feats, out.cls_logits, out.controllers, out.iou_preds, out.filters):
        h, w = x.shape[-2:]
        assert cls.shape == (2, 3, h, w)
        assert ctrl.shape == (2, 169, h, w)
        assert iou.shape == (2, 1, h, w)
        assert filt.shape == (2, 1, h, w)
    assert torch.allclose(head.cls_logits.bias, torch.full((3,), -math.log(99.0)))
    assert isinstance(head.max_filter, MaxFiltering3D)
    assert torch.all(head.filter.bias == 0) and torch.all(head.controller.bias == 0)
    assert abs(float(head.cls_tower[0].weight.detach().std()) - 0.01) < 0.002


def test_controller_init_keeps_the_dynamic_weights_scale_of_a_256_channel_head():
    # The authors' std of 0.01 at 256 channels; a narrower head scales it so that the
    # controller's outputs (the dynamic mask head's weights) keep their spread.
    torch.manual_seed(0)
    spreads = {}
    for channels in (256, 32):
        head = UniInstHead(channels, 3, num_convs=1, num_params=169, num_groups=8)
        if channels == 256:
            assert abs(float(head.controller.weight.detach().std()) - 0.01) < 0.0005
        with torch.no_grad():
            spreads[channels] = float(head.controller(torch.randn(4, channels, 16, 16)).std())
    assert spreads[32] == pytest.approx(spreads[256], rel=0.1)


def test_uniinst_head_baseline_without_filter_or_iou():
    head = UniInstHead(16, 3, num_convs=1, num_params=10, num_groups=4, use_filter=False, use_iou=False)
    out = head(_levels(16))
    assert out.filters is None and out.iou_preds is None
    assert head.max_filter is None
    assert [c.shape[1] for c in out.controllers] == [10] * 5

    no_3dmf = UniInstHead(16, 3, num_convs=1, num_groups=4, use_max_filter=False)
    assert no_3dmf.max_filter is None
    assert no_3dmf(_levels(16)).filters[0].shape == (2, 1, 8, 9)


# ---------------------------------------------------------------- MaskBranch


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_mask_branch_output_at_stride_8(norm):
    branch = MaskBranch(16, 32, num_convs=2, out_channels=8, norm=norm)
    feats = [torch.randn(2, 16, 64 // s, 96 // s) for s in (8, 16, 32, 64, 128)[:3]]
    out = branch(feats)
    assert out.shape == (2, 8, 8, 12)


def test_mask_branch_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        MaskBranch(norm="LN")


# ---------------------------------------------------------------- ResNetFPN


def test_resnet_fpn_levels_and_strides():
    torch.manual_seed(0)
    model = ResNetFPN(depth=18, norm="GN", freeze_at=0, out_channels=64)
    assert model.strides == (8, 16, 32, 64, 128)
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(1, 3, 64, 96)
    feats = model(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 8, 12),
        (1, 64, 4, 6),
        (1, 64, 2, 3),
        (1, 64, 1, 2),
        (1, 64, 1, 1),
    ]
    # P6 is a stride-2 conv on P5 (not C5), P7 on relu(P6).
    extra = model.fpn.extra_blocks
    with torch.no_grad():
        assert torch.allclose(feats[3], extra.p6(feats[2]), atol=1e-5)
        assert torch.allclose(feats[4], extra.p7(F.relu(feats[3])), atol=1e-5)


def test_resnet_fpn_freezing():
    model = ResNetFPN(depth=18, norm="FrozenBN", freeze_at=2, out_channels=32)
    for name, p in model.named_parameters():
        frozen = name.startswith(("stem.", "layer1."))
        assert p.requires_grad != frozen, name
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")

    bn = ResNetFPN(depth=18, norm="BN", freeze_at=1, out_channels=32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.stem.modules())
    assert isinstance(bn.layer1[0].bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in bn.layer1.parameters())


def test_resnet_fpn_bad_arguments():
    with pytest.raises(ValueError, match="42"):
        ResNetFPN(depth=42)
    with pytest.raises(ValueError, match="norm"):
        ResNetFPN(depth=18, norm="LN")
    with pytest.raises(ValueError, match="width"):
        ResNetFPN(depth=18, norm="GN", width=48)
    with pytest.raises(ValueError, match="width 64"):
        ResNetFPN(depth=18, norm="FrozenBN", pretrained=True, width=32)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_fpn_width_scales_every_stage(depth):
    expansion = 1 if depth == 18 else 4
    model = ResNetFPN(depth=depth, norm="GN", freeze_at=0, out_channels=32, width=32)
    assert model.stem.conv1.out_channels == 32
    stage_out = [stage[-1].conv1.in_channels for stage in (model.layer2, model.layer3, model.layer4)]
    assert stage_out == [64 * expansion, 128 * expansion, 256 * expansion]
    assert [tuple(f.shape[1:]) for f in model(torch.randn(1, 3, 64, 64))][:3] == [(32, 8, 8), (32, 4, 4), (32, 2, 2)]


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_resnet_fpn_trunk_is_torchvisions_resnet(builder):
    # The names of torchvision's ResNet, so that its ImageNet weights load: with the same
    # weights the stages compute what torchvision's do.
    torch.manual_seed(0)
    reference = builder(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()
    depth = int(builder.__name__.removeprefix("resnet"))
    model = ResNetFPN(depth=depth, norm="FrozenBN", freeze_at=0, out_channels=32).eval()
    model.load_torchvision_trunk(reference.state_dict())
    reference_trunk = torch.nn.Sequential(*list(reference.children())[:-2])  # without avgpool, fc
    trunk = torch.nn.Sequential(model.stem, model.layer1, model.layer2, model.layer3, model.layer4)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), reference_trunk(x))
    with pytest.raises(ValueError, match="not a ResNet-18 trunk"):
        ResNetFPN(depth=18, norm="FrozenBN", out_channels=32).load_torchvision_trunk(
            torchvision.models.resnet34().state_dict()
        )


def _frozen_bn(x: torch.Tensor, bn: torchvision.ops.FrozenBatchNorm2d) -> torch.Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)


def _detectron2_bottleneck(x: torch.Tensor, block: torch.nn.Module, stride: int) -> torch.Tensor:
    # detectron2's BottleneckBlock with stride_in_1x1=True (the MSRA ResNets), written out.
    out = F.relu(_frozen_bn(F.conv2d(x, block.conv1.weight, stride=stride), block.bn1))
    out = F.relu(_frozen_bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2))
    out = _frozen_bn(F.conv2d(out, block.conv3.weight), block.bn3)
    conv, bn = block.downsample
    return F.relu(out + _frozen_bn(F.conv2d(x, conv.weight, stride=stride), bn))


def test_caffe_style_bottleneck_strides_in_its_first_1x1_conv():
    torch.manual_seed(0)
    caffe = ResNetFPN(depth=50, style="caffe", norm="FrozenBN", freeze_at=0, out_channels=32).eval()
    pytorch = ResNetFPN(depth=50, norm="FrozenBN", freeze_at=0, out_channels=32).eval()
    for _, buf in caffe.named_buffers():  # FrozenBN statistics that are not the identity
        buf.copy_(torch.rand_like(buf) + 0.5)
    pytorch.load_state_dict(caffe.state_dict())  # same names and shapes, other strides
    with torch.no_grad():
        for stage in (caffe.layer2, caffe.layer3, caffe.layer4):
            x = torch.randn(2, stage[0].conv1.in_channels, 16, 16)
            torch.testing.assert_close(stage[0](x), _detectron2_bottleneck(x, stage[0], stride=2))
        image = torch.randn(1, 3, 64, 64)
        caffe_out, pytorch_out = caffe(image), pytorch(image)
    assert [f.shape for f in caffe_out] == [f.shape for f in pytorch_out]
    assert not torch.allclose(caffe_out[0], pytorch_out[0])
    assert caffe.layer1[0].conv1.stride == (1, 1) and caffe.layer2[0].conv2.stride == (1, 1)


def test_caffe_style_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="bottleneck"):
        ResNetFPN(depth=18, style="caffe")
    with pytest.raises(ValueError, match="pytorch style"):
        ResNetFPN(depth=50, style="caffe", pretrained=True)
    with pytest.raises(ValueError, match="style"):
        ResNetFPN(depth=50, style="tf")

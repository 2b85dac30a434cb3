"""The authors' UniInst checkpoints (AdelaiDet / detectron2 ``.pth``) as this project's weights.

Each source key is renamed by the first of :data:`RULES` that matches it, or is one of
:data:`IGNORED` (with the reason); a key that neither maps nor is ignored, a renamed key the
model lacks, a shape that differs and a model weight no source key fills are each an error
naming the key. No value is changed: both models lay their weights out the same way (the
controller's outputs too: all dynamic weights, then all biases, relative coordinates first).
The names and shapes of the source are derived from the authors' code in
tests/data/adelaidet_uniinst_r50/README.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# (pattern, replacement) over the whole key; detectron2's res2..res5 are torchvision's layer1..4,
# its fpn_lateral3..5 / fpn_output3..5 torchvision FPN's inner_blocks / layer_blocks 0..2.
RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.bottom_up\.stem\.conv1\.weight", r"backbone.stem.conv1.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.stem.bn1.\1"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight", r"backbone.layer<\1>.\2.conv\3.weight"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.(\w+)", r"backbone.layer<\1>.\2.bn\3.\4"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight", r"backbone.layer<\1>.\2.downsample.0.weight"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)", r"backbone.layer<\1>.\2.downsample.1.\3"),
    (r"backbone\.fpn_lateral([3-5])\.(\w+)", r"backbone.fpn.inner_blocks.<\1>.0.\2"),
    (r"backbone\.fpn_output([3-5])\.(\w+)", r"backbone.fpn.layer_blocks.<\1>.0.\2"),
    (r"backbone\.top_block\.(p6|p7)\.(\w+)", r"backbone.fpn.extra_blocks.\1.\2"),
    (r"proposal_generator\.oym_head\.cls_subnet\.(.+)", r"head.cls_tower.\1"),
    (r"proposal_generator\.oym_head\.instance_subnet\.(.+)", r"head.instance_tower.\1"),
    (r"proposal_generator\.oym_head\.cls_score\.(\w+)", r"head.cls_logits.\1"),
    (r"proposal_generator\.oym_head\.iou_pred\.(\w+)", r"head.iou_pred.\1"),
    (r"proposal_generator\.oym_head\.max3d\.(.+)", r"head.max_filter.\1"),
    (r"proposal_generator\.oym_head\.filter\.(\w+)", r"head.filter.\1"),
    (r"controller\.(\w+)", r"head.controller.\1"),
    (r"mask_branch\.tower\.4\.(\w+)", r"mask_branch.predictor.\1"),
    (r"mask_branch\.(refine|tower)\.(.+)", r"mask_branch.\1.\2"),
)

# Source keys with no counterpart, and why.
IGNORED: tuple[tuple[str, str], ...] = (
    (r"proposal_generator\.oym_head\.scales\.\d+\.scale", "FCOS's box-regression scales: created, never used"),
    (
        r"mask_head\.sizes_of_interest",
        (
            "overwritten with the FPN strides in every forward; this model divides the relative "
            "coordinates by the stride (model.mask_head.rel_coord_norm=stride)"
        ),
    ),
)

# In RULES' replacements, <N> is a detectron2 stage or FPN level turned into torchvision's index.
_OFFSETS = {"layer": 1, "inner_blocks.": 3, "layer_blocks.": 3}


def target_key(key: str) -> str | None:
    """This project's name for the source ``key``, or None when no rule maps it."""
    for pattern, replacement in RULES:
        match = re.fullmatch(pattern, key)
        if match:
            name = match.expand(replacement)
            return re.sub(r"(layer|inner_blocks\.|layer_blocks\.)<(\d)>", _shift, name)
    return None


def _shift(match: re.Match) -> str:
    prefix = match.group(1)
    return f"{prefix}{int(match.group(2)) - _OFFSETS[prefix]}"


def ignored_reason(key: str) -> str | None:
    return next((why for pattern, why in IGNORED if re.fullmatch(pattern, key)), None)


def convert_state_dict(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], *, source_name: str
) -> tuple[dict[str, Tensor], list[str]]:
    """The weights of ``source`` (an AdelaiDet UniInst state dict) under the names of
    ``target`` (this project's model's ``state_dict()``), and the source keys ignored."""
    weights: dict[str, Tensor] = {}
    ignored, unknown = [], []
    for key, value in source.items():
        name = target_key(key)
        if name is None:
            (ignored if ignored_reason(key) else unknown).append(key)
            continue
        if name not in target:
            raise ValueError(f"{source_name}: {key} maps to {name}, which the model does not have")
        if tuple(value.shape) != tuple(target[name].shape):
            raise ValueError(
                f"{source_name}: {key} is {list(value.shape)}, the model's {name} is {list(target[name].shape)} "
                "(another depth or class count? set them with --config or overrides)"
            )
        weights[name] = value
    if unknown:
        raise ValueError(f"{source_name}: {len(unknown)} keys neither map nor are known to be unused (first: {unknown[0]})")
    missing = [k for k in target if k not in weights]
    if missing:
        raise ValueError(f"{source_name}: no weight for {len(missing)} of the model's keys (first: {missing[0]})")
    return weights, ignored

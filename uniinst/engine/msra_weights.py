"""detectron2's MSRA ImageNet backbones (``R-50.pkl``, ``R-101.pkl``, the caffe-style ResNets
the authors' models start from) as the trunk of this project's backbone.

The file is a Python 2 pickle of Caffe2 blobs (numpy arrays, possibly under ``"blobs"``). It is
read with an unpickler that builds numpy arrays and nothing else, since unpickling anything
may run code. The blob names are detectron2's: ``conv1_w``, ``res_conv1_bn_{s,b}`` and
``res{2..5}_{i}_branch{1,2a,2b,2c}_w`` with ``_bn_{s,b}`` (the BN scale and shift: these
models have no running statistics, so the mean is 0 and the variance 1); ``pred_{w,b}`` is
the ImageNet classifier, unused, and ``*_momentum`` are the optimiser's.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # How a Python 3 pickle of protocol 2 stores an array's raw bytes; it only encodes a string.
    ("_codecs", "encode"),
}
_IGNORED = re.compile(r"pred_[wb]|.*_momentum")
# Caffe2 blob name to torchvision's ResNet name (our trunk's), for the conv and BN of each.
_BRANCH = {"branch1": ("downsample.0", "downsample.1"), "branch2a": ("conv1", "bn1"),
           "branch2b": ("conv2", "bn2"), "branch2c": ("conv3", "bn3")}
_BLOCK = re.compile(r"res([2-5])_(\d+)_(branch1|branch2a|branch2b|branch2c)_(w|bn_s|bn_b)")
_BN_PARAM = {"bn_s": "weight", "bn_b": "bias"}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"it holds {module}.{name}, not only numpy arrays")
        return super().find_class(module, name)


def read_msra_blobs(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of a detectron2 MSRA ``.pkl`` file."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a detectron2 MSRA backbone (.pkl of numpy arrays): {exc}") from exc
    if isinstance(data, Mapping) and "blobs" in data:
        data = data["blobs"]
    if not isinstance(data, Mapping) or not all(isinstance(v, np.ndarray) for v in data.values()):
        raise ValueError(f"{path} is not a detectron2 MSRA backbone: expected a dict of numpy arrays")
    return dict(data)


def trunk_name(blob: str) -> str | None:
    """The torchvision ResNet name of the Caffe2 ``blob``, None for one with no counterpart."""
    if blob == "conv1_w":
        return "conv1.weight"
    if blob in ("res_conv1_bn_s", "res_conv1_bn_b"):
        return f"bn1.{_BN_PARAM[blob[-4:]]}"
    m = _BLOCK.fullmatch(blob)
    if m is None:
        return None
    stage, block, branch, param = m.groups()
    conv, bn = _BRANCH[branch]
    prefix = f"layer{int(stage) - 1}.{block}"
    return f"{prefix}.{conv}.weight" if param == "w" else f"{prefix}.{bn}.{_BN_PARAM[param]}"


def msra_trunk_state(blobs: Mapping[str, np.ndarray], source: str) -> dict[str, Tensor]:
    """A torchvision-named ResNet trunk state from MSRA ``blobs`` (from ``source``), with BN
    running statistics of mean 0 and variance 1; a blob that is neither mapped nor known to be
    unused is an error naming it."""
    state: dict[str, Tensor] = {}
    for blob, value in blobs.items():
        if _IGNORED.fullmatch(blob):
            continue
        name = trunk_name(blob)
        if name is None:
            raise ValueError(f"{source}: blob {blob!r} is not part of a detectron2 MSRA ResNet")
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if blob.endswith("_bn_b"):
            norm = name[: -len("bias")]
            state[norm + "running_mean"] = torch.zeros_like(state[name])
            state[norm + "running_var"] = torch.ones_like(state[name])
    return state

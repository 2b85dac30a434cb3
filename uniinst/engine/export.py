"""UniInst's NMS-free inference as one program, exported out of PyTorch (ONNX, TorchScript)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniinst.config import to_dict
from uniinst.engine.inference_model import InferenceModel
from uniinst.modeling.postprocess import mask_probabilities
from uniinst.modeling.uniinst import UniInst

EXPORT_FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAMES = ("masks", "scores", "labels")
# Where the exported file keeps what running it needs besides the graph: the config (input
# scale) and the class names (an ONNX metadata entry, a TorchScript extra file).
METADATA_KEY = "uniinst.json"
# The example input of the export: every FPN level is then at least 2×2, so that no level's size
# is taken for the special case of 1 (the program still runs at any size).
_EXAMPLE_SIZE = (256, 320)


class NmsFreeProgram(nn.Module):
    """``image`` uint8 RGB ``[3, H, W]`` (already at the model's input scale, any H and W) to
    the ``max_detections`` best instances, always that many: ``masks`` bool
    ``[max_detections, H, W]``, ``scores`` float ``[max_detections]`` (0 for a slot at or below
    the model's score threshold, which holds no instance) and ``labels`` int64.

    The same computation as :meth:`UniInst.forward` in eval mode, less the resize to the
    original image size; it has no branch on data, so it exports as one fixed graph.
    """

    def __init__(self, model: UniInst, *, size_divisibility: int = 32) -> None:
        super().__init__()
        if model.nms != "none":
            raise ValueError(
                f"only NMS-free inference exports (model.inference.nms=none); this model runs {model.nms!r} NMS"
            )
        self.model = model
        self.size_divisibility = size_divisibility

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        h, w = image.shape[-2:]
        d = self.size_divisibility
        # Padding after standardisation keeps it zero, as the batch path's normalize does. The
        # padded size is written as a multiple of d, so that export sees every FPN level halve
        # the one before at any input size.
        x = F.pad(model.standardize(image[None]), (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))
        out, mask_feats, level_sizes = model.dense_outputs(x)
        labels, scores, logits = model.candidates(model.scores(out)[0], out, mask_feats, level_sizes, 0)
        masks = mask_probabilities(logits, model.mask_head.mask_out_stride, (h, w))[:, 0] > model.mask_thresh
        return masks, torch.where(scores > model.score_thresh, scores, torch.zeros_like(scores)), labels


def export_model(loaded: InferenceModel, out: str | Path, *, fmt: str) -> Path:
    """Write ``loaded``'s NMS-free program to ``out`` as ``fmt`` (one of :data:`EXPORT_FORMATS`)
    with its config and class names inside; returns the path."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    program = NmsFreeProgram(loaded.model.cpu()).eval()
    metadata = json.dumps(
        {"config": to_dict(loaded.cfg), "class_names": loaded.class_names, "category_ids": loaded.stored_category_ids}
    )
    example = torch.zeros((3, *_EXAMPLE_SIZE), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(program, example, out, metadata)
        else:
            _export_torchscript(program, example, out, metadata)
    return out


def _export_onnx(program: NmsFreeProgram, example: Tensor, out: Path, metadata: str) -> None:
    # torch's exporter needs onnxscript: importing it first makes its absence an ImportError
    # that names it (the command line then names the extra to install).
    import onnxscript  # noqa: F401

    dims = {INPUT_NAME: {1: torch.export.Dim("height", min=1), 2: torch.export.Dim("width", min=1)}}
    onnx_program = torch.onnx.export(
        program, (example,), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_shapes=dims,
        dynamo=True,
    )
    onnx_program.model.metadata_props[METADATA_KEY] = metadata
    # One self-contained file (an R-101 model is far below protobuf's 2 GB limit).
    onnx_program.save(out, external_data=False)


def _export_torchscript(program: NmsFreeProgram, example: Tensor, out: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        # The values the tracer warns about are the model's static channel counts, checked in
        # Python; every size-dependent step is traced (the export tests run several sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(program, (example,), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={METADATA_KEY: metadata})


"""An exported program (``uniinst export``) run as a model: ONNX Runtime for ``.onnx`` files,
TorchScript otherwise, with the same ``predict(batch)``, ``transform`` and ``label_names`` as
an :class:`~uniinst.engine.inference_model.InferenceModel`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uniinst.config import ExperimentConfig, config_from_dict
from uniinst.engine.export import INPUT_NAME, METADATA_KEY
from uniinst.engine.inference_model import ModelLabels
from uniinst.modeling.postprocess import masks_to_boxes
from uniinst.structures import Batch, Instances

Program = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
BACKENDS = ("onnx", "torchscript")


class ExportedModel(ModelLabels):
    """The program in ``path`` (written by ``uniinst export`` as ``backend``) on the CPU, or
    with ONNX Runtime on a GPU where its CUDA provider is installed."""

    def __init__(self, path: str | Path, *, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no exported model at {path}")
        loader = _load_onnx if backend == "onnx" else _load_torchscript
        self.program, metadata = loader(path)
        try:
            meta = json.loads(metadata)
            self.cfg: ExperimentConfig = config_from_dict(meta["config"], source=f"the config stored in {path}")
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} holds no uniinst metadata ({exc}): was it written by uniinst export?") from exc
        self.class_names: list[str] | None = meta.get("class_names")
        self.stored_category_ids: list[int] | None = meta.get("category_ids")

    def predict(self, batch: Batch) -> list[Instances]:
        """The instances of each image of ``batch``, one program call per image, at the
        images' original sizes."""
        results = []
        for image, (h, w), orig in zip(batch.images, batch.image_sizes, batch.orig_sizes):
            masks, scores, labels = self.program(image[:, :h, :w])
            keep = scores > 0
            masks = _resize_masks(masks[keep], tuple(orig))
            boxes = masks_to_boxes(masks)
            results.append(Instances(masks=masks, scores=scores[keep], labels=labels[keep], boxes=boxes))
        return results


def _resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Binary masks at ``size``. The program thresholds at its input's size, so where the
    transform resized the image this resizes the 0/1 masks (eager inference resizes the
    probabilities before it thresholds: the two differ along the edges only)."""
    if tuple(masks.shape[-2:]) == size or masks.shape[0] == 0:
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5


def _load_onnx(path: Path) -> tuple[Program, str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # ONNX Runtime's load errors share no base class but Exception
        raise ValueError(f"cannot load {path} as an ONNX model: {exc}") from exc

    def run(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        masks, scores, labels = session.run(None, {INPUT_NAME: np.ascontiguousarray(image.numpy())})
        return torch.from_numpy(masks), torch.from_numpy(scores), torch.from_numpy(labels)

    return run, session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")


def _load_torchscript(path: Path) -> tuple[Program, str]:
    extra = {METADATA_KEY: ""}
    try:
        with warnings.catch_warnings():
            # TorchScript's deprecation notice is for authors of new programs, not for runners.
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot load {path} as a TorchScript model: {exc}") from exc

    def run(image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.inference_mode():
            return module(image)

    return run, extra[METADATA_KEY]

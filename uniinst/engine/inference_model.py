"""A checkpoint made ready for inference, and a batch run through a model, each written once:
``uniinst evaluate``, ``predict`` and ``export``, the reproduction suite's scoring, the
distributed evaluation's replicas and the quickstart's drawings all take them from here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uniinst.config import ExperimentConfig, config_from_dict, load_config
from uniinst.data.transforms import EvalTransform, eval_transform
from uniinst.engine.checkpoint import load_checkpoint, load_model_weights, model_weights
from uniinst.modeling.uniinst import build_model
from uniinst.structures import Batch, Instances

# The weights come from the checkpoint: building the model must not fetch ImageNet ones.
_NO_PRETRAINED = "model.backbone.pretrained=false"


class ModelLabels:
    """What a model for inference tells from its ``cfg``, ``class_names`` and
    ``stored_category_ids``: its label names, category ids and input transform (a checkpoint's
    model and an exported program alike)."""

    cfg: ExperimentConfig
    class_names: list[str] | None
    stored_category_ids: list[int] | None

    @property
    def label_names(self) -> list[str]:
        """What to call each label in a drawing: its class name, else its number."""
        return self.class_names or [str(i) for i in range(self.cfg.model.num_classes)]

    @property
    def category_ids(self) -> list[int]:
        """The category id of each label: the training data's, else label + 1."""
        return label_category_ids(self.stored_category_ids, self.cfg.model.num_classes)

    @property
    def transform(self) -> EvalTransform:
        """The input transform the model was evaluated with."""
        return eval_transform(self.cfg)


@dataclass
class InferenceModel(ModelLabels):
    """A model in eval mode, its config, and the class names and dataset category ids of its
    labels (None when the checkpoint has none)."""

    model: torch.nn.Module
    cfg: ExperimentConfig
    class_names: list[str] | None
    stored_category_ids: list[int] | None = None

    def predict(self, batch: Batch) -> list[Instances]:
        """:func:`run_batch` with this model."""
        return run_batch(self.model, batch)


@torch.inference_mode()
def run_batch(model: torch.nn.Module, batch: Batch) -> list[Instances]:
    """The instances ``model`` (in eval mode) finds in each image of ``batch``, at the images'
    original sizes, on the CPU."""
    device = next(model.parameters()).device
    outputs = model(batch.images.to(device), batch.image_sizes, orig_sizes=batch.orig_sizes)
    return [instances.to("cpu") for instances in outputs]


def inference_model(
    state: Any,
    *,
    source: str | Path,
    device: torch.device,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> InferenceModel:
    """The model of the loaded checkpoint ``state`` (named ``source`` in errors) with its
    weights, on ``device``, in eval mode. Its config is the file ``config`` when given, else
    the one stored in the checkpoint; ``overrides`` apply to either (for example
    ``model.inference.nms=mask``)."""
    weights = model_weights(state, source)
    if config is not None:
        cfg = load_config(config, [_NO_PRETRAINED, *overrides])
    else:
        stored = state.get("config") if isinstance(state, Mapping) else None
        if not isinstance(stored, Mapping):
            raise ValueError(f"{source} holds no config: pass --config")
        cfg = config_from_dict(stored, [_NO_PRETRAINED, *overrides], source=f"the config stored in {source}")
    model = build_model(cfg.model).to(device)
    load_model_weights(model, weights, source)
    model.eval()
    meta = state.get("meta", {}) if isinstance(state, Mapping) else {}
    meta = meta if isinstance(meta, Mapping) else {}
    names, ids = meta.get("class_names"), meta.get("category_ids")
    return InferenceModel(model, cfg, list(names) if names else None, list(ids) if ids else None)


def label_category_ids(stored: Sequence[int] | None, num_classes: int) -> list[int]:
    """``stored`` (the category ids a checkpoint records for its labels) or, for one that
    records none, the ids 1..K of a dataset numbered from 1."""
    return list(stored) if stored else list(range(1, num_classes + 1))


def load_model_for_inference(
    checkpoint: str | Path,
    *,
    device: torch.device,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> InferenceModel:
    """:func:`inference_model` of the checkpoint file ``checkpoint``."""
    state = load_checkpoint(checkpoint, map_location=device)
    return inference_model(state, source=checkpoint, device=device, config=config, overrides=overrides)

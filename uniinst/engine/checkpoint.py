"""Checkpoints that survive a crash while saving, and the RNG state for exact resume."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from uniinst.atomic_file import atomic_output
from uniinst.redact import redact_uri

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^model_(\d{7})\.pt$")


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (:func:`~uniinst.atomic_file.atomic_output`), so a run
    killed mid-save leaves the previous checkpoint untouched."""
    path = Path(path)
    with atomic_output(path) as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return read_checkpoint(path, str(path), map_location=map_location)


def read_checkpoint(source: Path | BinaryIO, name: str, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state in a checkpoint file or file object, tensors and plain data only
    (``weights_only``); anything else is a ValueError naming ``name``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {name}: {exc}") from exc


def model_weights(state: Any, source: str | Path) -> Mapping[str, torch.Tensor]:
    """The model weights of a loaded checkpoint: its ``model`` entry, or the checkpoint itself
    when it is a plain state dict (name -> tensor)."""
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        return state["model"]
    if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    keys = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(f"{source}: not a model checkpoint (no 'model' weights; it holds {keys})")


def load_model_weights(model: nn.Module, state: Any, source: str | Path, *, keep_own: Sequence[str] = ()) -> None:
    """Load a checkpoint's weights into ``model`` strictly, except the keys ``keep_own``, which
    keep the model's values; a checkpoint of another architecture or class count is an error
    that names the checkpoint and the keys that differ."""
    own = model.state_dict()
    weights = {**{k: v for k, v in model_weights(state, source).items() if k not in keep_own},
               **{k: own[k] for k in keep_own}}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} weights differ in shape (first: {k} is {list(weights[k].shape)} in the checkpoint, "
            f"{list(own[k].shape)} in the model)"
        )
    if missing:
        problems.append(f"{len(missing)} weights are missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights are not in the model (first: {unexpected[0]})")
    if problems:
        raise ValueError(
            f"{source} does not fit the configured model: {'; '.join(problems)}. "
            "Is it a checkpoint of another architecture or class count (model.*)?"
        )
    model.load_state_dict(weights)


# The layer a fine-tuning to another class count starts afresh.
CLASSIFIER_KEYS = ("head.cls_logits.weight", "head.cls_logits.bias")


def load_initial_weights(
    model: nn.Module, checkpoint: str, *, endpoint_url: str | None = None, announce: bool = True
) -> list[str]:
    """Start a new run of ``model`` from ``checkpoint`` (a path or URI of ours or a converted
    one): its weights only, not its optimiser, schedule or iteration. Where the class counts
    differ, the classification layer keeps its own initialisation; returns the keys so
    skipped, and with ``announce`` logs what it did. Any other difference is an error naming
    the key. A detectron2 MSRA ImageNet backbone (``.pkl``) fills the backbone's trunk only."""
    source = redact_uri(checkpoint)
    with _local_copy(checkpoint, endpoint_url=endpoint_url) as local:
        if checkpoint.endswith(".pkl"):
            _load_msra_trunk(model, local, source)
            if announce:
                logger.info(
                    "backbone trunk initialised from %s (MSRA ImageNet weights); FPN and heads start afresh", source
                )
            return []
        state = load_checkpoint(local)
    _check_backbone_style(state, model, source)
    weights, own = model_weights(state, source), model.state_dict()
    skipped = [k for k in CLASSIFIER_KEYS if k in weights and k in own and weights[k].shape != own[k].shape]
    load_model_weights(model, state, source, keep_own=skipped)
    if announce:
        logger.info("initialised from %s (weights only: a new run from iteration 0)", source)
    if announce and skipped:
        logger.info(
            "the classification layer starts afresh: the checkpoint has %d classes, the model %d; skipped %s",
            weights[skipped[0]].shape[0], own[skipped[0]].shape[0], ", ".join(skipped),
        )
    return skipped


@contextlib.contextmanager
def _local_copy(path_or_uri: str, *, endpoint_url: str | None) -> Iterator[Path]:
    """``path_or_uri`` as a local file: itself, or a download that lasts the ``with`` block."""
    if "://" not in path_or_uri:
        yield Path(path_or_uri)
        return
    from uniinst.data.storage import download_file

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path_or_uri).name
        if not download_file(path_or_uri, local, endpoint_url=endpoint_url):
            raise FileNotFoundError(f"model.weights: {redact_uri(path_or_uri)} does not exist")
        yield local


def _load_msra_trunk(model: nn.Module, path: Path, source: str) -> None:
    """The trunk of ``model``'s backbone from a detectron2 MSRA ``.pkl``: caffe-style weights,
    so only a caffe-style backbone takes them."""
    from uniinst.engine.msra_weights import msra_trunk_state, read_msra_blobs

    backbone = getattr(model, "backbone", None)
    if getattr(backbone, "style", None) != "caffe":
        raise ValueError(f"model.weights: {source} is a caffe-style MSRA backbone: set model.backbone.style=caffe")
    trunk = msra_trunk_state(read_msra_blobs(path), source)
    # BatchNorm layers that are not frozen count their batches; the MSRA file has no such count.
    own = {k: v for k, v in backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    try:
        backbone.load_torchvision_trunk({**{k.removeprefix("stem."): v for k, v in own.items()}, **trunk})
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"model.weights: {source} does not fit the backbone: {exc}") from exc


def _check_backbone_style(state: Any, model: nn.Module, source: str) -> None:
    """Both styles have the same weight names and shapes, so only the checkpoint's config tells
    caffe-style weights from pytorch-style ones; a model of the other style computes nonsense."""
    config = state.get("config") if isinstance(state, Mapping) else None
    if not isinstance(config, Mapping):
        return  # a bare state dict: nothing tells
    style = config.get("model", {}).get("backbone", {}).get("style", "pytorch")
    own = getattr(getattr(model, "backbone", None), "style", None)
    if own and style != own:
        raise ValueError(
            f"model.weights: {source} has a {style}-style backbone, the model a {own}-style one: "
            f"set model.backbone.style={style}"
        )


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(folder: str | Path) -> None:
    """Remove the temporary files that :func:`save_checkpoint` leaves when a run is killed
    mid-save (each up to a checkpoint's size). Call it only where no other process saves."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.pt.*.tmp"):
        logger.info("removing %s, left by a save that did not finish", tmp)
        tmp.unlink(missing_ok=True)


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

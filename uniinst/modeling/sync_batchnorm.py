"""SyncBN: BatchNorm statistics over the global batch of a distributed run.

The model builds ``norm="SyncBN"`` parts with plain BatchNorm2d; a distributed trainer
converts them once the process group exists (torch's SyncBatchNorm needs it, and GPU tensors).
"""

from __future__ import annotations

import logging

from torch import nn

from uniinst.config import ModelConfig

logger = logging.getLogger(__name__)


def sync_batchnorm_parts(cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(submodule, config key)`` of the model parts configured with ``norm=SyncBN``."""
    norms = {"backbone": cfg.backbone.norm, "mask_branch": cfg.mask_branch.norm}
    return [(name, f"model.{name}.norm") for name, norm in norms.items() if norm == "SyncBN"]


def convert_sync_batchnorm(model: nn.Module, cfg: ModelConfig, world: int) -> None:
    """Turn the BatchNorm2d layers of the parts configured with SyncBN into SyncBatchNorm,
    before DDP wraps the model; with one process they stay BatchNorm2d (the same statistics),
    and a log line says so. The state-dict keys are those of BatchNorm2d either way, so
    checkpoints load into a single-process model."""
    parts = sync_batchnorm_parts(cfg)
    if parts and world == 1:
        logger.info("%s=SyncBN with one process: it normalises as BatchNorm2d", parts[0][1])
        return
    for name, _ in parts:
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))

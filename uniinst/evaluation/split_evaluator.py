"""Mask AP on the val split during training, in one process or across the ranks of a
distributed run: every rank predicts its share of the images, rank 0 gathers and scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from uniinst.config import ExperimentConfig
from uniinst.data.source import Split
from uniinst.data.transforms import eval_transform
from uniinst.evaluation.coco_eval import write_report
from uniinst.evaluation.coco_results import save_results


class SplitEvaluator:
    """Evaluates a model on ``split`` as rank ``rank`` of ``world`` (every rank calls it)."""

    def __init__(self, split: Split, cfg: ExperimentConfig, *, rank: int = 0, world: int = 1) -> None:
        self.split, self.rank, self.world = split, rank, world
        self.transform = eval_transform(cfg)

    def __call__(self, model: torch.nn.Module, out_dir: Path, extra: dict[str, Any]) -> dict[str, float] | None:
        """The metrics (rank 0; None on the others), with ``results.json``, ``metrics.json``
        and ``metrics.md`` written into ``out_dir``."""
        ids = self.split.image_ids
        results = self.split.predict(model, transform=self.transform, image_ids=ids[self.rank::self.world])
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        if self.rank != 0:
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        save_results(results, out_dir / "results.json")
        metrics = self.split.score(results)
        write_report(metrics, out_dir, extra={**self.split.details(), **extra})
        return metrics

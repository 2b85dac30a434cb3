"""Training metrics as JSON lines and TensorBoard events."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard under ``tensorboard/`` (skipped with a warning if TensorBoard is missing)."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def write(self, iteration: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        row = {"iteration": iteration, **{f"{prefix}{k}": float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}{k}", float(v), iteration)

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]

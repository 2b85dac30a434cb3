"""Training metrics as JSON lines and TensorBoard events."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard under ``tensorboard/`` (skipped with a warning if TensorBoard is missing).

    ``resume_at``: the iteration of the checkpoint a run resumes from. The rows and events
    written after it belong to iterations the run is about to redo, so they are dropped."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_at: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if resume_at is not None:
            drop_rows_after(self.path, resume_at)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                purge = None if resume_at is None else resume_at + 1
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

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


def drop_rows_after(path: Path, iteration: int) -> None:
    """Rewrite the metrics file ``path`` without its rows past ``iteration`` (and without a
    line cut short by a crash)."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("iteration", 0) > iteration:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
        logger.info("%s: dropped %d rows past iteration %d (redone after the resume)", path, dropped, iteration)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]

"""A search's results: one record per trial, written as a CSV and a Markdown table, plotted
against each searched key, and the best trial turned into a ready-to-train config."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from uniinst.config import ExperimentConfig, apply_values, to_dict
from uniinst.search.config import Param

METRICS = ("AP", "AP50", "AP75")

COMPLETED = "completed"
STOPPED = "stopped early"
FAILED = "error"
UNFINISHED = "unfinished"


@dataclass
class TrialRecord:
    """What a trial reached: its values of the searched keys, its last val metrics
    (fractions), the iteration of its last report and how it ended."""

    trial_id: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    iteration: int = 0
    state: str = UNFINISHED
    run: str = ""
    error: str = ""
    failures: int = 0

    def score(self, metric: str) -> float:
        value = self.metrics.get(metric)
        return float(value) if value is not None and math.isfinite(value) else -math.inf


def trial_state(status: str, iteration: int, max_iter: int) -> str:
    """The table's state from Tune's trial status: TERMINATED before the last iteration means
    the scheduler stopped the trial (or the search's time budget ran out)."""
    if status == "ERROR":
        return FAILED
    if status == "TERMINATED":
        return COMPLETED if iteration >= max_iter else STOPPED
    return UNFINISHED


def rank(records: Sequence[TrialRecord], metric: str) -> list[TrialRecord]:
    """Best first: completed trials by the metric, then the others by the metric."""
    return sorted(records, key=lambda r: (r.state != COMPLETED, -r.score(metric), r.trial_id))


def best_trial(records: Sequence[TrialRecord], metric: str) -> TrialRecord | None:
    """The trial with the highest metric among those that ran to the end, or among those that
    reported it at all when none did; None when no trial reported the metric."""
    reported = [r for r in records if r.score(metric) > -math.inf]
    completed = [r for r in reported if r.state == COMPLETED]
    pool = completed or reported
    return max(pool, key=lambda r: (r.score(metric), r.iteration)) if pool else None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _percent(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) or value < 0 else f"{100 * value:.1f}"


def write_csv(records: Sequence[TrialRecord], space: Sequence[Param], path: str | Path) -> Path:
    """One row per trial, best first: id, state, iteration, AP/AP50/AP75 (percent), the
    searched values, how often the trial failed and was retried, and its run folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial_id", "state", "iteration", *METRICS, *(p.key for p in space), "failures", "run", "error"])
        for r in records:
            out.writerow(
                [r.trial_id, r.state, r.iteration, *(_percent(r.metrics.get(m)) for m in METRICS),
                 *(r.params.get(p.key, "") for p in space), r.failures, r.run, r.error]
            )
    return path


def format_markdown(records: Sequence[TrialRecord], space: Sequence[Param]) -> str:
    header = ["trial", "state", "iteration", *METRICS, *(p.key for p in space), "failures"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in records:
        cells = [r.trial_id, r.state, str(r.iteration), *(_percent(r.metrics.get(m)) for m in METRICS)]
        cells += [_format_value(r.params.get(p.key, "")) for p in space] + [str(r.failures)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")


def plot_metric(
    records: Sequence[TrialRecord], space: Sequence[Param], out_dir: str | Path, *, metric: str = "AP"
) -> list[Path]:
    """One PNG per searched key: the metric (percent) of every trial that reported it against
    the trial's value; completed trials filled, early-stopped ones hollow; log axis for
    log-uniform keys; listed non-numeric values as categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [r for r in records if r.score(metric) > -math.inf and r.state != FAILED]
    paths = []
    for p in space:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
        categories = None if p.numeric else [str(v) for v in p.values]
        for state, style in ((COMPLETED, {}), (STOPPED, {"facecolors": "none"}), (UNFINISHED, {"marker": "x"})):
            group = [r for r in shown if r.state == state and p.key in r.params]
            if not group:
                continue
            xs = [categories.index(str(r.params[p.key])) if categories else float(r.params[p.key]) for r in group]
            ys = [100 * r.score(metric) for r in group]
            label = f"{state} ({len(group)}{', at the iteration shown' if state == STOPPED else ''})"
            ax.scatter(xs, ys, label=label, edgecolors="tab:blue", color="tab:blue", clip_on=False, **style)
            if state == STOPPED:
                for x, y, r in zip(xs, ys, group):
                    ax.annotate(str(r.iteration), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if categories:
            ax.set_xticks(range(len(categories)), categories)
        elif p.kind in ("uniform", "loguniform"):
            low, high = p.values
            log = p.kind == "loguniform"
            if log:
                ax.set_xscale("log")
                ax.minorticks_off()
                pad = (high / low) ** 0.03
                ax.set_xlim(low / pad, high * pad)
            else:
                pad = 0.03 * (high - low)
                ax.set_xlim(low - pad, high + pad)
            ticks = np.geomspace(low, high, 5) if log else np.linspace(low, high, 5)
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        top = max(max((100 * r.score(metric) for r in shown), default=0.0) * 1.1, 1.0)
        ax.set_ylim(-0.02 * top, top)
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"val mask {metric} (%)")
        ax.set_title(f"{metric} against {p.key} ({len(shown)} trials)")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{_file_name(p.key)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_best_config(
    experiment: ExperimentConfig, best: TrialRecord, path: str | Path, *, search_name: str, metric: str
) -> Path:
    """The experiment with the best trial's values, as a full YAML config that
    ``uniinst train --config`` takes; a header says where the values come from."""
    cfg = apply_values(experiment, best.params)
    cfg.name = f"{experiment.name}_{search_name}_best"
    cfg.train.output_dir = str(Path(experiment.train.output_dir).parent / cfg.name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = ", ".join(f"{k}={_format_value(v)}" for k, v in best.params.items())
    header = (
        f"# Best trial {best.trial_id} of search {search_name!r}: val mask {metric} "
        f"{_percent(best.metrics.get(metric))} at iteration {best.iteration} ({best.state}).\n"
        f"# Values found: {values}\n"
        "# The experiment's own schedule; train it with: uniinst train --config <this file>\n"
    )
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

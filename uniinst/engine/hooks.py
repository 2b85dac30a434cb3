"""What happens around the training steps, as small hook objects that
:meth:`uniinst.engine.trainer.Trainer.run` calls in order after every step: metrics, periodic
checkpoints, evaluations and the best model. The one-process trainer
(:mod:`uniinst.engine.local`) and every Ray Train worker (:mod:`uniinst.ray.train`) assemble
the same pieces; only where they write differs, and that is what each is given.

A period of 0 means "only at the end"; every hook also runs after the last iteration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from uniinst.config import TrainConfig
    from uniinst.engine.trainer import Trainer


class HookBase:
    """One piece of the training loop; :meth:`after_step` gets the step's metrics (its losses,
    ``lr``, ``data_time``, ``step_time`` and ``images_per_sec``) after ``trainer.iteration``
    counted the step."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass


def due(trainer: Trainer, period: int) -> bool:
    """Whether a hook of ``period`` runs at this iteration: every ``period``, and at the end."""
    it = trainer.iteration
    return (period > 0 and it % period == 0) or it >= trainer.max_iter


class MetricsLogger(HookBase):
    """Every ``period`` steps, the metrics averaged over them (the last ``lr``, and the
    ``eta_seconds`` left at this run's pace) go to ``write(iteration, metrics)``."""

    def __init__(self, period: int, write: Callable[[int, dict[str, float]], None]) -> None:
        self.period, self.write = max(period, 1), write
        self.window: list[dict[str, float]] = []
        self.logged_at = -1

    def before_train(self, trainer: Trainer) -> None:
        self.start_iter, self.start_time = trainer.iteration, time.perf_counter()

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.window.append(metrics)
        if not due(trainer, self.period):
            return
        avg = {k: sum(m[k] for m in self.window) / len(self.window) for k in self.window[0]}
        avg["lr"] = self.window[-1]["lr"]
        pace = (time.perf_counter() - self.start_time) / (trainer.iteration - self.start_iter)
        avg["eta_seconds"] = pace * (trainer.max_iter - trainer.iteration)
        self.window.clear()
        self.logged_at = trainer.iteration
        self.write(trainer.iteration, avg)


class PeriodicCheckpointer(HookBase):
    """``save(iteration)`` every ``period`` steps."""

    def __init__(self, period: int, save: Callable[[int], None]) -> None:
        self.period, self.save = period, save

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if due(trainer, self.period):
            self.save(trainer.iteration)


class EvalHook(HookBase):
    """``evaluate(iteration)`` every ``period`` steps; keeps the metrics it returns (None where
    this process does not score, as on the other ranks of a distributed run)."""

    def __init__(self, period: int, evaluate: Callable[[int], dict[str, float] | None]) -> None:
        self.period, self.evaluate = period, evaluate
        self.metrics: dict[str, float] | None = None
        self.evaluated_at = -1

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if due(trainer, self.period):
            self.metrics = self.evaluate(trainer.iteration)
            self.evaluated_at = trainer.iteration


class BestCheckpointer(HookBase):
    """After each evaluation of ``evals`` (placed before this hook), ``save(iteration,
    metrics)`` when its mask AP is the best so far."""

    def __init__(self, evals: EvalHook, save: Callable[[int, dict[str, float]], None]) -> None:
        self.evals, self.save = evals, save
        self.best_ap = float("-inf")

    def after_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        found = self.evals.metrics
        if self.evals.evaluated_at != trainer.iteration or found is None or found["AP"] <= self.best_ap:
            return
        self.best_ap = found["AP"]
        self.save(trainer.iteration, found)


class RunOutputs(Protocol):
    """Where a run's hooks write: its metrics, checkpoints, evaluations and best model."""

    def log(self, iteration: int, metrics: dict[str, float]) -> None: ...

    def checkpoint(self, iteration: int) -> None: ...

    def evaluate(self, iteration: int) -> dict[str, float] | None: ...

    def save_best(self, iteration: int, metrics: dict[str, float]) -> None: ...


def training_hooks(cfg: TrainConfig, outputs: RunOutputs, *, evaluates: bool) -> list[HookBase]:
    """The hooks every trainer assembles, at the config's periods: metrics, periodic
    checkpoints and, when there is a val split, evaluations and the best model."""
    hooks: list[HookBase] = [
        MetricsLogger(cfg.log_period, outputs.log),
        PeriodicCheckpointer(cfg.checkpoint_period, outputs.checkpoint),
    ]
    if evaluates:
        evals = EvalHook(cfg.eval_period, outputs.evaluate)
        hooks += [evals, BestCheckpointer(evals, outputs.save_best)]
    return hooks

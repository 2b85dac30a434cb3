"""The training hooks (uniinst/engine/hooks.py): when each runs, what the metrics logger
averages, and that the best checkpoint follows the evaluations."""

from __future__ import annotations

from dataclasses import dataclass

from uniinst.engine.hooks import BestCheckpointer, EvalHook, MetricsLogger, PeriodicCheckpointer


@dataclass
class _Loop:
    """What the hooks read of a trainer: its iteration and where it stops."""

    iteration: int
    max_iter: int


def _run(hooks, start: int, max_iter: int, metrics) -> None:
    loop = _Loop(start, max_iter)
    for hook in hooks:
        hook.before_train(loop)
    while loop.iteration < max_iter:
        loop.iteration += 1
        for hook in hooks:
            hook.after_step(loop, metrics(loop.iteration))


def test_periodic_hooks_run_every_period_and_at_the_end():
    saved, evaluated = [], []
    hooks = [PeriodicCheckpointer(3, saved.append), EvalHook(0, lambda it: evaluated.append(it) or None)]
    _run(hooks, start=1, max_iter=8, metrics=lambda it: {})
    assert saved == [3, 6, 8] and evaluated == [8]  # period 0: only at the end


def test_metrics_logger_averages_each_window_and_keeps_the_last_lr():
    logged: list[tuple[int, dict]] = []
    logger = MetricsLogger(2, lambda it, m: logged.append((it, m)))
    _run([logger], start=0, max_iter=5, metrics=lambda it: {"loss": float(it), "lr": 0.1 * it})
    assert [it for it, _ in logged] == [2, 4, 5]
    assert [m["loss"] for _, m in logged] == [1.5, 3.5, 5.0]
    assert [round(m["lr"], 6) for _, m in logged] == [0.2, 0.4, 0.5]
    assert logged[-1][1]["eta_seconds"] == 0.0 and all(m["eta_seconds"] >= 0 for _, m in logged)
    assert logger.logged_at == 5


def test_the_best_checkpoint_is_saved_only_when_an_evaluation_improves_ap():
    aps = {2: 0.3, 4: 0.2, 6: 0.5, 7: 0.5}
    evals = EvalHook(2, lambda it: {"AP": aps[it]})
    best: list[tuple[int, float]] = []
    hooks = [evals, BestCheckpointer(evals, lambda it, m: best.append((it, m["AP"])))]
    _run(hooks, start=0, max_iter=7, metrics=lambda it: {})
    assert best == [(2, 0.3), (6, 0.5)]  # 0.2 is worse and 0.5 at the end is no better

    # A rank that does not score (its evaluation returns None) never saves.
    silent = EvalHook(1, lambda it: None)
    never: list = []
    _run([silent, BestCheckpointer(silent, lambda it, m: never.append(it))], start=0, max_iter=3, metrics=lambda it: {})
    assert never == [] and silent.evaluated_at == 3

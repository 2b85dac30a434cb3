"""Input errors in Ray Train runs: a worker's ``ValueError`` or ``FileNotFoundError`` (bad data,
a bad config) is the same on every try, so it ends the run at once and reaches the caller as
itself, in one line.

Ray Train's controller unpickles its callbacks, and so imports the module that defines them:
this one imports neither torch nor the model, which keeps a run's controller start short."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayTaskError
from ray.train import ControllerError, Result, TrainingFailedError, UserCallback, WorkerGroupError

if TYPE_CHECKING:  # ray.train.torch imports torch
    from ray.train.torch import TorchTrainer

# Errors of the input (data, config): the same on every try, so never worth a restart.
INPUT_ERRORS = (ValueError, FileNotFoundError)


def first_input_error(errors: Iterable[BaseException]) -> BaseException | None:
    """The first input error among a worker group's errors (seen through a Ray task's
    wrapper, such as a failed Ray Data read), else None."""
    for error in errors:
        while isinstance(error, RayTaskError) and error.cause is not None:
            error = error.cause
        if isinstance(error, INPUT_ERRORS):
            return error
    return None


class EndAtInputError(UserCallback):
    """Ends a run at a worker's input error instead of letting Ray Train restart the worker
    group ``ray.max_failures`` times to fail the same way.

    FailureConfig cannot tell errors apart, and a worker that catches its error cannot stop
    its peers (they wait for it in collectives). This runs on the controller before Ray
    decides on a restart; an exception raised here becomes a ``ControllerError``, which Ray
    Train (2.60) does not retry."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        error = first_input_error(worker_exceptions.values())
        if error is not None:
            raise error


def fit_raising_input_errors(trainer: TorchTrainer) -> Result:
    """``trainer.fit()``, with a worker's input error raised as itself, in one line (Ray's
    error holds every worker's remote traceback)."""
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        if isinstance(exc, ControllerError):
            error = first_input_error([exc.controller_failure])
        elif isinstance(exc, WorkerGroupError):
            error = first_input_error(exc.worker_failures.values())
        else:
            error = None
        if error is None:
            raise
    lines = str(error).splitlines()
    if len(lines) > 1:
        # Ray Data appends its retry advice to the errors of its tasks.
        error.args = (lines[0],)
    raise error from None

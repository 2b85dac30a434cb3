"""Shard preparation on a Ray cluster: :func:`uniinst.data.prepare.convert_shard` as Ray tasks."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ray

from uniinst.data.prepare import Executor, ShardResult, ShardTask

logger = logging.getLogger(__name__)


def connect(address: str = "auto") -> None:
    """Join the Ray cluster at ``address``, or start a local Ray when there is none.

    ``"auto"`` means ``RAY_ADDRESS`` if set (a ``ray job submit`` job has it), else the
    cluster that ``ray start`` runs on this machine. A cluster that no longer answers (the
    address file left behind by a stopped one) is ignored rather than waited on, and so are
    Ray instances that other programs started with ``ray.init()``.
    """
    if ray.is_initialized():
        return
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        found = _local_cluster_address()
        if found is None:
            logger.info("no Ray cluster is running here: starting a local one")
            ray.init(address="local")
            return
        address = found
    ray.init(address=address)


def _local_cluster_address() -> str | None:
    """The address of the live cluster ``ray start`` left in Ray's temp folder, if any."""
    # Where Ray keeps it: RAY_TMPDIR, else TMPDIR, else /tmp (Ray's own lookup order on Linux).
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    path = Path(base) / "ray" / "ray_current_cluster"
    try:
        found = path.read_text().strip()
        host, port = found.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return found
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("ignoring %s: no Ray cluster answers at the address it names", path)
        return None


def ray_executor(*, max_in_flight: int | None = None, max_retries: int = 3, num_cpus: float = 1) -> Executor:
    """An executor for :func:`uniinst.data.prepare.prepare_dataset` running each shard as a
    Ray task, yielding results as they finish.

    Args:
        max_in_flight: shards submitted at once (default: twice the cluster's CPUs over
            ``num_cpus``, counted again as results come in, so that it grows with an
            autoscaling cluster), so a huge plan does not flood the scheduler.
        max_retries: how often a task is rerun after its worker dies or it raises an
            ``OSError`` (a store that failed to answer); bad input (ValueError) is final.
        num_cpus: CPUs reserved per task.

    A task gets the endpoint URL in its :class:`ShardTask`; credentials come from the
    workers' own environment or instance role.
    """

    def run(convert: Callable[[ShardTask], ShardResult], tasks: Sequence[ShardTask]) -> Iterator[ShardResult]:
        if not tasks:
            return
        connect()
        remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=[OSError])(convert)
        waiting = list(reversed(tasks))
        pending: list[ray.ObjectRef] = []
        try:
            while waiting or pending:
                # Read again as results come in: an autoscaling cluster grows with the demand.
                limit = max_in_flight or max(1, int(2 * ray.cluster_resources().get("CPU", 0) / num_cpus))
                while waiting and len(pending) < limit:
                    pending.append(remote.remote(waiting.pop()))
                (done,), pending = ray.wait(pending, num_returns=1)
                yield _get(done)
        finally:
            for ref in pending:
                ray.cancel(ref)

    return run


def _get(ref: ray.ObjectRef) -> ShardResult:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ValueError):
            # The message names the bad record; the remote traceback stays chained for debugging.
            raise err.cause from err
        raise

"""A task on a Dask worker stops when its flow run no longer wants it.

Dask cannot stop a task that a worker has begun. When a night fails (a candidate's error, an
interrupted flow, a flow process gone), the flow cancels its futures on the cluster; the
scheduler releases them, and the worker marks a running one `cancelled` and waits for it to end.
Without looking, the task trained on for minutes on a long-lived cluster, for a night that was
over. The long loops look: training between batches, ETS between series, and the wait for ETS
fitted in processes of the worker's own, which it then ends (the other baselines and a
network's forecast take seconds and do not look).
Looking reads the worker's own state (no message to the scheduler) and costs microseconds;
outside a Dask worker's task it returns at once.

It holds for tasks as the flows submit them: each under a key of its own (Prefect's keys carry
the task run's id) and with no Dask dependencies. A key submitted again while its first run
executes, or a task whose input was lost with its worker, can pass through `cancelled` while
still wanted, and would be stopped.
"""

from __future__ import annotations

import sys
import threading


class TaskReleased(RuntimeError):
    """The cluster released this running task: the flow run that submitted it wants it no more."""


def raise_if_released() -> None:
    """Raise TaskReleased if this thread runs a Dask task that its worker has marked cancelled."""
    distributed = sys.modules.get("distributed")
    if distributed is None:  # never imported: not on a worker
        return
    try:
        worker = distributed.get_worker()
    except ValueError:  # not inside a worker's task
        return
    key = worker.active_threads.get(threading.get_ident())
    task = worker.state.tasks.get(key) if key is not None else None
    # The worker's state machine: an executing task the scheduler released is "cancelled" until
    # it ends (asked for again meanwhile, it is "executing" once more)
    if task is not None and task.state == "cancelled":
        raise TaskReleased(f"stopped on worker {worker.address}: the cluster released task {key!r} "
                           "(its flow run cancelled it, or ended)")

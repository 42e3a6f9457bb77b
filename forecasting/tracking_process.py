"""MLflow logging in a process of its own, beside the process that trains.

The nightly flow logs each candidate's MLflow run (its params, losses, metrics and a figure:
0.3-0.5 s of Python apiece) while the next candidate trains. In a thread of the training process
that Python holds the GIL, and training is a Python loop of short kernel calls that each give
the GIL up and must take it back: beside a thread that is busy in Python, an LSTM backtest that
took 9.4 s alone took 467 s (2026-11-29, 2 cores, benchmarks' sales config). The logging thread
is busy only in bursts, but every burst stops training for its whole length. In a process of its
own the same work runs on another core and training never waits for it.

One worker process (spawned: safe beside torch's and Prefect's threads), started on first use and
kept for the process's later nights (a backfill, a test session), so that its start-up - imports
of mlflow, matplotlib and pandas, 2-3 s - is paid once, and by another core. Jobs are functions
of this module with picklable arguments; the error a job raises is raised again by `call`.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_pool: ProcessPoolExecutor | None = None
_proven: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()  # pools that have finished a job
_in_this_process = False  # set once no worker could start here; jobs then run in the caller
_pool_lock = threading.Lock()  # the flow's threads may call at the same time


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_without_teardown)
        return _pool


def start() -> None:
    """Start the worker now and have it import what logging needs, while this process loads data."""
    if not _in_this_process:
        threading.Thread(target=call, args=(_import_logging,), name="tracking-process-start",
                         daemon=True).start()


def call(job: Callable[..., T], *args: Any) -> T:
    """`job(*args)` in the worker process; its result, or its error raised here.

    A worker that died (killed, out of memory) fails this call with TrackingError, which the
    flow's tracking tasks retry: the next call starts a new worker. Where no worker can start at
    all - a daemon process may not have children, and a script that runs the flow at import,
    without `if __name__ == "__main__":`, makes a spawned worker fail its start - jobs run in
    the calling thread from then on, as before this module, after one warning.
    """
    if _in_this_process:
        return job(*args)
    pool = _executor()
    try:
        future = pool.submit(job, *args)
    except BrokenProcessPool as exc:  # a RuntimeError too: caught first
        return _after_death(pool, exc, job, *args)
    except (RuntimeError, AssertionError, OSError) as exc:  # e.g. "daemonic processes are not allowed to have children"
        _run_here_from_now(repr(exc))
        return job(*args)
    try:
        result = future.result()
    except BrokenProcessPool as exc:
        return _after_death(pool, exc, job, *args)
    _proven.add(pool)
    return result


def _after_death(pool: ProcessPoolExecutor, exc: BrokenProcessPool, job: Callable[..., T], *args: Any) -> T:
    _discard(pool)
    if pool not in _proven:
        _run_here_from_now(f"its worker died before finishing a first job ({exc})")
        return job(*args)
    from forecasting.tracking import TrackingError  # imported here: the worker never needs it early

    raise TrackingError(f"the MLflow logging process stopped before it finished {job.__name__}: {exc}") from exc


def _run_here_from_now(why: str) -> None:
    global _in_this_process
    if not _in_this_process:
        _in_this_process = True
        log.warning("MLflow logging runs in this process's background thread, where it slows training: "
                    "no logging process could start here: %s", why)


def _discard(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None


# ------------------------------------------------------------------ jobs: run in the worker

_clients: dict[str, Any] = {}  # tracking URI -> MlflowClient, in the worker


def _exit_without_teardown() -> None:
    """Have the worker, once told to stop, exit without tearing down its modules.

    Finalising torch, mlflow and matplotlib took 0.7 s, and the flow's process waits for its
    worker at exit. Every job has returned by then, and MLflow's client keeps nothing unsent,
    so the worker ends with os._exit, as the last of multiprocessing's exit finalizers.
    """
    def exit_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    multiprocessing.util.Finalize(None, exit_now, exitpriority=-1000)


def _import_logging() -> None:
    import forecasting.pipeline  # noqa: F401  (mlflow, pandas, the job's data classes)
    import forecasting.plots  # noqa: F401  (matplotlib)


def _client(tracking_uri: str) -> Any:
    """One checked client per tracking URI for the worker's life (see tracking.connect)."""
    if tracking_uri not in _clients:
        from forecasting import tracking
        from forecasting.config import Settings

        _clients[tracking_uri] = tracking.connect(Settings(mlflow_tracking_uri=tracking_uri))
    return _clients[tracking_uri]


def write_candidate_run(tracking_uri: str, entry: Any) -> str:
    """A candidate's MLflow run from its `pipeline.CandidateLog`; the run id."""
    from forecasting import pipeline

    return pipeline.write_candidate_log(_client(tracking_uri), entry)

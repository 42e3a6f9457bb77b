"""Every MLflow call of the flows, made by a process of its own beside the process that trains.

The nightly flow talks to MLflow while its candidates train: the night's parent run, each
candidate's run (params, losses, metrics, a figure: 0.3-0.5 s of Python apiece), the current
champion, the new model's registration. In a thread of the training process that Python holds
the GIL, and training is a Python loop of short kernel calls that each give the GIL up and must
take it back: beside a thread that is busy in Python, an LSTM backtest that took 9.4 s alone took
467 s (2026-11-29, 2 cores, benchmarks' sales config). In a process of its own the same work runs
on another core and training never waits for it. The flow's process never imports mlflow at all:
that import (1-1.4 s) and matplotlib's are the worker's, paid while this process loads the data.

One worker process (spawned: safe beside torch's and Prefect's threads), started on first use and
kept for the process's later nights (a backfill, a test session). Jobs are the functions at the
end of this module, with picklable arguments (the tracking URI first, for each job that reaches
a store); the error a job raises is raised again by `call`. What the flows need of MLflow's
world without importing it - the errors, the registered model's name, a loaded champion - is
defined here.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import re
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from forecasting.config import scrub

if TYPE_CHECKING:  # the flow's process never imports these at run time (see the docstring)
    import pandas as pd

    from forecasting.forecasters import Forecaster
    from forecasting.pipeline import CandidateLog, NightLog

T = TypeVar("T")

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"


class TrackingError(RuntimeError):
    """MLflow cannot be used; the message names the tracking URI (password masked)."""


class TrackingRefused(RuntimeError):
    """MLflow answered and refused (credentials, permissions, no such endpoint): not retried.
    The message names the tracking URI (password masked)."""


# MLflow's words for an HTTP call that may pass: no connection, no answer in time, or 5xx
# answers until its own retries (408, 429, 500, 502, 503, 504) ran out, which urllib3 reports as
# an exception too ("too many 502 error responses"). Any other status is an answer
# ("failed with error code 403 != 200"): a 401, 403 or 404 is refused, not retried.
_MLFLOW_HTTP_TRANSIENT = re.compile(r"API request to .* failed with (?:timeout )?exception")
_MLFLOW_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def mlflow_error_may_pass(exc: Exception) -> bool:
    """Whether an MlflowException is worth retrying: a busy or locked store, a rate limit, a
    server that did not answer. Not: a refusal, a missing model, a bad value."""
    return getattr(exc, "error_code", None) in _MLFLOW_TRANSIENT_CODES or bool(
        _MLFLOW_HTTP_TRANSIENT.search(str(exc)))


def tracking_error_may_pass(exc: BaseException) -> bool:
    """Whether an error of an MLflow job is worth retrying: TrackingError, a connection failure
    or timeout (builtin or requests'), an MlflowException that mlflow_error_may_pass.

    requests and mlflow are looked up, not imported: the flow's process has them only once it
    has unpickled one of their errors from the logging process.
    """
    if isinstance(exc, TrackingRefused):
        return False
    if isinstance(exc, (TrackingError, ConnectionError, TimeoutError)):
        return True
    requests_errors = sys.modules.get("requests.exceptions")
    if requests_errors is not None and isinstance(exc, (requests_errors.ConnectionError, requests_errors.Timeout)):
        return True
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    return (mlflow_errors is not None and isinstance(exc, mlflow_errors.MlflowException)
            and mlflow_error_may_pass(exc))


class NoChampion(LookupError):
    """No version of the dataset's registered model carries the `champion` alias yet."""


class UnusableChampion(LookupError):
    """The version the `champion` alias points at is not one this pipeline can load (e.g. one
    registered by hand, without the pipeline's files): a lasting state, not retried. A night
    replaces it (pipeline.decide); `predict` refuses it."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(version, reason)  # both in args: the error survives the logging process's pickling
        self.version = version
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def registered_model_name(dataset: str) -> str:
    return f"{dataset}-forecaster"


@dataclass(frozen=True)
class RegisteredForecaster:
    forecaster: Forecaster
    version: str
    run_id: str  # the MLflow run that logged the model
    quantiles: list[float]  # interval half-widths per step, calibrated on its backtest
    trained_through: pd.Timestamp | None  # the last timestamp of the data it was fitted on
    interval_level: float | None = None  # the level its quantiles were calibrated for


_pool: ProcessPoolExecutor | None = None
# Once any worker has finished a job here, workers can start: a later death (a crash, the OOM
# killer) is that worker's, and fails the call rather than moving MLflow into this process.
_a_worker_finished_a_job = False
_in_this_process = False  # set once no worker could start here; jobs then run in the caller
_pool_lock = threading.Lock()  # the flow's threads may call at the same time


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_without_teardown)
            # Stop the worker when this process ends. A process that multiprocessing started
            # itself (how `forecasting serve` runs each flow run) ends by joining its children
            # before any other exit hook, concurrent.futures' among them: the idle worker never
            # heard to stop, and the run's process never ended. Finalizers of priority >= 0 run
            # before that join, in any process, highest first: above 10, where multiprocessing
            # closes its queues, the pool's among them (the stop would then never be sent).
            multiprocessing.util.Finalize(None, _pool.shutdown, exitpriority=100)
        return _pool


class StartedWhileImported(RuntimeError):
    """A flow was run by the script that a starting worker process was importing."""


def start() -> None:
    """Start the worker now and have it import what logging needs, while this process loads data.

    A spawned worker first imports the script that started its parent (as multiprocessing's
    spawn does); a script that runs a flow at import, without `if __name__ == "__main__":`,
    would run the whole night again inside that worker. It stops here instead, with this error;
    the worker's start fails and the parent's night logs from its own thread (see `call`).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # what spawn sets while it imports
        raise StartedWhileImported(
            "a flow was run while a new MLflow logging process (forecasting.tracking_process) was "
            "importing the script that started it: put that script's flow call under "
            "`if __name__ == \"__main__\":`, as Python's multiprocessing requires")
    if not _in_this_process:
        threading.Thread(target=call, args=(_import_logging,), name="tracking-process-start",
                         daemon=True).start()


def call(job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`job(*args, **kwargs)` in the worker process; its result, or its error raised here.

    A worker that died (killed, out of memory) fails this call with TrackingError, which the
    flow's tracking tasks retry: the next call starts a new worker. Where no worker can start at
    all - a daemon process may not have children, and a script that runs the flow at import,
    without `if __name__ == "__main__":`, makes a spawned worker fail its start - jobs run in
    the calling thread from then on, as before this module, after one warning.

    An error whose text holds the password of a URI among the arguments (MLflow's HTTP errors
    and requests' carry the tracking URI's user and password) comes back with it masked, as
    TrackingError where it may pass (tracking_error_may_pass), else TrackingRefused: retried as
    the original would have been, and no more.
    """
    try:
        return _call(job, *args, **kwargs)
    except (TrackingError, TrackingRefused):
        raise  # our own messages, built with the URL masked
    except Exception as exc:
        text = str(exc)
        masked = _masked(text, args)
        if masked == text:
            raise
        masked_type = TrackingError if tracking_error_may_pass(exc) else TrackingRefused
        # `from None`: the original error, and the worker's traceback chained to it, hold it too.
        raise masked_type(f"{type(exc).__name__}: {masked}") from None


def _masked(text: str, args: tuple[Any, ...]) -> str:
    """`text` without the password of any URI among a job's arguments."""
    for uri in {arg for arg in args if isinstance(arg, str) and "://" in arg and "@" in arg}:
        text = scrub(text, uri)
    return text


def _call(job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    global _a_worker_finished_a_job
    if _in_this_process:
        return job(*args, **kwargs)
    pool = _executor()
    try:
        future = pool.submit(_in_worker, job, *args, **kwargs)
    except BrokenProcessPool as exc:  # a RuntimeError too: caught first
        return _after_death(pool, exc, job, *args, **kwargs)
    except (RuntimeError, AssertionError, OSError) as exc:  # e.g. "daemonic processes are not allowed to have children"
        _run_here_from_now(repr(exc))
        return job(*args, **kwargs)
    try:
        result = future.result()
    except BrokenProcessPool as exc:
        return _after_death(pool, exc, job, *args, **kwargs)
    _a_worker_finished_a_job = True
    return result


def _after_death(pool: ProcessPoolExecutor, exc: BrokenProcessPool, job: Callable[..., T], *args: Any,
                 **kwargs: Any) -> T:
    _discard(pool)
    if not _a_worker_finished_a_job:
        _run_here_from_now(f"its worker died before finishing a first job ({exc})")
        return job(*args, **kwargs)
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


def _in_worker(job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`job` in the worker. An error that would not rebuild in the caller - an exception class
    whose constructor takes other arguments than it keeps, as some storage clients' do - broke
    the pool there ("terminated abruptly"): it was retried as a dead worker, and the worker
    replaced. It comes back as TrackingError or TrackingRefused instead, by the same rule."""
    try:
        return job(*args, **kwargs)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - any failure to round-trip is the case handled
            again = TrackingError if tracking_error_may_pass(exc) else TrackingRefused
            raise again(_masked(f"{type(exc).__module__}.{type(exc).__name__} in {job.__name__}: {exc}", args)) from None
        raise

_clients: dict[str, Any] = {}  # tracking URI -> MlflowClient, in the worker


def _exit_without_teardown() -> None:
    """Have the worker, once told to stop, exit without tearing down its modules; and exit
    when its parent ends without telling it.

    Finalising torch, mlflow and matplotlib took 0.7 s, and the flow's process waits for its
    worker at exit. Every job has returned by then, and MLflow's client keeps nothing unsent,
    so the worker ends with os._exit, as the last of multiprocessing's exit finalizers.
    """
    def exit_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    multiprocessing.util.Finalize(None, exit_now, exitpriority=-1000)
    # A parent killed outright (SIGKILL: the OOM killer, a scheduler's timeout) never tells the
    # worker to stop, and it waited for a next job for good, ~0.5 GB, reparented to init.
    parent = multiprocessing.parent_process()
    if parent is not None:
        def exit_with_parent() -> None:
            parent.join()  # returns once the parent has ended, however it ended
            os._exit(1)

        threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def _import_logging() -> None:
    import matplotlib.figure  # noqa: F401  (the figures, drawn by forecasting.plots)

    import forecasting.tracking  # noqa: F401  (mlflow, torch, pandas)


def _client(tracking_uri: str) -> Any:
    """One checked client per tracking URI for the worker's life (see tracking.connect).

    MLflow's global tracking and registry URIs are set to it on every call: model logging and
    artifact downloads use them, and a long-lived worker may serve nights of several stores.
    """
    import mlflow

    if tracking_uri not in _clients:
        from forecasting import tracking
        from forecasting.config import Settings

        _clients[tracking_uri] = tracking.connect(Settings(mlflow_tracking_uri=tracking_uri))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return _clients[tracking_uri]


def start_night(tracking_uri: str, dataset: str, name: str, tags: dict[str, str],
                params: dict[str, Any]) -> tuple[str, str]:
    """The night's parent run in the dataset's experiment: (experiment id, run id)."""
    from forecasting import tracking

    client = _client(tracking_uri)
    experiment = tracking.experiment_id(client, dataset)
    return experiment, tracking.start_run(client, experiment=experiment, name=name, tags=tags, params=params)


def warm_model_logging() -> None:
    """MLflow's package map, built before the night's registration needs it (see tracking)."""
    from forecasting import tracking

    tracking.warm_model_logging()


def current_champion(tracking_uri: str, dataset: str) -> RegisteredForecaster | None:
    """The version the `champion` alias points at, loaded; None when there is none yet."""
    from forecasting import tracking

    return tracking.load_champion(_client(tracking_uri), dataset)


def write_candidate_run(tracking_uri: str, entry: CandidateLog) -> str:
    """A candidate's MLflow run from its `pipeline.CandidateLog`; the run id."""
    from forecasting import tracking

    return tracking.write_candidate_log(_client(tracking_uri), entry)


def register(tracking_uri: str, dataset: str, fitted: Forecaster, *, run_id: str, example: pd.DataFrame,
             quantiles: list[float], level: float, trained_through: pd.Timestamp) -> str:
    """Log `fitted` to its candidate's run, register it with what a later night needs of it
    (interval quantiles, its data's end); the new version. Idempotent per run."""
    from forecasting import tracking

    client = _client(tracking_uri)
    version = tracking.log_and_register(client, fitted, run_id=run_id, dataset=dataset, panel=example,
                                        quantiles=quantiles, level=level)
    tracking.tag_version(client, dataset, version, quantiles=quantiles, level=level, trained_through=trained_through)
    return version


def champion_version(tracking_uri: str, dataset: str) -> str | None:
    """The version the `champion` alias points at now (None: no alias)."""
    from forecasting import tracking

    current = tracking.champion_version(_client(tracking_uri), dataset)
    return str(current.version) if current is not None else None


def served_versions(tracking_uri: str, dataset: str) -> list[str]:
    """The versions whose forecasts production served (see tracking.served_versions)."""
    from forecasting import tracking

    return tracking.served_versions(_client(tracking_uri), dataset)


def mark_served(tracking_uri: str, dataset: str, version: str) -> None:
    """Tag `version` as one whose forecasts production served (see tracking.mark_served)."""
    from forecasting import tracking

    tracking.mark_served(_client(tracking_uri), dataset, version)


def set_champion(tracking_uri: str, dataset: str, version: str, replaces: str | None) -> str | None:
    """Move `champion` to `version` if it still points at `replaces`; where it points afterwards
    (see tracking.set_champion)."""
    from forecasting import tracking

    return tracking.set_champion(_client(tracking_uri), dataset, version, replaces=replaces)


def restore_champion(tracking_uri: str, dataset: str, version: str | None, from_version: str) -> None:
    """Point `champion` back at `version` if it still points at `from_version` (see tracking.restore_champion)."""
    from forecasting import tracking

    tracking.restore_champion(_client(tracking_uri), dataset, version, from_version=from_version)


def finish_night(tracking_uri: str, entry: NightLog) -> None:
    """The parent run's review (comparison, forecast figure, outcome), then the run ended."""
    from forecasting import tracking

    tracking.write_night_log(_client(tracking_uri), entry)


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    from forecasting import tracking

    tracking.end_run(_client(tracking_uri), run_id, status=status)

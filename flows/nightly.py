"""The nightly Prefect flow: a short sequence of tasks; the work lives in `forecasting/`.

Retries (with backoff) are on the database and MLflow tasks only, and only for errors that can
pass: bad data or config (ValueError) fails at once. Torch runs in this one thread, one task at
a time, on at most the thread count set once at the flow's start (each network on the fewest of
them that train it fastest: forecasting.thread_probe), so Prefect's task threads never
oversubscribe the cores.
Every MLflow call is made by a process of its own (forecasting.tracking_process), so this
process never imports mlflow and never gives training's GIL to MLflow's Python. One other
thread waits for those calls while the candidates train: the night's parent run, the current
champion, each candidate's run as its backtest ends, then the new model's registration while
the forecast is made.

Scale-out: under a Dask task runner (`on_dask`, `forecasting run --dask`, or
$FORECASTING_DASK_ADDRESS read when this module is imported, which is how deployments get it)
the compute tasks go to the cluster: every candidate's backtest at once (a network as one task,
a per-series baseline as one task per shard of series), the champion's final fit, and the
forecast, one task per shard. Database and MLflow tasks stay in the flow's process, so workers
never need the database or tracking URLs; each worker process sets torch's threads once. A
night that fails cancels its tasks there: those not yet started never start, and a running
one stops at its next training batch or series, its task run Cancelled (forecasting.stopping).
"""

# Deployments name this flow by module path, `flows.nightly:nightly` (prefect.yaml, `forecasting
# serve`): each run's process loads it from there, and the tasks Dask pickles for a cluster then
# name `flows.nightly`, which a worker with the package installed imports. (By file path it was
# loaded as a module `nightly`, which no remote worker has.)
# No `from __future__ import annotations` here: a flow cloudpickled into a new process (Prefect's
# `run_flow_in_subprocess`, which runners use for flows they hold in memory) keeps only the
# globals its body uses; string annotations then named types (DatasetConfig) the child could not
# resolve, and the run failed its parameter validation. Evaluated annotations travel with it.

import contextlib
import contextvars
import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pandas as pd
from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Completed, State
from prefect.task_runners import TaskRunner

from forecasting import baselines, db, pipeline, prefect_heartbeats, progress, shards, stopping, tracking_process
from forecasting.config import BASELINES, LOCAL_DASK, DatasetConfig, Settings, check_dask_address, load_config
from forecasting.forecasters import Forecaster
from forecasting.tracking_process import NoChampion, RegisteredForecaster, TrackingError, UnusableChampion
from forecasting.thread_probe import omp_num_threads
from forecasting.train import check_training_device, configure_torch_threads
from forecasting.validate import (ValidationFailed, ValidationReport, observed_rows, refuse_negatives_under_log_scaling,
                                 validate)


# Every flow run's end (each backfill night's too) without the wait for Prefect's heartbeat thread.
prefect_heartbeats.install()

# What can pass by itself: a database or tracking server that is down, busy or unreachable.
TRANSIENT = (db.DatabaseError, *db.CONNECTION_ERRORS, TrackingError, ConnectionError, TimeoutError)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble only; never bad input, bad SQL, permissions or bugs."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except Exception as exc:  # MLflow's and requests' errors, come back from the logging process
        return tracking_process.tracking_error_may_pass(exc)
    return False


IO_RETRIES: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=is_transient, cache_policy=NO_CACHE
)
COMPUTE: dict[str, Any] = dict(cache_policy=NO_CACHE)
WARNED_STATE = "Completed with dropped series"  # a COMPLETED run that left series out


@task(name="load", **IO_RETRIES)
def load_series(config: DatasetConfig, as_of: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.Timestamp]:
    panel, effective = pipeline.load(db.make_engine(Settings()), config, as_of)
    get_run_logger().info(
        "loaded %d rows, %d series of %r up to %s", len(panel), panel["series_id"].nunique(),
        config.name, effective,
    )
    return panel, effective


@task(name="validate", **COMPUTE)
def validate_series(config: DatasetConfig, panel: pd.DataFrame, as_of: pd.Timestamp) -> ValidationReport:
    report = validate(panel, config, input_window=pipeline.input_window(config), as_of=as_of)
    logger = get_run_logger()
    for problem in report.problems:
        logger.warning(problem.describe(config.name))
    if report.dropped:
        logger.warning("dropped %d series under policy 'drop': %s", len(report.dropped), report.dropped)
    return report


def _tracking_uri() -> str:
    return Settings().mlflow_tracking_uri


@task(name="start-tracking", **IO_RETRIES)
def start_tracking(config: DatasetConfig, as_of: pd.Timestamp, report: ValidationReport) -> tuple[str, str]:
    """The night's parent MLflow run: (experiment id, run id)."""
    return tracking_process.call(
        tracking_process.start_night, _tracking_uri(), config.name,
        f"{config.name} {as_of:%Y-%m-%d} nightly",
        {"dataset": config.name, "as_of": str(as_of), "role": "nightly",
         "prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or "")},
        {"freq": config.freq, "horizon": config.horizon, "season_length": config.season_length,
         "models": ",".join(config.models), "validation_policy": config.validation.policy,
         "series": report.panel["series_id"].nunique(),
         "dropped_series": ",".join(report.dropped) or "-",
         "filled_values": sum(report.filled.values())},
    )


@task(name="load-champion", **IO_RETRIES)
def current_champion(config: DatasetConfig) -> RegisteredForecaster | UnusableChampion | None:
    """The registered version the `champion` alias points at, loaded; None before the first.

    A version this pipeline cannot load (registered by hand) comes back as its UnusableChampion,
    not raised: a night replaces it (pipeline.decide) rather than failing every night after the
    training, and `predict` refuses it.
    """
    try:
        return tracking_process.call(tracking_process.current_champion, _tracking_uri(), config.name)
    except UnusableChampion as exc:
        get_run_logger().warning("%s", exc)
        return exc


def _cancelled_when_released(compute: Callable[..., Any]) -> Callable[..., Any]:
    """A compute task that its cluster released while it ran (forecasting.stopping) ends with its
    task run Cancelled, not Failed (the night failed elsewhere) nor Completed."""
    @functools.wraps(compute)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return compute(*args, **kwargs)
        except stopping.TaskReleased as exc:
            get_run_logger().info("%s", exc)
            return Cancelled(message=str(exc))

    run.__prefect_task_source__ = compute  # Prefect's task key hashes the task's own code, not this wrapper's
    return run


@task(name="backtest", **COMPUTE)
@_cancelled_when_released
def backtest(config: DatasetConfig, panel: pd.DataFrame, name: str) -> pipeline.CandidateResult | State:
    _torch_threads_on_worker()
    budget = config.training.max_epochs * config.training.ensemble * (
        config.backtest.windows if config.backtest.retrain else 1)
    with progress.epochs(f"{config.name} {name} backtest", budget if name in config.models else 0) as bar:
        result = pipeline.backtest_candidate(config, panel, name, on_epoch=bar)
    get_run_logger().info(
        "%s: backtest MASE %.4f in %.1fs", name, result.aggregate["mase"], result.fit_seconds
    )
    return result


@task(name="log-candidate", **IO_RETRIES)
def log_candidate(experiment: str, parent: str, config: DatasetConfig,
                  result: pipeline.CandidateResult, panel: pd.DataFrame, as_of: pd.Timestamp) -> str:
    entry = pipeline.candidate_log(experiment=experiment, parent_run_id=parent, config=config,
                                   result=result, panel=panel, as_of=as_of)
    # Written by the logging process, so that its Python never holds this process's GIL while
    # the next candidate trains (see tracking_process); this thread waits without holding it.
    return tracking_process.call(tracking_process.write_candidate_run, _tracking_uri(), entry)


@task(name="compare", **COMPUTE)
def compare(config: DatasetConfig, results: list[pipeline.CandidateResult]) -> pipeline.Comparison:
    comparison = pipeline.compare(results, dataset=config.name)
    get_run_logger().info("champion of the backtest: %s", comparison.champion)
    return comparison


@task(name="fit-champion", **COMPUTE)
@_cancelled_when_released
def fit_champion(config: DatasetConfig, panel: pd.DataFrame, name: str) -> Forecaster | State:
    _torch_threads_on_worker()
    return pipeline.fit_final(config, panel, name)


@task(name="register", **IO_RETRIES)
def register(config: DatasetConfig, fitted: Forecaster, champion_run_id: str, example: pd.DataFrame,
             quantiles: list[float], as_of: pd.Timestamp) -> str:
    """Tonight's refitted champion logged to its candidate run and registered: its version."""
    version = tracking_process.call(
        tracking_process.register, _tracking_uri(), config.name, fitted, run_id=champion_run_id,
        example=example, quantiles=quantiles, level=config.interval_level, trained_through=as_of)
    get_run_logger().info("registered %s as version %s", fitted.name, version)
    return version


@task(name="decide", **COMPUTE)
def decide(config: DatasetConfig, panel: pd.DataFrame, comparison: pipeline.Comparison, fitted: Forecaster,
           quantiles: list[float], current: RegisteredForecaster | UnusableChampion | None,
           backfill: bool) -> pipeline.Decision:
    decision = pipeline.decide(config=config, panel=panel, comparison=comparison, fitted=fitted,
                               quantiles=quantiles, current=current, backfill=backfill)
    get_run_logger().info("promotion: %s (%s)", decision.decision, decision.reason)
    return decision


@task(name="forecast", **COMPUTE)
@_cancelled_when_released
def forecast(config: DatasetConfig, forecaster: Forecaster, quantiles: list[float],
             panel: pd.DataFrame) -> pd.DataFrame | State:
    """The forecast rows, not yet naming a model version (tonight's may still be registering)."""
    _torch_threads_on_worker()
    return pipeline.forecast(forecaster, config=config, panel=panel, quantiles=quantiles, version=None, run_id=None)


def _alias(config: DatasetConfig) -> pipeline.Alias:
    """The dataset's `champion` alias, through the MLflow logging process."""
    uri = _tracking_uri()
    return pipeline.Alias(
        read=lambda: tracking_process.call(tracking_process.champion_version, uri, config.name),
        move=lambda version, replaces: tracking_process.call(tracking_process.set_champion, uri, config.name,
                                                             version, replaces),
        restore=lambda version, from_version: tracking_process.call(tracking_process.restore_champion, uri,
                                                                    config.name, version, from_version))


@task(name="write", **IO_RETRIES)
def write_night(config: DatasetConfig, as_of: pd.Timestamp, forecasts: pd.DataFrame, scores: pd.DataFrame,
                actuals: pd.DataFrame, promotion: pipeline.Promotion) -> tuple[int, int, pipeline.Promotion]:
    """The rows, and the alias moved if the decision says so, as one step (pipeline.write_night):
    only where the alias still is where the night read it; otherwise the night is `superseded`
    and writes nothing."""
    engine = db.make_engine(Settings())
    try:
        n_forecasts, n_scores, promotion = pipeline.write_night(
            engine, config=config, as_of=as_of, forecasts=forecasts, scores=scores, actuals=actuals,
            promotion=promotion, alias=_alias(config))
    finally:
        engine.dispose()
    logger = get_run_logger()
    if promotion.decision == "superseded":
        logger.warning("dataset %r: nothing written for as_of %s: %s", config.name, as_of, promotion.reason)
    else:
        logger.info("wrote %d forecast rows and %d score rows for as_of %s", n_forecasts, n_scores, as_of)
    return n_forecasts, n_scores, promotion


@task(name="write", **IO_RETRIES)
def write_champions_forecast(config: DatasetConfig, as_of: pd.Timestamp, forecasts: pd.DataFrame,
                             actuals: pd.DataFrame, version: str) -> int:
    """predict's rows, if champion `version` still is the champion (else ChampionMoved). The
    version is tagged as served first, so that a backfill leaves these rows whatever the alias
    does next."""
    tracking_process.call(tracking_process.mark_served, _tracking_uri(), config.name, version)
    engine = db.make_engine(Settings())
    try:
        written = pipeline.write_with_champion(engine, config=config, as_of=as_of, forecasts=forecasts,
                                               actuals=actuals, version=version, alias=_alias(config))
    finally:
        engine.dispose()
    get_run_logger().info("wrote %d forecast rows for as_of %s", written, as_of)
    return written


@task(name="finish-tracking", **IO_RETRIES)
def finish_tracking(parent: str, config: DatasetConfig, comparison: pipeline.Comparison, panel: pd.DataFrame,
                    rows: pd.DataFrame, promotion: pipeline.Promotion, summary: pipeline.RunSummary) -> None:
    decision_tags, decision_metrics = pipeline.decision_record(promotion)
    entry = pipeline.night_log(
        parent, config=config, comparison=comparison, panel=panel, forecast_rows=rows,
        metrics={**decision_metrics, "forecast_rows": summary.forecast_rows,
                 **{f"stage_seconds_{k.replace(':', '_')}": v for k, v in summary.stage_seconds.items()}},
        tags={**decision_tags, "champion": summary.champion, "model_version": summary.model_version,
              "dropped_series": ",".join(summary.dropped_series) or "-"},
    )
    tracking_process.call(tracking_process.finish_night, _tracking_uri(), entry)


# ---------------------------------------------------------------------------------- scale-out


def task_runner(address: str | None) -> TaskRunner | None:
    """Where a flow's submitted tasks run: None (no address) is Prefect's default, and the flows
    then call every task in their own process, one after another; LOCAL_DASK a Dask
    LocalCluster of single-threaded worker processes, one per core, started for the flow run and
    closed after it; anything else the address of a running Dask scheduler (tcp://host:8786)."""
    if not address:
        return None
    check_dask_address(address, name="the Dask address")
    from prefect_dask import DaskTaskRunner

    if address == LOCAL_DASK:
        return DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1, "processes": True})
    return DaskTaskRunner(address=address)


def on_dask(flow_: Flow[..., Any], address: str | None = None) -> Flow[..., Any]:
    """`flow_` with its compute tasks on the Dask scheduler at `address` (None: a local cluster)."""
    return flow_.with_options(task_runner=task_runner(address or LOCAL_DASK))


def _cluster() -> Any | None:
    """The Dask client of this flow run's task runner; None when its tasks run here."""
    runner = FlowRunContext.get().task_runner
    dask = sys.modules.get("prefect_dask.task_runners")  # imported by whoever made a DaskTaskRunner
    return runner.client if dask is not None and isinstance(runner, dask.DaskTaskRunner) else None


def _threads(client: Any) -> int:
    """Tasks the cluster runs at once: the number of shards per-series work is split into."""
    return max(1, sum(client.nthreads().values()))


def _submit(task_: Any, *args: Any) -> Any:
    """task_.submit(*args) to the cluster, naming the Prefect API the workers must report to.

    A submitted task carries this process's Prefect settings. Without PREFECT_API_URL this
    process runs a temporary local Prefect API: naming it lets local workers report there
    rather than each start one of its own on the same database. (Remote workers cannot reach
    it: a remote cluster needs PREFECT_API_URL set to a server that both sides reach.)
    """
    if PREFECT_API_URL.value():
        return task_.submit(*args)
    with temporary_settings(updates={PREFECT_API_URL: str(FlowRunContext.get().client.api_url)}):
        return task_.submit(*args)


@contextlib.contextmanager
def _cancelled_on_error(client: Any, futures: list[Any]) -> Iterator[None]:
    """Cancels on the cluster the submitted futures not yet done when the block raises (or a
    generator around it is closed); the error goes on unchanged.

    Without it a failed night's tasks went on starting: the task runner's client, whose close
    releases them, closes only at the flow run's end, after its failure path (seconds: the
    background MLflow jobs), and a long-lived cluster meanwhile trained the next candidates.
    A Prefect Dask future has no cancel of its own; its distributed.Future's keeps a task from
    starting (it then leaves no task run). Dask cannot stop a task a worker has already begun,
    but marks it released: training looks between batches and ETS between series
    (forecasting.stopping), and the task run ends Cancelled there.
    """
    try:
        yield
    except BaseException:
        pending = [future.wrapped_future for future in futures if not future.wrapped_future.done()]
        if pending:
            with contextlib.suppress(Exception):  # a scheduler gone too: the original error matters
                client.cancel(pending)
        raise


@functools.cache
def _torch_threads_on_worker() -> None:
    """Once per Dask worker process: torch gets OMP_NUM_THREADS threads (Dask's nanny sets 1), so
    that workers x threads per worker, sized to the cores, never oversubscribe them. Elsewhere
    nothing: the flow set torch's threads for its own process."""
    try:
        get_worker = sys.modules["distributed"].get_worker
        get_worker()
    except (KeyError, ValueError):  # distributed not loaded, or not inside a worker
        return
    configure_torch_threads(omp_num_threads() or 1)


def _artifact_key(dataset: str, what: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{dataset}-{what}".lower())


# A config as a mapping is validated by load_config, not by Prefect: Prefect's validation of a
# DatasetConfig parameter logged pydantic's raw error list (with a misleading "config.str:
# Input should be a valid string") and never named the dataset or the file's keys as ours does.
ConfigParameter = DatasetConfig | dict[str, Any] | str


@flow(name="nightly-forecast", task_runner=task_runner(Settings().forecasting_dask_address))
def nightly(config: ConfigParameter, as_of: str | datetime | None = None, backfill: bool = False) -> Any:
    """Load, validate, backtest every candidate, promote a champion, write the next n steps.

    `backfill`: a night of a backfill, which forecasts with its own model and never moves the
    `champion` alias. Calling it returns the run summary (a dict); see `_final_state` for the
    run's state.
    """
    config = load_config(config)
    # Served and API runs too (the CLI checks it before it starts one): not after the baselines
    check_training_device(config.training.device, dataset=config.name)
    baselines.workers()  # FORECASTING_WORKERS: refused now, not at the ETS backtest
    configure_torch_threads()
    if _cluster() is None:  # here, not on Dask's single-threaded workers
        pipeline.ask_training_threads(config)  # a first night's probes, before the logging process starts
    tracking_process.start()  # its imports run on another core while this process loads the data
    # load, validate, one per candidate, fit, the parent's and champion's logging, decide,
    # forecast, registration's rest, the other candidates' logging, write (and the alias)
    total = 2 + len(config.candidates) + 7
    with progress.stages(f"{config.name} nightly", total) as on_stage:
        summary = _nightly(config, as_of, pipeline.StageTimer(on_stage), backfill)
    return _final_state(config, summary)


def _final_state(config: DatasetConfig, summary: dict[str, Any]) -> Any:
    """The summary; when validation dropped series, inside a state that says so.

    Prefect has no 'warning' state type: the run is COMPLETED (the other series were written)
    under the name WARNED_STATE, with the dropped series in its message, so the UI and
    `prefect flow-run ls` show at a glance that a night was not whole.
    """
    dropped = summary["dropped_series"]
    if not dropped:
        return summary
    shown = ", ".join(dropped[:20]) + (f" and {len(dropped) - 20} more" if len(dropped) > 20 else "")
    return Completed(data=summary, name=WARNED_STATE, message=(
        f"dataset {config.name!r}: {len(dropped)} series dropped by validation (policy 'drop'), "
        f"not forecast: {shown}; see model_scores rows with status 'dropped'"))


def _nightly(config: DatasetConfig, as_of: str | datetime | None, timer: pipeline.StageTimer,
             backfill: bool = False) -> dict[str, Any]:
    """The body of `nightly`, each stage timed (and shown on the progress bar at a terminal)."""
    with timer.stage("load"):
        panel, effective_as_of = load_series(config, pipeline.parse_as_of(as_of, config.source.timezone))
    with timer.stage("validate"):
        report = validate_series(config, panel, effective_as_of)
        refuse_negatives_under_log_scaling(report.panel, config)  # before training, not at the first network
    loaded, panel = panel, report.panel
    started: Future[tuple[str, str]] | None = None
    try:
        results, logged = [], {}
        # This thread waits for the logging process (tracking_process) while the candidates
        # train: first the night's parent run, the current champion and MLflow's package map for
        # registration (tracking.warm_model_logging), then each candidate's run (params, losses,
        # a plot) as soon as its backtest is done, and at last the new model's registration while
        # the forecast is made. So tracking adds to the night only what is left of it by then.
        # One thread: the jobs reach the process in order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking") as background:
            def in_background(fn: Any, *args: Any) -> Future[Any]:
                # The flow run's context travels along: these are task runs of this flow.
                return background.submit(contextvars.copy_context().run, fn, *args)

            started = in_background(start_tracking, config, effective_as_of, report)
            current = in_background(current_champion, config)
            # Before any model is logged; a failure only costs registration time.
            in_background(tracking_process.call, tracking_process.warm_model_logging)
            for result in _backtests(config, panel, timer):
                _fail_fast(started)  # MLflow unreachable: stop before training the next candidate
                logged[result.name] = in_background(_log_candidate_after, started, config, result, panel,
                                                    effective_as_of)
                results.append(result)
            comparison = compare(config, results)
            with timer.stage("fit-champion"):
                fitted = _here_or_on_cluster(fit_champion, config, panel, comparison.champion)
            with timer.stage("tracking"):  # what is left of the parent's and champion's logging
                _, parent = started.result()
                champion_run_id = logged[comparison.champion].result()
            with timer.stage("decide"):
                quantiles = pipeline.calibrate(config, panel, comparison)
                registered = in_background(register, config, fitted, champion_run_id,
                                           pipeline.signature_example(panel), quantiles, effective_as_of)
                decision = decide(config, panel, comparison, fitted, quantiles, current.result(), backfill)
            with timer.stage("forecast"):
                rows = _forecast(config, decision, panel)
            with timer.stage("register"):  # what is left of the registration
                promotion = decision.promotion(registered.result(), champion_run_id)
                rows = pipeline.with_provenance(rows, version=promotion.version, run_id=promotion.run_id)
            with timer.stage("tracking"):  # what is left of the other candidates' logging
                run_ids = {name: future.result() for name, future in logged.items()}
        with timer.stage("write"):
            dropped = [p for p in report.problems if p.series_id in report.dropped]
            scores = pipeline.score_rows(comparison, run_ids, promotion=promotion, dropped=dropped)
            # The alias moves here, with the rows: it never points past what was written.
            n_forecasts, n_scores, promotion = write_night(config, effective_as_of, rows, scores,
                                                           observed_rows(loaded, report), promotion)
        summary = pipeline.summarise(config, effective_as_of, comparison, promotion, parent,
                                     n_forecasts, n_scores, timer.seconds, report.dropped)
        finish_tracking(parent, config, comparison, panel, rows, promotion, summary)
    except BaseException:
        # The background thread has finished (the executor waits for it): a parent run it
        # started is marked FAILED. Keep the original error, not MLflow's.
        if started is not None and started.done() and started.exception() is None:
            _, parent = started.result()
            with contextlib.suppress(Exception):
                tracking_process.call(tracking_process.end_run, _tracking_uri(), parent, "FAILED")
        raise
    _publish(config, comparison, summary)
    return dataclasses.asdict(summary)


def _log_candidate_after(started: Future[tuple[str, str]], config: DatasetConfig,
                         result: pipeline.CandidateResult, panel: pd.DataFrame, as_of: pd.Timestamp) -> str:
    """log_candidate under the night's parent run, once `start_tracking` has made it."""
    experiment, parent = started.result()  # its error, if it failed, is this one's too
    return log_candidate(experiment, parent, config, result, panel, as_of)


def _fail_fast(started: Future[Any]) -> None:
    """Raise start_tracking's error as soon as it has failed (after its retries)."""
    if started.done():
        started.result()


def _backtests(config: DatasetConfig, panel: pd.DataFrame,
               timer: pipeline.StageTimer) -> Iterator[pipeline.CandidateResult]:
    """Each candidate's backtest, in config.candidates order.

    Here: one after another, each as it is needed. On a Dask cluster: all submitted at once, a
    network as one task (a global model: trained on every series), a per-series baseline as one
    task per shard of series (joined into what one task would give), then collected in order.
    """
    client = _cluster()
    if client is None:
        for name in config.candidates:
            with timer.stage(f"backtest:{name}"):
                result = backtest(config, panel, name)
            yield result
        return
    parts = shards.split(panel, _threads(client))
    futures = {name: [_submit(backtest, config, part, name) for part in (parts if name in BASELINES else [panel])]
               for name in config.candidates}
    # A candidate's error, or the night's while it holds a result (the generator is closed),
    # cancels the backtests not yet done.
    every = [future for submitted in futures.values() for future in submitted]
    with _cancelled_on_error(client, every):
        for name, submitted in futures.items():
            with timer.stage(f"backtest:{name}"):  # on a cluster: the wait for its last shard
                _wait_failing_fast(client, submitted, every)
                done = [future.result() for future in submitted]
                result = done[0] if len(done) == 1 else shards.join_backtests(config, panel, done)
            yield result


def _wait_failing_fast(client: Any, awaited: list[Any], watched: list[Any]) -> None:
    """Wait until every future of `awaited` is done; raise the error of any of `watched` (which
    holds them) as soon as its task fails.

    Results are taken in the candidates' order; waiting on one candidate at a time, a later
    candidate's error waited for every earlier one to finish (a network training for minutes)
    before the night failed and cancelled the rest.
    """
    from distributed import wait

    unseen = {future.wrapped_future: future for future in watched}
    # Until each awaited result has been read once (its Prefect future keeps it), not until Dask
    # says done: a future whose worker died goes back to not done after it was read
    awaited_keys = {future.wrapped_future for future in awaited}
    while True:
        for ended in [key for key in unseen if key.done()]:
            unseen.pop(ended).result()  # a failed task's error, raised now (a success is kept for later)
        if not awaited_keys & unseen.keys():
            return
        # not empty: what is left of awaited is not done (a wait on none would return at once)
        with client.as_current():  # wait() takes the default client; the flow's process may have none
            wait([key for key in unseen if not key.done()], return_when="FIRST_COMPLETED")


def _here_or_on_cluster(task_: Any, *args: Any) -> Any:
    """task_(*args), in this process or, when the flow runs on a Dask cluster, as a task there."""
    client = _cluster()
    if client is None:
        return task_(*args)
    future = _submit(task_, *args)
    with _cancelled_on_error(client, [future]):  # the flow interrupted while it waits
        return future.result()


def _forecast(config: DatasetConfig, decision: pipeline.Decision, panel: pd.DataFrame) -> pd.DataFrame:
    """The forecast rows; on a Dask cluster one task per shard of series, joined in panel order."""
    client = _cluster()
    if client is None:
        return forecast(config, decision.forecaster, decision.quantiles, panel)
    futures = [_submit(forecast, config, decision.forecaster, decision.quantiles, part)
               for part in shards.split(panel, _threads(client))]
    with _cancelled_on_error(client, futures):
        return pd.concat([future.result() for future in futures], ignore_index=True)


def _publish(config: DatasetConfig, comparison: pipeline.Comparison, summary: pipeline.RunSummary) -> None:
    """What the Prefect UI shows of the night: the comparison and what was written."""
    table = comparison.table().round(4)
    create_table_artifact(key=_artifact_key(config.name, "comparison"), table=table.to_dict(orient="records"),
                          description=f"{config.name} as_of {summary.as_of}: backtest scores, champion {summary.champion}")
    dropped = ", ".join(summary.dropped_series) or "none"
    create_markdown_artifact(
        key=_artifact_key(config.name, "outcome"),
        markdown=(f"# {config.name} as of {summary.as_of}\n\n"
                  f"- champion: **{summary.champion}** (version {summary.model_version}, "
                  f"{summary.decision})\n"
                  f"- forecast rows written: {summary.forecast_rows}; score rows: {summary.score_rows}\n"
                  f"- dropped series: {dropped}\n"),
        description=f"{config.name} nightly outcome",
    )
    get_run_logger().info("done: %s", summary)


@flow(name="predict-with-champion")
def predict(config: ConfigParameter, as_of: str | datetime | None = None) -> dict[str, Any]:
    """Forecast with the registered champion, no training; replaces that as_of's forecast rows."""
    config = load_config(config)
    baselines.workers()  # FORECASTING_WORKERS: refused now, not at the ETS forecast
    configure_torch_threads()
    tracking_process.start()  # its imports run on another core while this process loads the data
    panel, effective_as_of = load_series(config, pipeline.parse_as_of(as_of, config.source.timezone))
    report = validate_series(config, panel, effective_as_of)
    champion = current_champion(config)
    if isinstance(champion, UnusableChampion):
        raise UnusableChampion(champion.version, f"{champion.reason}; point the alias "
                               f"{tracking_process.CHAMPION_ALIAS!r} at a version this pipeline registered, "
                               "or run `forecasting run` to train and promote one")
    if champion is None:
        raise NoChampion(
            f"dataset {config.name!r}: no version of {tracking_process.registered_model_name(config.name)!r} "
            f"has the alias {tracking_process.CHAMPION_ALIAS!r} yet; run `forecasting run` first"
        )
    unlike = pipeline.unlike_config(champion, config)
    if unlike is not None:
        raise pipeline.RequestRefused(f"dataset {config.name!r}: {unlike}; run `forecasting run` to train and "
                                      "promote a champion for this config")
    if champion.trained_through is not None and champion.trained_through > effective_as_of:
        raise pipeline.RequestRefused(
            f"dataset {config.name!r}: champion v{champion.version} was trained on data through "
            f"{champion.trained_through}, after as_of {effective_as_of}; a forecast for that date "
            f"would use later data. Use `forecasting run --as-of` (or backfill) for past dates"
        )
    rows = pipeline.forecast(champion.forecaster, config=config, panel=report.panel,
                             quantiles=champion.quantiles, version=champion.version, run_id=champion.run_id)
    n_forecasts = write_champions_forecast(config, effective_as_of, rows, observed_rows(panel, report),
                                           champion.version)
    return {"dataset": config.name, "as_of": str(effective_as_of), "model": champion.forecaster.name,
            "model_version": champion.version, "forecast_rows": n_forecasts}


@flow(name="backfill", task_runner=task_runner(Settings().forecasting_dask_address))
def backfill(config: ConfigParameter, start: str, end: str) -> list[dict[str, Any]]:
    """The nightly flow for every as_of from start to end at the dataset's freq, oldest first;
    a date with no data of its own (after the data's end, in a gap) is skipped, with a warning,
    rather than repeat the night before it.

    Under a Dask task runner every night runs on that one cluster (a subflow would otherwise
    keep its own task runner).
    """
    config = load_config(config)
    first, last = (pipeline.parse_as_of(start, config.source.timezone),
                   pipeline.parse_as_of(end, config.source.timezone))
    if first is None or last is None or first > last:
        raise pipeline.RequestRefused(f"backfill range `--start` ({start!r}) .. `--end` ({end!r}) is empty or "
                                      "reversed")
    dates = pd.date_range(first, last, freq=config.freq)
    if len(dates) == 0:
        raise pipeline.RequestRefused(f"no {config.freq!r} timestamps between {start!r} and {end!r}")
    times = data_times(config, last)
    nights, skipped = pipeline.backfill_nights(dates, times, config.freq)
    if not nights:
        raise pipeline.RequestRefused(f"dataset {config.name!r}: no {config.freq!r} date from {start!r} to {end!r} "
                                      "has data of its own (the range is after the data's end, before its start, or "
                                      "in a gap)")
    nights = _leaving_production_alone(config, nights, pipeline.effective_as_ofs(nights, times), start, end)
    if skipped:
        get_run_logger().warning(
            "dataset %r: %d as_of date(s) skipped, which have no data of their own (after the data's end, in a "
            "gap, or before its start) and would repeat the night of the date before them: %s",
            config.name, len(skipped), ", ".join(f"{d:%Y-%m-%d %H:%M}" for d in skipped[:10]))
    client = _cluster()
    night = nightly if client is None else nightly.with_options(task_runner=task_runner(client.scheduler.address))
    summaries = [night(config, as_of=date.to_pydatetime(), backfill=True) for date in nights]
    record_actuals(config)
    return summaries


def _leaving_production_alone(config: DatasetConfig, nights: list[pd.Timestamp], as_ofs: list[pd.Timestamp],
                              start: str, end: str) -> list[pd.Timestamp]:
    """The backfill's nights without those whose as_of (`as_ofs`, each night's effective one)
    holds a champion's forecast, the current one's or an earlier one's: production's, which a
    backfill night would replace with its own model. A night after production's newest is run,
    with a warning: until the next scheduled night, current_forecasts shows its forecast."""
    champions = champions_nights(config)
    logger = get_run_logger()
    production = [d for d, as_of in zip(nights, as_ofs) if as_of in champions]
    if production:
        shown = ", ".join(f"{d:%Y-%m-%d %H:%M}" for d in production[:10])
        if len(production) == len(nights):
            raise pipeline.RequestRefused(f"dataset {config.name!r}: every date from {start!r} to {end!r} holds a "
                                          f"champion's forecast (production's nights: {shown}); `forecasting run "
                                          "--as-of` redoes one")
        logger.warning(
            "dataset %r: %d as_of date(s) skipped, whose forecast a champion made (production's nights; a "
            "backfill night would replace it with its own model): %s; `forecasting run --as-of` redoes one",
            config.name, len(production), shown)
    newest = max(champions) if champions else None
    later = [d for d, as_of in zip(nights, as_ofs) if newest is not None and as_of > newest]
    if later:
        logger.warning("dataset %r: %d night(s) after production's newest (%s), from %s: until the next scheduled "
                       "night, current_forecasts shows this backfill's forecast, not the champion's",
                       config.name, len(later), newest, f"{later[0]:%Y-%m-%d %H:%M}")
    return [d for d in nights if d not in set(production)]


@task(name="actuals", **IO_RETRIES)
def record_actuals(config: DatasetConfig) -> int:
    """After a backfill: the observations up to the data's end that its forecasts can meet.

    Each night reads only up to its as_of, so the newest observations (those after the last
    backfilled date) met no backfilled forecast in `forecast_accuracy` until the next scheduled
    night read them. Validated as a night does (filled values are never actuals); where the
    latest data fail validation, the next night's own failure reports it, and this warns only.
    """
    engine = db.make_engine(Settings())
    try:
        try:
            panel, as_of = pipeline.load(engine, config, None)
            report = validate(panel, config, input_window=pipeline.input_window(config), as_of=as_of)
        except (ValidationFailed, db.DataError) as exc:  # the nights are written: warn, and leave it to the next
            get_run_logger().warning("dataset %r: actuals after the backfill not recorded: %s", config.name, exc)
            return 0
        written = pipeline.write_actuals(engine, config=config, actuals=observed_rows(panel, report))
    finally:
        engine.dispose()
    get_run_logger().info("recorded %d new or restated actuals of %r up to %s", written, config.name, as_of)
    return written


@task(name="champions-nights", **IO_RETRIES)
def champions_nights(config: DatasetConfig) -> set[pd.Timestamp]:
    """The as_of dates whose stored forecast a champion made (the current one, or one before
    it): production's nights, which a backfill leaves alone (it would replace them with its
    own models)."""
    versions = tracking_process.call(tracking_process.served_versions, _tracking_uri(), config.name)
    if not versions:
        return set()
    engine = db.make_engine(Settings())
    try:
        with db.naming_connection_errors(engine), engine.connect() as conn:
            return set(db.as_ofs_forecast_by(conn, dataset=config.name, versions=versions))
    finally:
        engine.dispose()


@task(name="data-times", **IO_RETRIES)
def data_times(config: DatasetConfig, until: pd.Timestamp) -> pd.DatetimeIndex:
    """The timestamps of the dataset's rows up to `until`."""
    engine = db.make_engine(Settings())
    try:
        with db.naming_connection_errors(engine), engine.connect() as conn:
            return db.read_times(conn, config, until=until)
    finally:
        engine.dispose()

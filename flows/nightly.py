"""The nightly Prefect flow: a short sequence of tasks; the work lives in `forecasting/`.

Retries (with backoff) are on the database and MLflow tasks only, and only for errors that can
pass: bad data or config (ValueError) fails at once. Torch runs in this one thread, one task at
a time, with its thread count set once, so Prefect's task threads never oversubscribe 2 cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from datetime import datetime
from typing import Any

import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from forecasting import db, pipeline, progress, tracking
from forecasting.config import DatasetConfig, Settings, load_config
from forecasting.forecasters import Forecaster
from forecasting.train import configure_torch_threads
from forecasting.validate import ValidationReport, observed_rows, validate


# What can pass by itself: a database or tracking server that is down, busy or unreachable.
TRANSIENT = (db.DatabaseError, *db.CONNECTION_ERRORS, tracking.TrackingError, ConnectionError,
             TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble only; never bad input, bad SQL, permissions or bugs."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except MlflowException as exc:  # MLflow wraps failed HTTP calls; other codes are real errors
        return exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or (
            "API request to" in str(exc))
    except Exception:
        return False
    return False


IO_RETRIES: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=is_transient, cache_policy=NO_CACHE
)
COMPUTE: dict[str, Any] = dict(cache_policy=NO_CACHE)


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


@task(name="start-tracking", **IO_RETRIES)
def start_tracking(config: DatasetConfig, as_of: pd.Timestamp, report: ValidationReport) -> tuple[Any, str, str]:
    client = tracking.connect(Settings())
    experiment = tracking.experiment_id(client, config.name)
    parent = tracking.start_run(
        client,
        experiment=experiment,
        name=f"{config.name} {as_of:%Y-%m-%d} nightly",
        tags={"dataset": config.name, "as_of": str(as_of), "role": "nightly",
              "prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": str(flow_run.name or "")},
        params={"freq": config.freq, "horizon": config.horizon, "season_length": config.season_length,
                "models": ",".join(config.models), "validation_policy": config.validation.policy,
                "series": report.panel["series_id"].nunique(),
                "dropped_series": ",".join(report.dropped) or "-",
                "filled_values": sum(report.filled.values())},
    )
    return client, experiment, parent


@task(name="backtest", **COMPUTE)
def backtest(config: DatasetConfig, panel: pd.DataFrame, name: str) -> pipeline.CandidateResult:
    budget = config.training.max_epochs * config.training.ensemble * (
        config.backtest.windows if config.backtest.retrain else 1)
    with progress.epochs(f"{config.name} {name} backtest", budget if name in config.models else 0) as bar:
        result = pipeline.backtest_candidate(config, panel, name, on_epoch=bar)
    get_run_logger().info(
        "%s: backtest MASE %.4f in %.1fs", name, result.aggregate["mase"], result.fit_seconds
    )
    return result


@task(name="log-candidate", **IO_RETRIES)
def log_candidate(client: Any, experiment: str, parent: str, config: DatasetConfig,
                  result: pipeline.CandidateResult, panel: pd.DataFrame, as_of: pd.Timestamp) -> str:
    return pipeline.log_candidate(client, experiment=experiment, parent_run_id=parent, config=config,
                                  result=result, panel=panel, as_of=as_of)


@task(name="compare", **COMPUTE)
def compare(results: list[pipeline.CandidateResult]) -> pipeline.Comparison:
    comparison = pipeline.compare(results)
    get_run_logger().info("champion of the backtest: %s", comparison.champion)
    return comparison


@task(name="fit-champion", **COMPUTE)
def fit_champion(config: DatasetConfig, panel: pd.DataFrame, name: str) -> Forecaster:
    return pipeline.fit_final(config, panel, name)


@task(name="register", **IO_RETRIES)
def register(client: Any, config: DatasetConfig, panel: pd.DataFrame,
             comparison: pipeline.Comparison, fitted: Forecaster,
             champion_run_id: str, parent: str) -> pipeline.Promotion:
    promotion = pipeline.register_and_decide(
        client, config=config, panel=panel, comparison=comparison, fitted=fitted,
        champion_run_id=champion_run_id, parent_run_id=parent,
    )
    get_run_logger().info("promotion: %s (%s)", promotion.decision, promotion.reason)
    return promotion


@task(name="promote", **IO_RETRIES)
def promote(client: Any, config: DatasetConfig, promotion: pipeline.Promotion) -> None:
    pipeline.promote(client, config=config, promotion=promotion)


@task(name="forecast", **COMPUTE)
def forecast(config: DatasetConfig, promotion: pipeline.Promotion, panel: pd.DataFrame) -> pd.DataFrame:
    return pipeline.forecast(promotion.forecaster, config=config, panel=panel, quantiles=promotion.quantiles,
                             version=promotion.version, run_id=promotion.run_id)


@task(name="write", **IO_RETRIES)
def write_results(config: DatasetConfig, as_of: pd.Timestamp, forecasts: pd.DataFrame,
                  scores: pd.DataFrame | None, actuals: pd.DataFrame) -> tuple[int, int]:
    written = pipeline.write(db.make_engine(Settings()), config=config, as_of=as_of,
                             forecasts=forecasts, scores=scores, actuals=actuals)
    get_run_logger().info("wrote %d forecast rows and %d score rows for as_of %s", *written, as_of)
    return written


@task(name="finish-tracking", **IO_RETRIES)
def finish_tracking(client: Any, parent: str, config: DatasetConfig, comparison: pipeline.Comparison,
                    panel: pd.DataFrame, rows: pd.DataFrame, summary: pipeline.RunSummary) -> None:
    pipeline.log_night(
        client, parent, config=config, comparison=comparison, panel=panel, forecast_rows=rows,
        metrics={"forecast_rows": summary.forecast_rows,
                 **{f"stage_seconds_{k.replace(':', '_')}": v for k, v in summary.stage_seconds.items()}},
        tags={"champion": summary.champion, "model_version": summary.model_version,
              "dropped_series": ",".join(summary.dropped_series) or "-"},
    )


def _artifact_key(dataset: str, what: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{dataset}-{what}".lower())


@flow(name="nightly-forecast")
def nightly(config: DatasetConfig | str, as_of: str | datetime | None = None) -> dict[str, Any]:
    """Load, validate, backtest every candidate, promote a champion, write the next n steps."""
    config = load_config(config)
    configure_torch_threads()
    # load, validate, tracking, one per candidate and its logging, fit, register, forecast,
    # write, promote
    total = 3 + 2 * len(config.candidates) + 5
    with progress.stages(f"{config.name} nightly", total) as on_stage:
        return _nightly(config, as_of, pipeline.StageTimer(on_stage))


def _nightly(config: DatasetConfig, as_of: str | datetime | None, timer: pipeline.StageTimer) -> dict[str, Any]:
    """The body of `nightly`, each stage timed (and shown on the progress bar at a terminal)."""
    with timer.stage("load"):
        panel, effective_as_of = load_series(config, pipeline.parse_as_of(as_of))
    with timer.stage("validate"):
        report = validate_series(config, panel, effective_as_of)
    loaded, panel = panel, report.panel
    with timer.stage("tracking"):
        client, experiment, parent = start_tracking(config, effective_as_of, report)
    try:
        results, run_ids = [], {}
        for name in config.candidates:
            with timer.stage(f"backtest:{name}"):
                result = backtest(config, panel, name)
            with timer.stage("tracking"):
                run_ids[name] = log_candidate(client, experiment, parent, config, result, panel, effective_as_of)
            results.append(result)
        comparison = compare(results)
        with timer.stage("fit-champion"):
            fitted = fit_champion(config, panel, comparison.champion)
        with timer.stage("register"):
            promotion = register(client, config, panel, comparison, fitted,
                                 run_ids[comparison.champion], parent)
        with timer.stage("forecast"):
            rows = forecast(config, promotion, panel)
        with timer.stage("write"):
            scores = pipeline.score_rows(comparison, run_ids, champion=promotion.forecaster.name)
            n_forecasts, n_scores = write_results(config, effective_as_of, rows, scores,
                                                  observed_rows(loaded, report))
        with timer.stage("register"):  # only now: the alias never points past what was written
            promote(client, config, promotion)
        summary = pipeline.summarise(config, effective_as_of, comparison, promotion, parent,
                                     n_forecasts, n_scores, timer.seconds, report.dropped)
        finish_tracking(client, parent, config, comparison, panel, rows, summary)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error, not MLflow's
            tracking.end_run(client, parent, status="FAILED")
        raise
    _publish(config, comparison, summary)
    return dataclasses.asdict(summary)


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


@task(name="load-champion", **IO_RETRIES)
def load_champion(config: DatasetConfig) -> tracking.RegisteredForecaster:
    client = tracking.connect(Settings())
    found = tracking.load_champion(client, config.name)
    if found is None:
        raise tracking.NoChampion(
            f"dataset {config.name!r}: no version of {tracking.registered_model_name(config.name)!r} "
            f"has the alias {tracking.CHAMPION_ALIAS!r} yet; run `forecasting run` first"
        )
    return found


@flow(name="predict-with-champion")
def predict(config: DatasetConfig | str, as_of: str | datetime | None = None) -> dict[str, Any]:
    """Forecast with the registered champion, no training; replaces that as_of's forecast rows."""
    config = load_config(config)
    configure_torch_threads()
    panel, effective_as_of = load_series(config, pipeline.parse_as_of(as_of))
    report = validate_series(config, panel, effective_as_of)
    champion = load_champion(config)
    if champion.trained_through is not None and champion.trained_through > effective_as_of:
        raise ValueError(
            f"dataset {config.name!r}: champion v{champion.version} was trained on data through "
            f"{champion.trained_through}, after as_of {effective_as_of}; a forecast for that date "
            f"would use later data. Use `forecasting run --as-of` (or backfill) for past dates"
        )
    rows = pipeline.forecast(champion.forecaster, config=config, panel=report.panel,
                             quantiles=champion.quantiles, version=champion.version, run_id=champion.run_id)
    n_forecasts, _ = write_results(config, effective_as_of, rows, None, observed_rows(panel, report))
    return {"dataset": config.name, "as_of": str(effective_as_of), "model": champion.forecaster.name,
            "model_version": champion.version, "forecast_rows": n_forecasts}


@flow(name="backfill")
def backfill(config: DatasetConfig | str, start: str, end: str) -> list[dict[str, Any]]:
    """The nightly flow for every as_of from start to end at the dataset's freq, oldest first."""
    config = load_config(config)
    first, last = pipeline.parse_as_of(start), pipeline.parse_as_of(end)
    if first is None or last is None or first > last:
        raise ValueError(f"backfill range `--start` ({start!r}) .. `--end` ({end!r}) is empty or reversed")
    dates = pd.date_range(first, last, freq=config.freq)
    if len(dates) == 0:
        raise ValueError(f"no {config.freq!r} timestamps between {start!r} and {end!r}")
    return [nightly(config, as_of=date.to_pydatetime()) for date in dates]

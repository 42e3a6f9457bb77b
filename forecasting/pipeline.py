"""The steps of a nightly run, as plain functions the Prefect flow calls one after another.

load -> validate -> backtest each candidate -> compare -> register/promote -> forecast -> write.
Nothing here knows about Prefect, so each step can be tested and reused by the CLI's `predict`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import Engine

from forecasting import db, intervals, tracking
from forecasting.backtest import BacktestResult, choose_champion, run_backtest
from forecasting.config import DatasetConfig
from forecasting.forecasters import Forecaster, default_input_window, make_forecaster
from forecasting.metrics import score
from forecasting.plots import forecast_vs_actual

log = logging.getLogger(__name__)


class StageTimer:
    """Wall seconds per stage of a run, printed at the end (the speed target is per stage)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def parse_as_of(as_of: str | datetime | None) -> pd.Timestamp | None:
    if as_of is None or as_of == "":
        return None
    try:
        return pd.Timestamp(as_of)
    except (ValueError, TypeError):
        raise ValueError(
            f"`as_of` ({as_of!r}) is not an ISO 8601 date or date-time, e.g. 2017-12-01"
        ) from None


def load(engine: Engine, config: DatasetConfig, as_of: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The series up to as_of, and the effective as_of: the last timestamp of data used."""
    try:
        with engine.connect() as conn:
            panel = db.read_dataset(conn, config, as_of=as_of)
    except db.CONNECTION_ERRORS as exc:
        raise db.connect_error(engine, exc) from None  # its text may hold the URL
    if panel.empty:
        when = f" up to as_of {as_of}" if as_of is not None else ""
        raise db.DataError(f"dataset {config.name!r}: the source holds no rows{when}")
    return panel, panel["ts"].max()


def input_window(config: DatasetConfig) -> int:
    if config.training.input_window is not None:
        return config.training.input_window
    return default_input_window(config.horizon, config.season_length)


# ---------------------------------------------------------------------------------- candidates


@dataclass
class CandidateResult:
    name: str
    backtest: BacktestResult
    fit_seconds: float
    coverage: float  # share of backtest actuals inside the nominal interval (see intervals)

    @property
    def aggregate(self) -> dict[str, float]:
        scores = self.backtest.scores
        row = scores[scores["series_id"].isna() & (scores["model"] == self.name)].iloc[0]
        return {**{k: float(row[k]) for k in ("mae", "rmse", "smape", "mase")},
                "interval_coverage": self.coverage}


def backtest_candidate(
    config: DatasetConfig,
    panel: pd.DataFrame,
    name: str,
    on_epoch: Callable[[str, int, float, float], None] | None = None,
) -> CandidateResult:
    start = time.perf_counter()
    result = run_backtest(
        panel,
        candidates=[name],
        freq=config.freq,
        horizon=config.horizon,
        season_length=config.season_length,
        training=config.training,
        windows=config.backtest.windows,
        retrain=config.backtest.retrain,
        covariates=config.source.covariates,
        on_epoch=on_epoch,
    )
    seconds = time.perf_counter() - start
    residuals = intervals.scaled_residuals(result.predictions, panel, season_length=config.season_length)
    covered = intervals.coverage(residuals, horizon=config.horizon, level=config.interval_level)
    return CandidateResult(name, result, seconds, covered)


@dataclass
class Comparison:
    champion: str
    scores: pd.DataFrame  # model, series_id (None = aggregate), mae, rmse, smape, mase
    predictions: pd.DataFrame  # model, series_id, origin, step, ts, y, yhat
    results: list[CandidateResult]

    def table(self) -> pd.DataFrame:
        """Models x aggregate metrics, with MASE relative to seasonal naive; best first."""
        agg = self.scores[self.scores["series_id"].isna()].set_index("model")
        table = agg[["mae", "rmse", "smape", "mase"]].copy()
        table["interval_coverage"] = pd.Series({r.name: r.coverage for r in self.results})
        if "seasonal_naive" in table.index:
            table["mase_vs_seasonal_naive"] = table["mase"] / table.loc["seasonal_naive", "mase"]
        table["champion"] = table.index == self.champion
        return table.sort_values("mase").reset_index()


def compare(results: list[CandidateResult]) -> Comparison:
    scores = pd.concat([r.backtest.scores for r in results], ignore_index=True)
    predictions = pd.concat([r.backtest.predictions for r in results], ignore_index=True)
    return Comparison(choose_champion(scores), scores, predictions, results)


def rescore(
    forecaster: Forecaster, config: DatasetConfig, panel: pd.DataFrame, origins: list[pd.Timestamp]
) -> tuple[float, pd.DataFrame]:
    """Aggregate backtest MASE (and predictions) of a fitted model at the same origins, no refit."""
    frames = []
    for origin in origins:
        history = panel[panel["ts"] <= origin]
        forecast = forecaster.predict(history)
        actual = panel[["series_id", "ts", "value"]].rename(columns={"value": "y"})
        merged = forecast.merge(actual, on=["series_id", "ts"], how="inner")
        frames.append(merged.rename(columns={"value": "yhat"}).assign(origin=origin, model=forecaster.name))
    predictions = pd.concat(frames, ignore_index=True)
    scores = score(predictions, panel, season_length=config.season_length)
    aggregate = scores[scores["series_id"].isna()]
    return float(aggregate["mase"].iloc[0]), predictions


# ----------------------------------------------------------------------------------- tracking


def log_candidate(
    client: MlflowClient,
    *,
    experiment: str,
    parent_run_id: str,
    config: DatasetConfig,
    result: CandidateResult,
    panel: pd.DataFrame,
    as_of: pd.Timestamp,
) -> str:
    """A nested run per candidate: params, loss curves, backtest metrics, a forecast plot."""
    forecaster = make_forecaster(
        result.name, freq=config.freq, horizon=config.horizon,
        season_length=config.season_length, training=config.training,
        covariates=config.source.covariates,
    )
    run_id = tracking.start_run(
        client,
        experiment=experiment,
        name=f"{config.name} {as_of:%Y-%m-%d} {result.name}",
        tags={"dataset": config.name, "as_of": str(as_of), "model": result.name, "role": "candidate"},
        params={**forecaster.params, "backtest_windows": config.backtest.windows,
                "backtest_retrain": config.backtest.retrain},
        parent_run_id=parent_run_id,
    )
    tracking.log_history(client, run_id, result.backtest.histories.get(result.name, []))
    tracking.log_metrics(client, run_id, {**result.aggregate, "fit_seconds": result.fit_seconds})
    predictions = result.backtest.predictions
    figure = forecast_vs_actual(panel, predictions, title=f"{config.name} {result.name} backtest")
    tracking.log_figure(client, run_id, figure, "forecast_vs_actual.png")
    tracking.end_run(client, run_id)
    return run_id


@dataclass
class Promotion:
    forecaster: Forecaster  # the model that makes tonight's forecast
    version: str
    run_id: str
    promoted: bool
    new_mase: float
    current_mase: float | None
    reason: str
    quantiles: list[float]  # interval half-width per step, in MASE-scale units (see intervals)


def fit_final(config: DatasetConfig, panel: pd.DataFrame, name: str) -> Forecaster:
    """The backtest's champion refitted on all data up to as_of."""
    return make_forecaster(
        name, freq=config.freq, horizon=config.horizon, season_length=config.season_length,
        training=config.training, covariates=config.source.covariates,
    ).fit(panel)


def register_and_promote(
    client: MlflowClient,
    *,
    config: DatasetConfig,
    panel: pd.DataFrame,
    comparison: Comparison,
    fitted: Forecaster,
    champion_run_id: str,
    parent_run_id: str,
) -> Promotion:
    """Register the refitted champion and move `champion` to it only if it wins.

    The alias moves only when the new model's backtest MASE beats the current champion
    re-scored at the same origins; otherwise the current champion makes the forecast.
    """
    name = comparison.champion
    version = tracking.log_and_register(client, fitted, run_id=champion_run_id, dataset=config.name, panel=panel)
    aggregate = comparison.scores[comparison.scores["series_id"].isna()].set_index("model")
    new_mase = float(aggregate.loc[name, "mase"])
    current = tracking.load_champion(client, config.name)
    origins = sorted(pd.to_datetime(comparison.predictions["origin"].unique()))
    own = comparison.predictions[comparison.predictions["model"] == name]
    residuals = intervals.scaled_residuals(own, panel, season_length=config.season_length)
    quantiles = intervals.step_quantiles(residuals, horizon=config.horizon, level=config.interval_level).tolist()
    tracking.set_interval_quantiles(client, config.name, version, quantiles, level=config.interval_level)
    if current is None:
        promotion = Promotion(fitted, version, champion_run_id, True, new_mase, None,
                              "no current champion", quantiles)
    else:
        current_mase, _ = rescore(current.forecaster, config, panel, origins)
        if new_mase < current_mase:
            promotion = Promotion(fitted, version, champion_run_id, True, new_mase, current_mase,
                                  f"new MASE {new_mase:.4f} < current v{current.version} {current_mase:.4f}",
                                  quantiles)
        else:
            promotion = Promotion(current.forecaster, current.version, current.run_id, False,
                                  new_mase, current_mase,
                                  f"new MASE {new_mase:.4f} >= current v{current.version} {current_mase:.4f}",
                                  current.quantiles)
    if promotion.promoted:
        tracking.set_champion(client, config.name, version)
    tracking.set_tags(client, parent_run_id, {
        "promotion.decision": "promoted" if promotion.promoted else "kept",
        "promotion.reason": promotion.reason,
        "promotion.new_version": version,
        "promotion.forecast_version": promotion.version,
    })
    tracking.log_metrics(client, parent_run_id, {
        "promotion_new_mase": new_mase,
        **({"promotion_current_mase": promotion.current_mase} if promotion.current_mase is not None else {}),
    })
    return promotion


# ----------------------------------------------------------------------------------- forecast


def forecast(
    forecaster: Forecaster,
    *,
    config: DatasetConfig,
    panel: pd.DataFrame,
    quantiles: list[float],
    version: str,
    run_id: str,
) -> pd.DataFrame:
    """The next `horizon` steps after as_of, with conformal intervals, as `forecasts` rows.

    `quantiles` were calibrated on the model's backtest when it was registered, so `predict`
    and `run` write the same intervals for the same as_of.
    """
    rows = forecaster.predict(panel)
    steps = pd.Series(quantiles, index=pd.RangeIndex(1, len(quantiles) + 1))
    rows = intervals.add_intervals(rows, panel, steps, season_length=config.season_length)
    rows = rows.assign(model=forecaster.name, model_version=version, mlflow_run_id=run_id)
    return rows[["series_id", "ts", "step", "value", "lower", "upper", "model", "model_version", "mlflow_run_id"]]


def score_rows(comparison: Comparison, run_ids: dict[str, str]) -> pd.DataFrame:
    """model_scores rows: every candidate, per series and aggregate, flagged champion."""
    scores = comparison.scores[["model", "series_id", "mae", "rmse", "smape", "mase"]].copy()
    coverage = {r.name: r.coverage for r in comparison.results}
    scores["interval_coverage"] = scores["model"].map(coverage).where(scores["series_id"].isna())
    scores["is_champion"] = scores["model"] == comparison.champion
    scores["mlflow_run_id"] = scores["model"].map(run_ids)
    return scores


def write(
    engine: Engine,
    *,
    config: DatasetConfig,
    as_of: pd.Timestamp,
    forecasts: pd.DataFrame,
    scores: pd.DataFrame | None,
    actuals: pd.DataFrame | None = None,
) -> tuple[int, int]:
    """All rows of one (dataset, as_of) in one transaction: visible together or not at all.

    `actuals` (the panel the run read) feed the `forecast_accuracy` view.
    """
    try:
        with engine.begin() as conn:
            return db.write_run(conn, dataset=config.name, as_of=as_of, forecasts=forecasts,
                                scores=scores, actuals=actuals)
    except db.CONNECTION_ERRORS as exc:
        raise db.connect_error(engine, exc) from None  # its text may hold the URL


@dataclass
class RunSummary:
    dataset: str
    as_of: str
    champion: str
    model_version: str
    promoted: bool
    mase: dict[str, float]
    mase_vs_seasonal_naive: dict[str, float]
    forecast_rows: int
    score_rows: int
    parent_run_id: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    dropped_series: list[str] = field(default_factory=list)


def summarise(
    config: DatasetConfig,
    as_of: pd.Timestamp,
    comparison: Comparison,
    promotion: Promotion,
    parent_run_id: str,
    forecast_rows: int,
    score_rows: int,
    stage_seconds: dict[str, float],
    dropped: list[str],
) -> RunSummary:
    table = comparison.table().set_index("model")
    ratio = table["mase_vs_seasonal_naive"] if "mase_vs_seasonal_naive" in table else table["mase"] * float("nan")
    return RunSummary(
        dataset=config.name,
        as_of=str(as_of),
        champion=promotion.forecaster.name,
        model_version=promotion.version,
        promoted=promotion.promoted,
        mase={k: round(float(v), 6) for k, v in table["mase"].items()},
        mase_vs_seasonal_naive={k: round(float(v), 6) for k, v in ratio.items()},
        forecast_rows=forecast_rows,
        score_rows=score_rows,
        parent_run_id=parent_run_id,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        dropped_series=list(dropped),
    )

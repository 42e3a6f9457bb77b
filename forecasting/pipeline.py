"""The steps of a nightly run, as plain functions the Prefect flow calls one after another.

load -> validate -> backtest each candidate -> compare -> register/promote -> forecast -> write.
Nothing here knows about Prefect, so each step can be tested and reused by the CLI's `predict`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from forecasting import db, intervals, metrics
from forecasting.backtest import BacktestResult, NoDefinedMase, choose_champion, run_backtest
from forecasting.config import BASELINES, DatasetConfig, TrainingConfig, parse_as_of  # noqa: F401  (flows call it from here)
from forecasting.forecasters import Forecaster, NeuralForecaster, make_forecaster
from forecasting.plots import CONTEXT, FIGURE_SERIES, sample_series  # matplotlib only where figures are drawn
from forecasting.tracking_process import RegisteredForecaster, UnusableChampion
from forecasting.thread_probe import training_threads
from forecasting.train import applied_precision, resolve_device
from forecasting.validate import Problem
from forecasting.windows import SeriesTooShort

log = logging.getLogger(__name__)

DETAIL_LENGTH = 1000  # model_scores.detail is VARCHAR(1000)


class StageTimer:
    """Wall seconds per stage of a run, printed at the end (the speed target is per stage)."""

    def __init__(self, on_start: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_start = on_start  # e.g. a progress bar over the stages

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_start is not None:
            self.on_start(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def load(engine: Engine, config: DatasetConfig, as_of: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The series up to as_of, and the effective as_of: the last timestamp of data used.

    Also checks that the output tables accept writes, so that a read-only target fails the
    night now rather than after training (see db.check_output_writable).
    """
    with db.naming_connection_errors(engine):
        with engine.connect() as conn:
            panel = db.read_dataset(conn, config, as_of=as_of)
        with engine.connect() as conn:  # a transaction of its own: a writer from its start
            db.check_output_writable(conn, dataset=config.name)
    if panel.empty:
        when = f" up to as_of {as_of}" if as_of is not None else ""
        raise db.DataError(f"dataset {config.name!r}: the source holds no rows{when}")
    return _up_to_last_observation(panel, config)


def _up_to_last_observation(panel: pd.DataFrame, config: DatasetConfig) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The panel up to its last timestamp that holds a target value, and that timestamp.

    Rows after it hold no target for any series: rows of the future, e.g. covariates known in
    advance (which the forecasters do not use). They used to set as_of, and the `fill` policy
    then carried each series' last value over them: a forecast from made-up history.
    """
    observed = panel["value"].notna().to_numpy()
    if not observed.any():
        raise db.DataError(f"dataset {config.name!r}: the source's {config.source.target_column!r} holds no value")
    last = panel["ts"].to_numpy()[observed].max()
    later = panel["ts"].to_numpy() > last
    if later.any():
        log.warning("dataset %r: %d rows after %s, the last timestamp with a %r value, are not read: no series "
                    "has a target there", config.name, int(later.sum()), pd.Timestamp(last),
                    config.source.target_column)
        panel = panel[~later].reset_index(drop=True)
    return panel, pd.Timestamp(last)


def backfill_nights(dates: pd.DatetimeIndex, times: pd.DatetimeIndex,
                    freq: str) -> tuple[list[pd.Timestamp], list[pd.Timestamp]]:
    """(the dates to run, the dates skipped) of a backfill over `dates`, given the data's
    timestamps `times`. A night uses the data up to its date, so a date with no data of its own
    - none in the `freq` step that ends at it: past the data's end, in a gap, before its start -
    would train and write again the night of an earlier date, or fail. Those are skipped."""
    stamps = times.to_numpy()
    ends = np.searchsorted(stamps, dates.to_numpy(), side="right")  # data up to each date
    starts = np.searchsorted(stamps, (dates - to_offset(freq)).to_numpy(), side="right")  # ... before its step
    has_own = ends > starts
    return list(dates[has_own]), list(dates[~has_own])


def effective_as_ofs(dates: list[pd.Timestamp], times: pd.DatetimeIndex) -> list[pd.Timestamp]:
    """Each date's effective as_of, the last of the data's `times` at or before it: what a
    night of that date reads up to and stores its forecast under (load)."""
    index = np.searchsorted(times.to_numpy(), pd.DatetimeIndex(dates).to_numpy(), side="right") - 1
    return [times[i] for i in index]


def input_window(config: DatasetConfig) -> int:
    return config.training.resolved(horizon=config.horizon, season_length=config.season_length).input_window


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


def ask_training_threads(config: DatasetConfig) -> dict[str, int]:
    """The torch threads each network candidate will train on here (forecasting.thread_probe),
    asked before the night's other processes start: a shape not yet measured on this machine is
    measured now, on a machine as quiet as the night will leave it, not beside the MLflow
    process's start and a candidate's logging."""
    if resolve_device(config.training.device).type != "cpu":
        return {}
    chosen = {}
    for name in config.candidates:
        forecaster = make_forecaster(name, freq=config.freq, horizon=config.horizon,
                                     season_length=config.season_length, training=config.training,
                                     covariates=config.source.covariates)
        if isinstance(forecaster, NeuralForecaster):
            chosen[name] = training_threads(forecaster.net_config, batch_size=config.training.batch_size,
                                            input_window=forecaster.input_window,
                                            precision=applied_precision(config.training))
    return chosen


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


def compare(results: list[CandidateResult], *, dataset: str) -> Comparison:
    """Every candidate's backtest side by side and the champion among them. A candidate whose
    aggregate MASE is undefined (it forecast a non-finite value) cannot be champion; only when
    none has one does the night stop, with NoDefinedMase naming `dataset` and the cause."""
    scores = pd.concat([r.backtest.scores for r in results], ignore_index=True)
    predictions = pd.concat([r.backtest.predictions for r in results], ignore_index=True)
    try:
        champion = choose_champion(scores)
    except NoDefinedMase as exc:
        diverged = sorted(set(predictions.loc[metrics.non_finite(predictions["yhat"]), "model"]))
        if diverged == sorted({r.name for r in results}):
            raise NoDefinedMase(f"dataset {dataset!r}: no model has a defined MASE, so no champion can be chosen: "
                                f"every candidate ({', '.join(diverged)}) forecast non-finite values for some "
                                "series (the warnings above name them)") from None
        also = f" ({', '.join(diverged)} also forecast non-finite values)" if diverged else ""
        raise NoDefinedMase(f"dataset {dataset!r}: {exc}{also}") from None
    return Comparison(champion, scores, predictions, results)


# ----------------------------------------------------------------------------------- tracking


@dataclass
class CandidateLog:
    """What a candidate's MLflow run records: small, so that another process can log it."""

    experiment: str
    parent_run_id: str
    run_name: str
    tags: dict[str, str]
    params: dict[str, Any]
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    figure_title: str
    # The figure's data only: the shown series' actuals and backtest predictions, not the panel.
    actuals: pd.DataFrame
    predictions: pd.DataFrame


def candidate_log(
    *,
    experiment: str,
    parent_run_id: str,
    config: DatasetConfig,
    result: CandidateResult,
    panel: pd.DataFrame,
    as_of: pd.Timestamp,
) -> CandidateLog:
    """What the candidate's run nested under the night's will hold: params, per-epoch losses,
    backtest metrics, a forecast plot's data. Write it with `write_candidate_log`."""
    forecaster = make_forecaster(
        result.name, freq=config.freq, horizon=config.horizon,
        season_length=config.season_length, training=config.training,
        covariates=config.source.covariates,
    )
    history = result.backtest.histories.get(result.name, [])
    predictions = result.backtest.predictions
    shown = sample_series(predictions["series_id"], FIGURE_SERIES)
    return CandidateLog(
        experiment=experiment,
        parent_run_id=parent_run_id,
        run_name=f"{config.name} {as_of:%Y-%m-%d} {result.name}",
        tags={"dataset": config.name, "as_of": str(as_of), "model": result.name, "role": "candidate"},
        # Hyper-parameters only; what training did (epochs) is a metric of the fitted model.
        params={**{k: v for k, v in forecaster.params.items() if k != "epochs_trained"},
                "backtest_windows": config.backtest.windows, "backtest_retrain": config.backtest.retrain,
                "interval_method": intervals.METHOD, "interval_level": config.interval_level},
        history=history,
        metrics={**result.aggregate, "fit_seconds": result.fit_seconds, "epochs_trained": len(history),
                 # the torch threads it trained on (forecasting.thread_probe), beside the seconds they took
                 **({"threads_trained": history[-1]["threads"]} if history and "threads" in history[-1] else {})},
        figure_title=f"{config.name} {result.name} backtest",
        actuals=panel[panel["series_id"].isin(shown)][["series_id", "ts", "value"]],
        predictions=predictions[predictions["series_id"].isin(shown)],
    )


@dataclass
class NightLog:
    """What the night's parent run records at its end, small enough for another process."""

    parent_run_id: str
    comparison: pd.DataFrame  # models x metrics (Comparison.table)
    figure_title: str
    actuals: pd.DataFrame  # the figure's data: the shown series' last actuals and their forecast
    forecast: pd.DataFrame
    metrics: dict[str, float]
    tags: dict[str, str]


def night_log(
    parent_run_id: str,
    *,
    config: DatasetConfig,
    comparison: Comparison,
    panel: pd.DataFrame,
    forecast_rows: pd.DataFrame,
    metrics: dict[str, float],
    tags: dict[str, str],
) -> NightLog:
    """The parent run's review - models x metrics, the forecast with intervals, the outcome -
    for `tracking.write_night_log`."""
    shown = sample_series(forecast_rows["series_id"], FIGURE_SERIES)
    actuals = panel[panel["series_id"].isin(shown)].groupby("series_id", sort=False).tail(CONTEXT)
    return NightLog(
        parent_run_id=parent_run_id,
        comparison=comparison.table(),
        figure_title=(f"{config.name}: forecast of {forecast_rows['model'].iloc[0]} with "
                      f"{config.interval_level:.0%} interval"),
        actuals=actuals[["series_id", "ts", "value"]],
        forecast=forecast_rows[forecast_rows["series_id"].isin(shown)],
        metrics=metrics,
        tags=tags,
    )


@dataclass
class Promotion:
    forecaster: Forecaster  # the model that makes tonight's forecast
    version: str  # its registered version
    run_id: str  # the MLflow run that logged it
    quantiles: list[float]  # its interval half-width per step, in MASE-scale units
    new_version: str  # tonight's registered version (may differ from `version` when kept)
    promoted: bool  # move the `champion` alias to new_version (after the write succeeds)
    decision: str  # promoted | refreshed | kept | backfill | superseded
    reason: str
    new_mase: float
    current_mase: float | None
    replaces: str | None = None  # the alias's version when the night read it (None: no alias)
    # the current champion re-scored: mae, rmse, smape, mase, interval_coverage
    current_scores: dict[str, float] | None = None


def fit_final(config: DatasetConfig, panel: pd.DataFrame, name: str) -> Forecaster:
    """The backtest's champion refitted on all data up to as_of."""
    return make_forecaster(
        name, freq=config.freq, horizon=config.horizon, season_length=config.season_length,
        training=config.training, covariates=config.source.covariates,
    ).fit(panel)


def same_settings(forecaster: Forecaster, config: DatasetConfig) -> bool:
    """Whether refitting `forecaster` would build tonight's candidate of that name. Baselines use
    neither the training block nor covariates: a change there is not theirs."""
    if forecaster.season_length != config.season_length:
        return False
    if forecaster.name in BASELINES:
        return True
    return (_model_settings(forecaster.training, horizon=forecaster.horizon, season_length=forecaster.season_length)
            == _model_settings(config.training, horizon=config.horizon, season_length=config.season_length)
            and tuple(forecaster.covariates) == tuple(config.source.covariates))


def _model_settings(training: TrainingConfig, *, horizon: int, season_length: int) -> dict[str, Any]:
    """The training settings that make a network: not `device` (where it trains), and an
    input window or validation length left to its default is that default. Compared whole, a
    config that only named the device, or wrote out the default window, kept the old champion
    forecasting for good (its re-score tied tonight's model, the settings "differed")."""
    settings = training.resolved(horizon=horizon, season_length=season_length).model_dump()
    settings.pop("device")
    return settings


def rescore_current(
    current: Forecaster, config: DatasetConfig, panel: pd.DataFrame, comparison: Comparison
) -> dict[str, float]:
    """The current champion's aggregate scores (mae, rmse, smape, mase, and interval_coverage
    as the candidates', see backtest_candidate) at tonight's origins, refitted at each origin.

    Its registered weights have learnt from data inside tonight's backtest window, so scoring
    them there would be in-sample and the alias would never move. Refitting its model and
    settings at each origin scores it exactly as the candidates were scored; when tonight's
    comparison already ran that model with those settings, its score is reused.
    """
    aggregate = comparison.scores[comparison.scores["series_id"].isna()].set_index("model")
    if current.name in aggregate.index and same_settings(current, config):
        coverage = next(r.coverage for r in comparison.results if r.name == current.name)
        return {**{m: float(aggregate.loc[current.name, m]) for m in metrics.METRICS}, "interval_coverage": coverage}
    # On tonight's device: a champion trained on a GPU machine failed every night's re-score on
    # one without CUDA, after all the training
    training = current.training.model_copy(update={"device": config.training.device})
    result = run_backtest(
        panel, candidates=[current.name], freq=config.freq, horizon=config.horizon,
        season_length=current.season_length, training=training,
        windows=config.backtest.windows, retrain=config.backtest.retrain,
        covariates=current.covariates,
    )
    # on the config's season, as the candidates were (decide sees to it that the two agree)
    scores = metrics.score(result.predictions, panel, season_length=config.season_length)
    row = scores[scores["series_id"].isna()].iloc[0]
    residuals = intervals.scaled_residuals(result.predictions, panel, season_length=config.season_length)
    coverage = intervals.coverage(residuals, horizon=config.horizon, level=config.interval_level)
    return {**{m: float(row[m]) for m in metrics.METRICS}, "interval_coverage": coverage}


def calibrate(config: DatasetConfig, panel: pd.DataFrame, comparison: Comparison) -> list[float]:
    """The champion's interval half-width per step, from its backtest residuals (MASE units)."""
    own = comparison.predictions[comparison.predictions["model"] == comparison.champion]
    residuals = intervals.scaled_residuals(own, panel, season_length=config.season_length)
    return intervals.step_quantiles(residuals, horizon=config.horizon, level=config.interval_level).tolist()


def signature_example(panel: pd.DataFrame, series: int = 2) -> pd.DataFrame:
    """The rows of the panel's first `series` series: all that registering a model reads of the
    panel (its signature's example), so that only they travel to the logging process."""
    first = panel["series_id"].drop_duplicates().head(series)
    return panel[panel["series_id"].isin(first)]


@dataclass
class Decision:
    """Tonight's choice between the refitted champion and the current one, before the new
    version number exists: registration runs meanwhile, in the logging process."""

    forecaster: Forecaster  # the model that makes tonight's forecast
    quantiles: list[float]  # its interval half-widths per step
    kept: RegisteredForecaster | None  # the current champion when it stays and forecasts
    promoted: bool
    decision: str  # promoted | refreshed | kept | backfill | superseded
    reason: str
    new_mase: float
    current_mase: float | None
    replaces: str | None = None  # the alias's version when the night read it (None: no alias)
    current_scores: dict[str, float] | None = None  # the current champion re-scored

    def promotion(self, new_version: str, run_id: str) -> Promotion:
        """The decision once tonight's model is registered as `new_version` by run `run_id`."""
        if self.kept is not None:
            return Promotion(self.kept.forecaster, self.kept.version, self.kept.run_id, self.kept.quantiles,
                             new_version, False, self.decision, self.reason, self.new_mase, self.current_mase,
                             self.replaces, self.current_scores)
        return Promotion(self.forecaster, new_version, run_id, self.quantiles, new_version, self.promoted,
                         self.decision, self.reason, self.new_mase, self.current_mase, self.replaces,
                         self.current_scores)


def decide(
    *,
    config: DatasetConfig,
    panel: pd.DataFrame,
    comparison: Comparison,
    fitted: Forecaster,
    quantiles: list[float],
    current: RegisteredForecaster | UnusableChampion | None,
    backfill: bool = False,
) -> Decision:
    """Whether `champion` moves to the refitted backtest winner (`fitted`) or stays on `current`.

    - no current champion, one this pipeline cannot load (UnusableChampion: e.g. registered by
      hand), one that cannot forecast this config's horizon and freq, or one whose season
      (which scales MASE and the intervals) is not the config's: promote;
    - a night of a backfill (`backfill`), or any night older than the current champion's data:
      the alias stays and this night's own model forecasts, so no later data leaks into a past
      night and a backfill never moves production's alias;
    - a current champion that needs covariates tonight's panel has not (dropped from the
      config), or that cannot be re-scored on it (its input window is longer than tonight's
      series allow, or it forecast non-finite values): promote;
    - otherwise the new model is promoted only if its backtest MASE beats the current champion
      re-scored at the same origins (see rescore_current). The same model with the same
      settings ties by construction: it is refreshed, i.e. promoted with the newer weights.
      When kept, the current champion makes the forecast.
    Tonight's model is registered either way; the alias itself moves after the forecast rows
    are written.
    """
    name = comparison.champion
    aggregate = comparison.scores[comparison.scores["series_id"].isna()].set_index("model")
    new_mase = float(aggregate.loc[name, "mase"])
    as_of = panel["ts"].max()

    replaces = current.version if current is not None else None

    def new(decision: str, reason: str, current: dict[str, float] | None = None) -> Decision:
        return Decision(fitted, quantiles, None, decision in ("promoted", "refreshed"), decision, reason,
                        new_mase, current["mase"] if current else None, replaces, current)

    if backfill:
        return new("backfill", "a night of a backfill: alias untouched, forecast by this night's model")
    if current is None:
        return new("promoted", "no current champion")
    if isinstance(current, UnusableChampion):
        return new("promoted", f"current champion v{current.version} cannot be used: {current.reason}")
    # Before the config's checks: a champion unlike tonight's config is still production's, and
    # a past night's model (trained on less data) must not take its place.
    if current.trained_through is not None and current.trained_through > as_of:
        return new("backfill", f"current champion v{current.version} was trained through "
                   f"{current.trained_through}, after as_of {as_of}: alias untouched, "
                   "forecast by this night's model")
    unlike = unlike_config(current, config)
    if unlike is not None:
        return new("promoted", unlike)
    try:
        rescored = rescore_current(current.forecaster, config, panel, comparison)
    except SeriesTooShort as exc:  # its input window is longer than tonight's series allow
        return new("promoted", f"current champion v{current.version} cannot be re-scored on tonight's data: {exc}")
    current_mase = rescored["mase"]
    if not math.isfinite(current_mase):  # it forecast non-finite values (metrics.score)
        return new("promoted", f"current champion v{current.version} re-scored to no MASE "
                   "(non-finite forecasts)", rescored)
    versus = f"v{current.version} {current.forecaster.name} re-scored {current_mase:.4f}"
    if new_mase < current_mase:
        return new("promoted", f"new {name} MASE {new_mase:.4f} < {versus}", rescored)
    if name == current.forecaster.name and same_settings(current.forecaster, config):
        return new("refreshed", f"same model and settings as {versus}: retrained on data through {as_of}",
                   rescored)
    if name == current.forecaster.name and new_mase == current_mase:
        # Settings that differ only in name (precision auto where it means float32, say) build the
        # same model: kept, the old weights would forecast for good
        return new("refreshed", f"same model as {versus}, scored the same: retrained on data through {as_of}",
                   rescored)
    return Decision(current.forecaster, current.quantiles, current, False, "kept",
                    f"new {name} MASE {new_mase:.4f} >= {versus}", new_mase, current_mase, replaces, rescored)


def unlike_config(current: RegisteredForecaster, config: DatasetConfig) -> str | None:
    """Why the registered `current` cannot make this config's forecast, or None if it can: its
    horizon and freq, its season (which scales MASE and its intervals' units: the two would
    not compare) and the level its intervals were calibrated for must be the config's, its
    model one the config still compares (a cell taken out of `models` stops forecasting), and
    its covariates ones the config still reads."""
    model = current.forecaster
    if model.name not in config.candidates:
        return (f"current champion v{current.version} is {model.name!r}, which the config no longer compares "
                f"(models: {list(config.models)})")
    if model.horizon != config.horizon or not _same_freq(model.freq, config.freq):
        return (f"current champion v{current.version} forecasts {model.horizon} x {model.freq!r}, "
                f"the config now {config.horizon} x {config.freq!r}")
    if model.season_length != config.season_length:
        return (f"current champion v{current.version} has season_length {model.season_length}, "
                f"the config now {config.season_length}")
    level = current.interval_level
    if level is not None and not math.isclose(level, config.interval_level):
        return (f"current champion v{current.version}'s intervals are calibrated at level {level:g}, "
                f"the config now asks {config.interval_level:g}")
    missing = [c for c in model.covariates if c not in config.source.covariates]
    if missing:  # here, not only in decide: predict failed with "`panel` lacks columns ['promo']"
        return (f"current champion v{current.version} needs covariates {missing}, "
                "which the config no longer reads")
    return None


def _same_freq(registered: str, configured: str) -> bool:
    """As offsets ("W" is "W-SUN"); a freq this pandas no longer reads ("H" or "M", registered
    under pandas 2) is another freq, not a failed night."""
    try:
        return to_offset(registered) == to_offset(configured)
    except ValueError:
        return False


def superseded(promotion: Promotion, found: str | None) -> Promotion:
    """`promotion` once the alias turned out to have moved to version `found` (None: removed)
    during the night, by another run or by hand."""
    def named(version: str | None) -> str:
        return "no version" if version is None else f"v{version}"

    return dataclasses.replace(
        promotion, promoted=False, decision="superseded",
        reason=f"{promotion.reason}; {'not promoted: ' if promotion.promoted else ''}the alias was moved "
               f"from {named(promotion.replaces)} to {named(found)} during this night, and stays there")


def decision_record(promotion: Promotion) -> tuple[dict[str, str], dict[str, float]]:
    """The parent run's tags and metrics that record the decision."""
    tags = {"promotion.decision": promotion.decision, "promotion.reason": promotion.reason,
            "promotion.new_version": promotion.new_version, "promotion.forecast_version": promotion.version}
    metrics = {"promotion_new_mase": promotion.new_mase,
               **({"promotion_current_mase": promotion.current_mase} if promotion.current_mase is not None else {})}
    return tags, metrics


# ----------------------------------------------------------------------------------- forecast


def forecast(
    forecaster: Forecaster,
    *,
    config: DatasetConfig,
    panel: pd.DataFrame,
    quantiles: list[float],
    version: str | None,
    run_id: str | None,
) -> pd.DataFrame:
    """The next `horizon` steps after as_of, with conformal intervals, as `forecasts` rows
    (named after `version` and `run_id`; see with_provenance).

    `quantiles` were calibrated on the model's backtest when it was registered, so `predict`
    and `run` write the same intervals for the same as_of.
    """
    rows = intervals.add_step_intervals(forecaster.predict(panel), panel, quantiles, season_length=config.season_length)
    return with_provenance(rows.assign(model=forecaster.name), version=version, run_id=run_id)


def with_provenance(rows: pd.DataFrame, *, version: str | None, run_id: str | None) -> pd.DataFrame:
    """`forecasts` rows naming the registered version and MLflow run of the model that made them
    (None while tonight's model is still being registered: the rows are named before the write)."""
    rows = rows.assign(model_version=version, mlflow_run_id=run_id)
    return rows[["series_id", "ts", "step", "value", "lower", "upper", "model", "model_version", "mlflow_run_id"]]


def kept_label(promotion: Promotion) -> str:
    """The `model` of a kept champion's model_scores rows: its name and registered version, apart
    from tonight's candidate of the same name (whose settings differ, or it would be refreshed)."""
    return f"{promotion.forecaster.name} v{promotion.version}"


def score_rows(
    comparison: Comparison,
    run_ids: dict[str, str],
    *,
    promotion: Promotion,
    dropped: list[Problem] | None = None,
) -> pd.DataFrame:
    """model_scores rows: every candidate, per series and aggregate, and the model that made the
    forecast flagged `is_champion`.

    That is tonight's winner, except when the current champion is kept: it then gets an
    aggregate row of its own (`kept_label`: name and version, its re-scored metrics, its MLflow
    run), flagged, and no candidate is. Each series that validation dropped gets one row too
    (status 'dropped', NULL scores, the failed checks in `detail`), so an analyst finds in SQL
    which series have no forecast and why.
    """
    scores = comparison.scores[["model", "series_id", "mae", "rmse", "smape", "mase"]].copy()
    coverage = {r.name: r.coverage for r in comparison.results}
    scores["interval_coverage"] = scores["model"].map(coverage).where(scores["series_id"].isna())
    champion = promotion.forecaster.name
    kept = promotion.decision == "kept"
    scores["is_champion"] = (scores["model"] == champion) & (not kept)
    scores["mlflow_run_id"] = scores["model"].map(run_ids)
    # A model/series with no MAE forecast non-finite values in the backtest (metrics.score).
    unscored = scores["mae"].isna()
    scores["status"] = np.where(unscored, "failed", "scored")
    scores["detail"] = np.where(unscored, "non-finite backtest forecast: not scored, cannot be champion", None)
    if kept:
        champion = kept_label(promotion)
        run_ids = {**run_ids, champion: promotion.run_id}
        row = {"model": champion, "series_id": None, **(promotion.current_scores or {}),
               "is_champion": True, "mlflow_run_id": promotion.run_id, "status": "scored",
               "detail": f"current champion, kept: re-scored at tonight's origins ({promotion.reason})"[:DETAIL_LENGTH]}
        scores = pd.concat([scores, pd.DataFrame([row])], ignore_index=True)
    if dropped:
        details: dict[str, list[str]] = {}
        for problem in dropped:
            at = f" at {problem.example}" if problem.example is not None else ""
            details.setdefault(problem.series_id, []).append(f"{problem.check}{at}: {problem.detail}")
        rows = pd.DataFrame({
            "model": champion, "series_id": list(details),
            "is_champion": False, "mlflow_run_id": run_ids.get(champion), "status": "dropped",
            "detail": ["; ".join(checks)[:DETAIL_LENGTH] for checks in details.values()],
        })
        scores = pd.concat([scores, rows], ignore_index=True)
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
    with _writing(engine, config) as conn:
        return db.write_run(conn, dataset=config.name, as_of=as_of, forecasts=forecasts,
                            scores=scores, actuals=actuals)


@dataclass(frozen=True)
class Alias:
    """The `champion` alias of a dataset's registered model, as the write step uses it."""

    read: Callable[[], str | None]  # the version it points at now (None: no alias)
    move: Callable[[str, str | None], str | None]  # (version, replaces): moved if still at replaces; where it is after
    restore: Callable[[str | None, str], None]  # (version or None, from): back to version if still at from


class ChampionMoved(ValueError):
    """The alias moved between loading the champion and writing its forecast."""


class RequestRefused(ValueError):
    """What a command asked for cannot be done as asked (a predict by a champion unlike the
    config or trained on later data, a backfill range without a night to run); the message
    says what to do instead."""


def write_night(engine: Engine, *, config: DatasetConfig, as_of: pd.Timestamp, forecasts: pd.DataFrame,
                scores: pd.DataFrame, actuals: pd.DataFrame | None, promotion: Promotion,
                alias: Alias) -> tuple[int, int, Promotion]:
    """A night's rows and its alias move as one step: (forecast rows, score rows, the promotion
    as it turned out).

    Under the dataset's lock (`_dataset_lock`: one night write of a dataset at a time) the
    alias is read again; the night goes on only if it is still where the night read it
    (`settle`). The alias moves, then the rows are written; if they cannot be, the alias goes
    back. Before, the write and the move were two steps: two runs of one night could each
    write, and the one the alias did not follow left its rows (its model's) under the other's
    alias; a predict beside a night likewise. A superseded night writes nothing. A backfill
    night writes nothing where its as_of holds the champion's forecast (production's night,
    written while the backfill ran).
    """
    moved_here = False  # whether this call moved the alias (and must move it back on failure)
    try:
        with _dataset_lock(engine, config) as held:
            found = alias.read()
            settled = settle(promotion, found)
            if settled.decision == "superseded":
                return 0, 0, settled
            if settled.decision == "backfill" and found is not None and _holds(engine, held, config, as_of, found):
                return 0, 0, dataclasses.replace(
                    settled, decision="superseded",
                    reason=f"{settled.reason}; not written: as_of {as_of} holds champion v{found}'s forecast "
                           "(production's night, written while this backfill ran)")
            if settled.promoted:
                # Found there already: an earlier attempt moved it. Ours to move back only if
                # that attempt's rows are not written (else they and the alias agree).
                moved_here = found != settled.new_version or not _holds(engine, held, config, as_of,
                                                                          settled.new_version)
                if found != settled.new_version:
                    now = alias.move(settled.new_version, settled.replaces)
                    if now != settled.new_version:  # moved by hand since the read above: not ours
                        moved_here = False
                        return 0, 0, superseded(promotion, now)
            n_forecasts, n_scores = _write_rows(engine, config, held, as_of=as_of, forecasts=forecasts,
                                                scores=scores, actuals=actuals)
            return n_forecasts, n_scores, settled
    except BaseException:
        if moved_here:  # the alias must not point past what was written
            try:
                alias.restore(settled.replaces, settled.new_version)
            except Exception as exc:  # noqa: BLE001 - the write's own error is the one to raise
                log.error("dataset %r: the alias could not be moved back to v%s after the write failed (%s); "
                          "it points at v%s, whose forecast for %s was not written", config.name,
                          settled.replaces, exc, settled.new_version, as_of)
        raise


@contextmanager
def _dataset_lock(engine: Engine, config: DatasetConfig) -> Iterator[sa.Connection | None]:
    """The dataset's lock, for a night's write: on PostgreSQL a transaction holding it
    (db.lock_dataset; the caller writes its rows there, and the lock lasts exactly as long as
    they can still roll back); on SQLite a lock file (db.sqlite_dataset_lock), None, and the
    rows get a transaction of their own: SQLite's write lock is the whole file's, and an MLflow
    store in the same file could not move the alias under it."""
    if engine.dialect.name == "postgresql":
        with _writing(engine, config) as conn:
            db.lock_dataset(conn, dataset=config.name)
            yield conn
        return
    with db.sqlite_dataset_lock(engine, dataset=config.name):
        yield None


def _write_rows(engine: Engine, config: DatasetConfig, held: sa.Connection | None, *, as_of: pd.Timestamp,
                forecasts: pd.DataFrame, scores: pd.DataFrame | None,
                actuals: pd.DataFrame | None) -> tuple[int, int]:
    """db.write_run in the lock's transaction (see _lock_transaction)."""
    with _lock_transaction(engine, config, held) as conn:
        return db.write_run(conn, dataset=config.name, as_of=as_of, forecasts=forecasts, scores=scores,
                            actuals=actuals)


@contextmanager
def _lock_transaction(engine: Engine, config: DatasetConfig, held: sa.Connection | None) -> Iterator[sa.Connection]:
    """Where to write under the dataset's lock: its own transaction (`held`, PostgreSQL:
    committed when the lock is left), else (SQLite's lock file) a transaction of its own."""
    if held is not None:
        yield held
        return
    with _writing(engine, config) as conn:
        yield conn


def _holds(engine: Engine, held: sa.Connection | None, config: DatasetConfig, as_of: pd.Timestamp,
           version: str) -> bool:
    """Whether (dataset, as_of)'s stored forecast is `version`'s, read in `held` or a connection of its own."""
    if held is not None:
        return db.holds_forecast_by(held, dataset=config.name, as_of=as_of, version=version)
    with engine.connect() as conn:
        return db.holds_forecast_by(conn, dataset=config.name, as_of=as_of, version=version)


def settle(promotion: Promotion, found: str | None) -> Promotion:
    """`promotion` given where the alias points now (`found`): superseded if another run or a
    person moved it since the night read it (`promotion.replaces`). A night that kept the
    champion needs it still there; a promoting night, there or already at its own version (a
    retry); a backfill night does not look at it."""
    if promotion.decision == "kept" and found != promotion.replaces:
        return superseded(promotion, found)
    if promotion.promoted and found not in (promotion.replaces, promotion.new_version):
        return superseded(promotion, found)
    return promotion


def write_with_champion(engine: Engine, *, config: DatasetConfig, as_of: pd.Timestamp, forecasts: pd.DataFrame,
                        actuals: pd.DataFrame | None, version: str, alias: Alias) -> int:
    """`forecasting predict`'s write: champion `version`'s forecast rows, under the dataset's
    lock, if the alias still points at that version (else ChampionMoved, nothing written)."""
    with _dataset_lock(engine, config) as held:
        found = alias.read()
        if found != version:
            now = "no version" if found is None else f"v{found}"
            raise ChampionMoved(f"dataset {config.name!r}: the champion alias moved from v{version} to {now} "
                                "while predict ran; nothing was written. Run predict again to forecast with it")
        n_forecasts, _ = _write_rows(engine, config, held, as_of=as_of, forecasts=forecasts, scores=None,
                                     actuals=actuals)
    return n_forecasts


def write_actuals(engine: Engine, *, config: DatasetConfig, actuals: pd.DataFrame) -> int:
    """The observations in `actuals` that a stored forecast can meet (see db.write_actuals), in
    one transaction; how many were upserted.

    Under the dataset's lock, as a night's write (which records its actuals too): db.write_actuals
    compares what it read with what is stored, and beside another writer of the dataset it
    could delete, as withdrawn, an actual that writer had just recorded from a newer read.
    """
    created_at = datetime.now().replace(microsecond=0)
    with _dataset_lock(engine, config) as held, _lock_transaction(engine, config, held) as conn:
        return db.write_actuals(conn, dataset=config.name, panel=actuals, created_at=created_at)


@contextmanager
def _writing(engine: Engine, config: DatasetConfig) -> Iterator[sa.Connection]:
    """A transaction of the dataset's writes; errors no retry can help named as such."""
    try:
        with engine.begin() as conn:
            yield conn
    except sa.exc.DBAPIError as exc:
        reason = db.write_refusal(exc)
        if reason is not None:  # read-only, no privilege, disk full: a retry cannot help
            raise db.not_writable(engine, config.name, reason) from None
        if isinstance(exc, db.CONNECTION_ERRORS):
            raise db.connect_error(engine, exc) from None  # its text may hold the URL
        raise


@dataclass
class RunSummary:
    dataset: str
    as_of: str
    champion: str
    model_version: str
    promoted: bool
    decision: str  # promoted | refreshed | kept | backfill | superseded
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
        decision=promotion.decision,
        mase={k: round(float(v), 6) for k, v in table["mase"].items()},
        mase_vs_seasonal_naive={k: round(float(v), 6) for k, v in ratio.items()},
        forecast_rows=forecast_rows,
        score_rows=score_rows,
        parent_run_id=parent_run_id,
        stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
        dropped_series=list(dropped),
    )

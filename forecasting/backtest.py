"""Rolling-origin backtest of candidate models, and the champion.

For k windows, origin j (j = k..1) cuts the last j * horizon steps off every series: the part
before is the training frame, the next `horizon` steps are scored. Series may end on different
dates, so the origin is per series: the last ts of its training part. Each candidate is fitted
at every origin (`retrain=True`) or once at the first origin and reused (`retrain=False`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from forecasting.config import TrainingConfig
from forecasting.forecasters import Forecaster, make_forecaster
from forecasting.metrics import score
from forecasting.windows import check_horizon

log = logging.getLogger(__name__)

# Simplest first: a tie in aggregate MASE goes to the model that comes first here.
SIMPLICITY = ("naive", "seasonal_naive", "ets", "rnn", "gru", "lstm")


@dataclass
class BacktestResult:
    predictions: pd.DataFrame  # model, series_id, origin, step, ts, y, yhat
    scores: pd.DataFrame  # model, series_id (None on the aggregate row), mae, rmse, smape, mase
    histories: dict[str, list[dict]]  # per model, from its last fit
    fit_seconds: dict[str, float]  # per model, summed over its fits
    predict_seconds: dict[str, float] = field(default_factory=dict)  # per model, summed over origins

    @property
    def champion(self) -> str:
        """choose_champion of these scores, asked for only where a choice is made: a backtest of
        one model (a candidate, a shard, the current champion re-scored) is only scored, and
        a model without a MASE there (non-finite forecasts) is a score row, not an error."""
        return choose_champion(self.scores)


def split_at_origin(panel: pd.DataFrame, *, cut: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut the last `cut` steps off each series: (training part, the cut-off part)."""
    from_end = panel.groupby("series_id", sort=False).cumcount(ascending=False)  # 0 = last row
    return panel[from_end >= cut].reset_index(drop=True), panel[from_end < cut].reset_index(drop=True)


class NoDefinedMase(ValueError):
    """No model's aggregate MASE is defined: no series could be scored."""


def choose_champion(scores: pd.DataFrame) -> str:
    """The model with the lowest aggregate MASE; ties go to the simpler model (SIMPLICITY)."""
    agg = scores[scores["series_id"].isna()]
    agg = agg[agg["mase"].notna()]
    if agg.empty:
        raise NoDefinedMase(
            "no model has a defined MASE, so no champion can be chosen: MASE divides a series' errors by "
            "its in-sample seasonal-naive error, which is 0 in every series' training part here (constant "
            "series, or series that repeat their season exactly)")
    best = float(agg["mase"].min())
    tied = [m for m, v in zip(agg["model"], agg["mase"]) if math.isclose(v, best, rel_tol=1e-9, abs_tol=1e-12)]
    rank = {m: i for i, m in enumerate(SIMPLICITY)}
    return min(tied, key=lambda m: (rank.get(m, len(SIMPLICITY)), m))


def run_backtest(panel: pd.DataFrame, *, candidates: Sequence[str], freq: str, horizon: int,
                 season_length: int, training: TrainingConfig, windows: int = 1, retrain: bool = True,
                 covariates: Sequence[str] = (),
                 on_epoch: Callable[[str, int, float, float], None] | None = None) -> BacktestResult:
    horizon = check_horizon(horizon)
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"`windows` ({windows!r}) must be an integer >= 1")
    if not candidates:
        raise ValueError("`candidates` is empty; name at least one model")
    lengths = panel.groupby("series_id", sort=False).size()
    if (lengths <= windows * horizon).any():
        sid = lengths.index[(lengths <= windows * horizon).argmax()]
        raise ValueError(f"series {sid!r} has {lengths[sid]} observations, not more than "
                         f"`windows` * `horizon` ({windows} * {horizon}); nothing is left to train on")
    folds = []
    for j in range(windows, 0, -1):
        train, rest = split_at_origin(panel, cut=j * horizon)
        origins = train.groupby("series_id", sort=False)["ts"].max().rename("origin")
        actual = (rest.groupby("series_id", sort=False).head(horizon)[["series_id", "ts", "value"]]
                  .rename(columns={"value": "y"}))
        folds.append((train, origins, actual))
    parts, histories, fit_seconds, predict_seconds = [], {}, {}, {}
    for name in candidates:
        forecaster: Forecaster | None = None
        fit_seconds[name] = predict_seconds[name] = 0.0
        for j, (train, origins, actual) in enumerate(folds):
            if forecaster is None or retrain:
                forecaster = make_forecaster(name, freq=freq, horizon=horizon, season_length=season_length,
                                             training=training, covariates=covariates)
                callback = None if on_epoch is None else (lambda e, tr, va, n=name: on_epoch(n, e, tr, va))
                start = time.perf_counter()
                forecaster.fit(train, on_epoch=callback)
                fit_seconds[name] += time.perf_counter() - start
            start = time.perf_counter()
            forecast = forecaster.predict(train)
            predict_seconds[name] += time.perf_counter() - start
            frame = (forecast.rename(columns={"value": "yhat"})
                     .merge(actual, on=["series_id", "ts"], how="inner")
                     .merge(origins, left_on="series_id", right_index=True, how="left"))
            parts.append(frame.assign(model=name))
            log.info("backtest %s: origin %d/%d done", name, j + 1, len(folds))
        histories[name] = list(forecaster.history) if forecaster is not None else []
    predictions = pd.concat(parts, ignore_index=True)[
        ["model", "series_id", "origin", "step", "ts", "y", "yhat"]]
    scores = score(predictions, panel, season_length=season_length)
    return BacktestResult(predictions=predictions, scores=scores, histories=histories, fit_seconds=fit_seconds,
                          predict_seconds=predict_seconds)

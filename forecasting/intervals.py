"""Prediction intervals: split-conformal on backtest residuals, pooled across series.

Residuals are put on a common scale by dividing by each series' MASE scale (its in-sample
seasonal-naive MAE), so series of different sizes can share one quantile per forecast step:

    half_width(series, step) = q_step x scale(series)

where q_step is the conformal quantile of |y - yhat| / scale at that step over every series and
origin of the backtest. With fewer than MIN_PER_STEP residuals at a step (one series, one
origin), the steps are pooled. Coverage is measured honestly: each series' residuals are judged
against a quantile computed without that series (one series: without that residual).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from forecasting.metrics import mase_scale

METHOD = "split-conformal, |residual| / MASE scale, per step, pooled across series"
MIN_PER_STEP = 10


def scaled_residuals(predictions: pd.DataFrame, panel: pd.DataFrame, *, season_length: int) -> pd.DataFrame:
    """predictions (series_id, origin, step, y, yhat) with `score`: |y - yhat| / scale at origin."""
    by_series = {sid: g for sid, g in panel.groupby("series_id", sort=False)}
    keys = predictions[["series_id", "origin"]].drop_duplicates()
    scales = [
        mase_scale(by_series[sid].loc[by_series[sid]["ts"] <= origin, "value"].to_numpy(), season_length)
        for sid, origin in keys.itertuples(index=False)
    ]
    out = predictions.merge(keys.assign(scale=scales), on=["series_id", "origin"], how="left")
    out["score"] = (out["y"] - out["yhat"]).abs() / out["scale"]
    return out[np.isfinite(out["score"])]


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)/n empirical quantile: coverage >= level for exchangeable scores."""
    n = len(scores)
    if n == 0:
        return float("nan")
    rank = min(math.ceil((n + 1) * level), n)
    return float(np.sort(scores)[rank - 1])


def step_quantiles(residuals: pd.DataFrame, *, horizon: int, level: float) -> pd.Series:
    """q per step 1..horizon; steps pooled when any step has too few residuals."""
    counts = residuals.groupby("step")["score"].size()
    steps = pd.RangeIndex(1, horizon + 1, name="step")
    if len(counts) < horizon or counts.min() < MIN_PER_STEP:
        return pd.Series(conformal_quantile(residuals["score"].to_numpy(), level), index=steps)
    q = residuals.groupby("step")["score"].apply(lambda s: conformal_quantile(s.to_numpy(), level))
    # A later step is never more certain than an earlier one.
    return q.reindex(steps).cummax()


def add_intervals(
    forecast: pd.DataFrame, panel: pd.DataFrame, quantiles: pd.Series, *, season_length: int
) -> pd.DataFrame:
    """lower/upper on forecast rows (series_id, step, value) from the series' full-history scale."""
    scales = {sid: series_scale(g["value"].to_numpy(), season_length)
              for sid, g in panel.groupby("series_id", sort=False)}
    half = forecast["step"].map(quantiles).to_numpy() * forecast["series_id"].map(scales).to_numpy()
    return forecast.assign(lower=forecast["value"] - half, upper=forecast["value"] + half)


def series_scale(values: np.ndarray, season_length: int) -> float:
    """The MASE scale; for a series too short or seasonally constant, its mean absolute step;
    for a constant series 0 (its interval is the point: nothing in its history varies)."""
    scale = mase_scale(values, season_length)
    if np.isfinite(scale) and scale > 0:
        return scale
    steps = np.abs(np.diff(values))
    return float(steps.mean()) if len(steps) else 0.0


def coverage(residuals: pd.DataFrame, *, horizon: int, level: float) -> float:
    """Share of backtest actuals inside intervals calibrated without their own series."""
    if residuals.empty:
        return float("nan")
    if residuals["series_id"].nunique() > 1:
        groups = residuals.groupby("series_id", sort=False).groups.values()
    else:
        groups = [[i] for i in residuals.index]
    inside = 0
    for index in groups:
        rest = residuals.drop(index=index)
        own = residuals.loc[index]
        q = step_quantiles(rest, horizon=horizon, level=level)
        inside += int((own["score"].to_numpy() <= own["step"].map(q).to_numpy()).sum())
    return inside / len(residuals)

"""Forecast accuracy per series and aggregated: MAE, RMSE, sMAPE and MASE.

MASE divides the absolute error by the in-sample mean absolute error of the seasonal-naive
forecast on the training part of the series (the history up to the forecast origin). The
aggregate row of a model (series_id None) is the plain mean of its per-series values, leaving
out series whose MASE is undefined (a constant history). A model that forecast a non-finite
value for any series has NaN metrics for it and NaN aggregates: it cannot be champion.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

METRICS = ("mae", "rmse", "smape", "mase")


def mae(y: np.ndarray, yhat: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y) - np.asarray(yhat))))


def rmse(y: np.ndarray, yhat: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y) - np.asarray(yhat)) ** 2)))


def smape(y: np.ndarray, yhat: np.ndarray) -> float:
    """Symmetric MAPE in percent, 0..200; a step where both are 0 counts as 0."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    denom = np.abs(y) + np.abs(yhat)
    ratio = np.divide(2.0 * np.abs(y - yhat), denom, out=np.zeros_like(denom), where=denom > 0)
    return float(100.0 * ratio.mean())


def mase_scale(history: np.ndarray, season_length: int) -> float:
    """In-sample MAE of the seasonal-naive forecast (of the naive one when the history is no
    longer than one season); NaN when it is 0 (a constant history) or cannot be computed."""
    history = np.asarray(history, float)
    m = season_length if len(history) > season_length else 1
    if len(history) <= m:
        return float("nan")
    scale = float(np.mean(np.abs(history[m:] - history[:-m])))
    return scale if scale > 0 else float("nan")


def mase(y: np.ndarray, yhat: np.ndarray, history: np.ndarray, season_length: int) -> float:
    return mae(y, yhat) / mase_scale(history, season_length)


def non_finite(yhat: pd.Series) -> np.ndarray:
    """Which forecasts are not numbers (NaN, NULL, infinite): never scored, never champion."""
    return ~np.isfinite(pd.to_numeric(yhat).to_numpy(dtype=float, na_value=np.nan))


def score(predictions: pd.DataFrame, history: pd.DataFrame, *, season_length: int) -> pd.DataFrame:
    """Per-series and aggregate metrics of each model.

    predictions: model, series_id, ts, y, yhat, and optionally origin (the last ts of the
        training part; without it, the history before each series' first forecast step).
    history: a panel (series_id, ts, value) holding at least the training part of each series.
    Returns model, series_id (None on the aggregate row), mae, rmse, smape, mase.
    """
    missing = [c for c in ("model", "series_id", "ts", "y", "yhat") if c not in predictions.columns]
    if missing:
        raise ValueError(f"`predictions` lacks columns {missing}")
    preds = predictions.copy()
    if "origin" not in preds.columns:
        # the training part is everything before the series' first forecast step
        preds["origin"] = preds.groupby("series_id")["ts"].transform("min") - pd.Timedelta(1, "ns")
    scales = _scales(history, preds[["series_id", "origin"]].drop_duplicates(), season_length)
    preds = preds.merge(scales, on=["series_id", "origin"], how="left")
    preds["abs_err"] = (preds["y"] - preds["yhat"]).abs()
    preds["scaled_err"] = preds["abs_err"] / preds["scale"]
    preds["failed"] = non_finite(preds["yhat"])
    rows, failed = [], {}
    for (model, sid), g in preds.groupby(["model", "series_id"], sort=False):
        if g["failed"].any():
            # A forecast that is not a number is not a good one: unscored, never skipped (a
            # NaN step used to count as perfect in sMAPE and be left out of MASE).
            failed.setdefault(model, []).append(sid)
            rows.append({"model": model, "series_id": sid, **dict.fromkeys(METRICS, np.nan)})
            continue
        rows.append({"model": model, "series_id": sid, "mae": mae(g["y"], g["yhat"]),
                     "rmse": rmse(g["y"], g["yhat"]), "smape": smape(g["y"], g["yhat"]),
                     "mase": float(g["scaled_err"].mean())})
    per_series = pd.DataFrame(rows, columns=["model", "series_id", *METRICS])
    undefined = per_series.loc[per_series["mase"].isna() & per_series["mae"].notna(), "series_id"].unique()
    if len(undefined):
        log.warning("MASE undefined (constant or too short training part) for %d series, e.g. %r",
                    len(undefined), undefined[0])
    aggregate = per_series.groupby("model", sort=False)[list(METRICS)].mean().reset_index()
    for model, series in failed.items():
        log.warning("%s forecast non-finite values for %d series (e.g. %r): unscored, and no aggregate "
                    "score, so it cannot be champion", model, len(series), series[0])
        aggregate.loc[aggregate["model"] == model, list(METRICS)] = np.nan
    aggregate.insert(1, "series_id", None)
    return pd.concat([per_series, aggregate], ignore_index=True)


def _scales(history: pd.DataFrame, keys: pd.DataFrame, season_length: int) -> pd.DataFrame:
    by_series = {sid: g for sid, g in history.groupby("series_id", sort=False)}
    out = []
    for sid, origin in keys.itertuples(index=False):
        g = by_series.get(sid)
        values = g.loc[g["ts"] <= origin, "value"].to_numpy() if g is not None else np.empty(0)
        out.append(mase_scale(values, season_length))
    return keys.assign(scale=out)


def aggregate(scores: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """The aggregate rows (series_id None), indexed by model."""
    agg = scores[scores["series_id"].isna()].set_index("model")[list(METRICS)]
    return agg if models is None else agg.loc[list(models)]

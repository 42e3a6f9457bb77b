"""Baseline forecasts of one series: naive, seasonal naive, exponential smoothing (ETS).

Each function maps a history (1-D array, oldest first) to `horizon` future values. They are
wrapped into Forecasters in forecasting.forecasters, with the same interface as the networks.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)


def naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """The last value, repeated."""
    return np.repeat(float(history[-1]), horizon)


def seasonal_naive(history: np.ndarray, horizon: int, season_length: int) -> np.ndarray:
    """The last season, repeated; naive when the history is shorter than one season."""
    if len(history) < season_length:
        return naive(history, horizon)
    last = np.asarray(history[-season_length:], float)
    return last[np.arange(horizon) % season_length]


def ets(history: np.ndarray, horizon: int, season_length: int, *, series_id: str = "?") -> np.ndarray:
    """Holt-Winters with an additive damped trend and additive seasonality.

    Positive series are modelled on the log scale (multiplicative seasonality and trend, fitted
    stably as additive in logs). Two full seasons are needed for the seasonal part; shorter
    histories get a damped-trend model without season, and if statsmodels fails the series falls
    back to seasonal naive - a baseline must always forecast.
    """
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    y = np.asarray(history, float)
    log_scale = bool((y > 0).all())
    x = np.log(y) if log_scale else y
    seasonal = season_length > 1 and len(y) >= 2 * season_length + 2
    attempts = []
    if len(y) >= 10:
        attempts.append({"trend": "add", "damped_trend": True,
                         "seasonal": "add" if seasonal else None,
                         "seasonal_periods": season_length if seasonal else None})
    if seasonal:
        attempts.append({"trend": None, "seasonal": "add", "seasonal_periods": season_length})
    attempts.append({"trend": None, "seasonal": None})
    for kwargs in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                fit = ExponentialSmoothing(x, initialization_method="estimated", **kwargs).fit()
            forecast = np.asarray(fit.forecast(horizon), float)
            forecast = np.exp(forecast) if log_scale else forecast
            if np.isfinite(forecast).all():
                return forecast
        except (ValueError, np.linalg.LinAlgError) as exc:
            log.debug("ETS %s failed for series %r: %s", kwargs, series_id, exc)
    log.warning("ETS failed for series %r; using seasonal naive", series_id)
    return seasonal_naive(y, horizon, season_length)

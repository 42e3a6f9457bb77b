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
from collections.abc import Sequence

import numpy as np
import pandas as pd

from forecasting.metrics import mase_scale

METHOD = "split-conformal, |residual| / MASE scale, per step, pooled across series"
MIN_PER_STEP = 10


def scaled_residuals(predictions: pd.DataFrame, panel: pd.DataFrame, *, season_length: int) -> pd.DataFrame:
    """predictions (series_id, origin, step, y, yhat) with `score`: |y - yhat| / scale at origin."""
    keys = predictions[["series_id", "origin"]].drop_duplicates()
    histories = series_arrays(panel)
    scales = []
    for sid, origin in keys.itertuples(index=False):
        ts, values = histories[sid]
        end = int(np.searchsorted(ts, np.datetime64(origin, "ns"), side="right"))  # ts <= origin
        scales.append(mase_scale(values[:end], season_length))
    out = predictions.merge(keys.assign(scale=scales), on=["series_id", "origin"], how="left")
    out["score"] = (out["y"] - out["yhat"]).abs() / out["scale"]
    return out[np.isfinite(out["score"])]


def series_arrays(panel: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per series (ts as datetime64[ns], value): views into one sorted copy, no frame per series."""
    codes, ids = pd.factorize(panel["series_id"], sort=False)
    ts = panel["ts"].to_numpy("datetime64[ns]")
    values = panel["value"].to_numpy(np.float64)
    same = codes[1:] == codes[:-1]
    if not ((codes[1:] >= codes[:-1]).all() and (~same | (ts[1:] >= ts[:-1])).all()):
        order = np.lexsort((ts, codes))  # by series, then time (stable)
        ts, values, codes = ts[order], values[order], codes[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(ids)))])
    return {sid: (ts[bounds[i]:bounds[i + 1]], values[bounds[i]:bounds[i + 1]]) for i, sid in enumerate(ids)}


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)/n empirical quantile: coverage >= level for exchangeable scores.

    With fewer than level / (1 - level) scores (4 at 0.8, 19 at 0.95) that rank is past the
    largest score, where the guarantee would need an unbounded interval; the largest score is
    taken instead, so such an interval may cover less than `level` (see interval_coverage).
    """
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
    scales = {sid: series_scale(values, season_length) for sid, (_, values) in series_arrays(panel).items()}
    half = forecast["step"].map(quantiles).to_numpy() * forecast["series_id"].map(scales).to_numpy()
    return forecast.assign(lower=forecast["value"] - half, upper=forecast["value"] + half)


def add_step_intervals(
    forecast: pd.DataFrame, panel: pd.DataFrame, quantiles: Sequence[float], *, season_length: int
) -> pd.DataFrame:
    """add_intervals with a registered version's quantiles: a list, step 1 first."""
    steps = pd.Series(list(quantiles), index=pd.RangeIndex(1, len(quantiles) + 1), dtype=float)
    return add_intervals(forecast, panel, steps, season_length=season_length)


def series_scale(values: np.ndarray, season_length: int) -> float:
    """The MASE scale; for a series too short or seasonally constant, its mean absolute step;
    for a constant series 0 (its interval is the point: nothing in its history varies)."""
    scale = mase_scale(values, season_length)
    if np.isfinite(scale) and scale > 0:
        return scale
    steps = np.abs(np.diff(values))
    return float(steps.mean()) if len(steps) else 0.0


def coverage(residuals: pd.DataFrame, *, horizon: int, level: float) -> float:
    """Share of backtest actuals inside intervals calibrated without their own series.

    Each series' residuals are judged against `step_quantiles` of all the other residuals (one
    series: each residual against the others). Computed for every series at once: the k-th
    smallest of the rest is read off the sorted scores of all, corrected for the series' own.
    """
    if residuals.empty:
        return float("nan")
    scores = residuals["score"].to_numpy(np.float64)
    steps = residuals["step"].to_numpy()
    if residuals["series_id"].nunique() > 1:
        group = pd.factorize(residuals["series_id"], sort=False)[0]
    else:
        group = np.arange(len(residuals))
    n_groups = int(group.max()) + 1
    step_values, step_index = np.unique(steps, return_inverse=True)
    # residuals per step: in all, and per group; a group's rest is the difference
    total = np.bincount(step_index, minlength=len(step_values))  # [steps]
    own = np.zeros((n_groups, len(step_values)), np.int64)  # [groups, steps]
    np.add.at(own, (group, step_index), 1)
    rest = total[None, :] - own  # [groups, steps]
    present = rest > 0
    pooled = (present.sum(axis=1) < horizon) | (np.where(present, rest, np.iinfo(np.int64).max).min(axis=1)
                                                < MIN_PER_STEP)  # [groups], as step_quantiles decides
    limit = np.full(len(scores), np.nan)  # the quantile each residual is judged against
    rows = np.flatnonzero(pooled[group] & (steps >= 1) & (steps <= horizon))
    if len(rows):  # one quantile over the rest of all steps
        q = _rest_quantiles(scores, group, n_groups, level)  # [groups]
        limit[rows] = q[group[rows]]
    if not pooled.all():
        wanted = np.arange(1, horizon + 1)
        per_step = np.full((n_groups, horizon), np.nan)  # [groups, horizon]
        for j, value in enumerate(step_values):
            at_step = np.flatnonzero(steps == value)
            q = _rest_quantiles(scores[at_step], group[at_step], n_groups, level)  # [groups]
            q[~present[:, j]] = np.nan  # a step the rest lacks has no quantile
            hit = np.flatnonzero(wanted == value)
            if len(hit):
                per_step[:, hit[0]] = q
        per_step = pd.DataFrame(per_step).cummax(axis=1).to_numpy()  # NaN skipped, like Series.cummax
        rows = np.flatnonzero(~pooled[group])
        column = np.searchsorted(wanted, steps[rows])
        valid = (column < horizon) & (wanted[np.minimum(column, horizon - 1)] == steps[rows])
        limit[rows[valid]] = per_step[group[rows[valid]], column[valid]]
    inside = int((scores <= limit).sum())  # NaN limits: outside
    return inside / len(residuals)


def _rest_quantiles(scores: np.ndarray, group: np.ndarray, n_groups: int, level: float) -> np.ndarray:
    """conformal_quantile of `scores` without each group's own, for every group: [groups].

    With A all scores sorted and O a group's own, the k-th smallest of A minus O is the first of
    A[k-1], ..., A[k-1+|O|] that has at least k values of the rest at or below it.
    """
    ordered = np.sort(scores)
    n = len(ordered)
    counts = np.bincount(group, minlength=n_groups)  # [groups] own sizes
    width = int(counts.max()) if n else 0
    mine = np.full((n_groups, max(width, 1)), np.inf)  # [groups, width] own scores, +inf padded
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(n) - np.repeat(starts, counts)
    mine[group[order], position] = scores[order]
    n_rest = n - counts
    k = np.minimum(np.ceil((n_rest + 1) * level).astype(np.int64), n_rest)  # [groups] rank in the rest
    result = np.full(n_groups, np.nan)
    todo = n_rest > 0
    for j in range(width + 1):
        index = np.clip(k - 1 + j, 0, max(n - 1, 0))
        candidate = ordered[index] if n else np.full(n_groups, np.nan)  # [groups]
        at_or_below = np.searchsorted(ordered, candidate, side="right") - (mine <= candidate[:, None]).sum(axis=1)
        found = todo & (at_or_below >= k)
        result[found] = candidate[found]
        todo &= ~found
        if not todo.any():
            break
    return result

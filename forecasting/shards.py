"""Per-series work in shards: a panel split into groups of whole series, and the pieces joined.

Naive, seasonal naive and ETS are local models: each series' forecast reads that series only,
so their backtest, like any fitted model's forecast, can run on groups of series apart (on
separate Dask workers) and be joined into exactly what one call over the whole panel gives.
The networks are global models trained on every series at once: their training is never split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from forecasting import intervals
from forecasting.backtest import BacktestResult
from forecasting.config import DatasetConfig
from forecasting.metrics import score
from forecasting.pipeline import CandidateResult


def split(panel: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """At most `n` shards of whole series, in the panel's series order (first appearance), each
    with about the same number of series; joined back in list order they keep that order."""
    if n < 1:
        raise ValueError(f"`n` ({n!r}) must be >= 1")
    codes, ids = pd.factorize(panel["series_id"], sort=False)
    bounds = np.linspace(0, len(ids), min(n, len(ids)) + 1).round().astype(int)  # [shards + 1]
    return [panel[(codes >= lo) & (codes < hi)].reset_index(drop=True)
            for lo, hi in zip(bounds[:-1], bounds[1:])]


def join_backtests(config: DatasetConfig, panel: pd.DataFrame,
                   parts: Sequence[CandidateResult]) -> CandidateResult:
    """One local model's backtest over `panel` from the backtests of its shards (in split order).

    Predictions are put back in run_backtest's order (origin after origin, series in panel order
    within each), then scored and their interval coverage measured over every series, so the
    result equals a single backtest_candidate over the whole panel. Seconds are summed over shards.
    """
    names = {part.name for part in parts}
    if len(names) != 1:
        raise ValueError(f"`parts` must be the shards of one candidate, got {sorted(names)}")
    name = names.pop()
    predictions = pd.concat([part.backtest.predictions for part in parts], ignore_index=True)
    fold = predictions.groupby("series_id", sort=False)["origin"].rank(method="dense").to_numpy()
    predictions = predictions.iloc[np.argsort(fold, kind="stable")].reset_index(drop=True)
    scores = score(predictions, panel, season_length=config.season_length)
    backtest = BacktestResult(
        predictions=predictions, scores=scores,
        histories={name: []},  # local models do not train
        fit_seconds={name: sum(part.backtest.fit_seconds.get(name, 0.0) for part in parts)},
        predict_seconds={name: sum(part.backtest.predict_seconds.get(name, 0.0) for part in parts)},
    )
    residuals = intervals.scaled_residuals(predictions, panel, season_length=config.season_length)
    covered = intervals.coverage(residuals, horizon=config.horizon, level=config.interval_level)
    return CandidateResult(name, backtest, sum(part.fit_seconds for part in parts), covered)

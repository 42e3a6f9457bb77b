"""Conformal intervals: quantiles, widths and coverage against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecasting import intervals


def test_conformal_quantile_takes_the_ceil_n_plus_1_rank() -> None:
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    # n = 5, level 0.5: rank ceil(6 * 0.5) = 3 -> third smallest
    assert intervals.conformal_quantile(scores, 0.5) == 3.0
    # level 0.8: rank ceil(4.8) = 5 -> the largest
    assert intervals.conformal_quantile(scores, 0.8) == 5.0


def residual_frame(scores_by_series: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for sid, scores in scores_by_series.items():
        for step, score in enumerate(scores, start=1):
            rows.append({"series_id": sid, "step": step, "score": score})
    return pd.DataFrame(rows)


def test_coverage_judges_each_series_by_the_others() -> None:
    # Three series, two steps; steps are pooled (fewer than MIN_PER_STEP per step).
    residuals = residual_frame({"a": [1.0, 2.0], "b": [1.0, 2.0], "c": [10.0, 10.0]})
    # Without a: scores [1, 2, 10, 10], n=4, level 0.5 -> rank ceil(2.5)=3 -> 10: a's 1, 2 inside.
    # Without b: same -> inside. Without c: [1, 2, 1, 2] -> rank 3 -> 2: c's 10, 10 outside.
    assert intervals.coverage(residuals, horizon=2, level=0.5) == pytest.approx(4 / 6)


def test_scaled_residuals_and_intervals_use_the_series_scale() -> None:
    ts = pd.date_range("2020-01-01", periods=6, freq="MS")
    panel = pd.DataFrame({"series_id": "a", "ts": ts, "value": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]})
    # season_length 1: the MASE scale is the mean absolute step of the history = 2
    predictions = pd.DataFrame({"series_id": "a", "origin": ts[3], "step": [1, 2], "ts": ts[4:],
                                "y": [9.0, 11.0], "yhat": [8.0, 15.0], "model": "m"})
    residuals = intervals.scaled_residuals(predictions, panel, season_length=1)
    assert residuals["score"].tolist() == [0.5, 2.0]
    quantiles = pd.Series([1.0, 1.5], index=[1, 2])
    forecast = pd.DataFrame({"series_id": "a", "step": [1, 2], "value": [13.0, 15.0]})
    with_bands = intervals.add_intervals(forecast, panel, quantiles, season_length=1)
    assert with_bands["lower"].tolist() == [11.0, 12.0]
    assert with_bands["upper"].tolist() == [15.0, 18.0]


def test_constant_series_gets_a_point_interval_not_null() -> None:
    ts = pd.date_range("2020-01-01", periods=6, freq="MS")
    panel = pd.DataFrame({"series_id": "flat", "ts": ts, "value": 4.0})
    forecast = pd.DataFrame({"series_id": "flat", "step": [1], "value": [4.0]})
    out = intervals.add_intervals(forecast, panel, pd.Series([2.0], index=[1]), season_length=12)
    assert (out["lower"].iloc[0], out["upper"].iloc[0]) == (4.0, 4.0)


def test_step_quantiles_never_shrink_with_the_step() -> None:
    rng = np.random.default_rng(0)
    frames = [pd.DataFrame({"series_id": f"s{i}", "step": [1, 2, 3], "score": rng.uniform(0, 1, 3) * [3, 1, 2]})
              for i in range(20)]
    q = intervals.step_quantiles(pd.concat(frames, ignore_index=True), horizon=3, level=0.8)
    assert list(q.index) == [1, 2, 3]
    assert q.is_monotonic_increasing

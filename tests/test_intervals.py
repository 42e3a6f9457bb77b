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


def _coverage_one_by_one(residuals: pd.DataFrame, *, horizon: int, level: float) -> float:
    """The definition: each series judged by step_quantiles of all the others (O(series^2))."""
    if residuals["series_id"].nunique() > 1:
        groups = residuals.groupby("series_id", sort=False).groups.values()
    else:
        groups = [[i] for i in residuals.index]
    inside = 0
    for index in groups:
        rest = residuals.drop(index=index)
        own = residuals.loc[index]
        q = intervals.step_quantiles(rest, horizon=horizon, level=level)
        inside += int((own["score"].to_numpy() <= own["step"].map(q).to_numpy()).sum())
    return inside / len(residuals)


@pytest.mark.parametrize("n_series, origins, horizon, level, integer_scores", [
    (40, 1, 5, 0.8, False),   # per-step quantiles
    (40, 2, 3, 0.9, True),    # ties everywhere
    (6, 3, 4, 0.8, False),    # fewer than MIN_PER_STEP per step: pooled
    (11, 1, 4, 0.5, True),    # 10 per step without one series: the threshold itself
    (1, 4, 6, 0.8, False),    # one series: each residual judged by the others
    (2, 1, 3, 0.95, False),   # rest so small that the rank is its largest value
])
def test_coverage_equals_the_one_by_one_definition(n_series, origins, horizon, level, integer_scores) -> None:
    rng = np.random.default_rng(n_series * 100 + horizon)
    rows = [{"series_id": f"s{i}", "origin": o, "step": step,
             "score": float(rng.integers(0, 4)) if integer_scores else float(rng.gamma(2.0) * (1 + step / 3))}
            for i in range(n_series) for o in range(origins) for step in range(1, horizon + 1)]
    residuals = pd.DataFrame(rows)
    residuals = residuals.drop(index=residuals.index[3]) if n_series > 2 else residuals  # a ragged step
    expected = _coverage_one_by_one(residuals, horizon=horizon, level=level)
    assert intervals.coverage(residuals, horizon=horizon, level=level) == pytest.approx(expected, abs=0)


def test_coverage_of_many_series_is_fast() -> None:
    import time

    rng = np.random.default_rng(1)
    n, horizon = 5000, 28  # the one-by-one definition takes minutes here
    residuals = pd.DataFrame({"series_id": np.repeat([f"s{i}" for i in range(n)], horizon),
                              "step": np.tile(np.arange(1, horizon + 1), n),
                              "score": rng.gamma(2.0, size=n * horizon)})
    start = time.perf_counter()
    covered = intervals.coverage(residuals, horizon=horizon, level=0.8)
    assert time.perf_counter() - start < 5.0
    assert 0.78 < covered < 0.82


def test_scaled_residuals_of_an_unsorted_panel_use_the_history_up_to_the_origin() -> None:
    ts = pd.date_range("2020-01-01", periods=6, freq="MS")
    panel = pd.DataFrame({"series_id": ["a"] * 6 + ["b"] * 6, "ts": list(ts) * 2,
                          "value": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0] + [2.0, 2.0, 4.0, 4.0, 6.0, 6.0]})
    shuffled = panel.sample(frac=1.0, random_state=3)
    predictions = pd.DataFrame({"series_id": ["a", "b"], "origin": [ts[3], ts[3]], "step": [1, 1],
                                "ts": [ts[4], ts[4]], "y": [9.0, 6.0], "yhat": [8.0, 5.0], "model": "m"})
    for frame in (panel, shuffled):
        residuals = intervals.scaled_residuals(predictions, frame, season_length=1)
        # history up to ts[3]: a steps by 2 -> 1 / 2; b: |0|, |2|, |0| -> scale 2/3 -> 1.5
        assert residuals.sort_values("series_id")["score"].tolist() == pytest.approx([0.5, 1.5])

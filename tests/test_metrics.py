import math

import numpy as np
import pandas as pd
import pytest

from forecasting.backtest import choose_champion
from forecasting.metrics import METRICS, mae, mase, mase_scale, rmse, score, smape


def test_point_metrics_against_hand_computed_values():
    y, yhat = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 5.0])  # errors 1, 0, 2
    assert mae(y, yhat) == pytest.approx(1.0)
    assert rmse(y, yhat) == pytest.approx(math.sqrt(5 / 3))
    # 2|e| / (|y| + |yhat|): 2/3, 0, 4/8
    assert smape(y, yhat) == pytest.approx(100 * (2 / 3 + 0 + 0.5) / 3)
    history = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # seasonal (m=2) differences all 2
    assert mase_scale(history, 2) == pytest.approx(2.0)
    assert mase(y, yhat, history, 2) == pytest.approx(0.5)


def test_smape_zero_over_zero_counts_as_zero_and_short_history_uses_lag_one():
    assert smape(np.zeros(2), np.zeros(2)) == 0.0
    assert mase_scale(np.array([1.0, 3.0, 4.0]), 12) == pytest.approx(1.5)  # |2|, |1| at lag 1
    assert math.isnan(mase_scale(np.array([5.0, 5.0, 5.0]), 1))  # constant: undefined, not inf


def test_score_per_series_and_aggregate_rows():
    ts = pd.date_range("2020-01-01", periods=6, freq="D")
    history = pd.DataFrame({"series_id": ["a"] * 4 + ["b"] * 4,
                            "ts": list(ts[:4]) * 2,
                            "value": [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 14.0, 14.0]})
    # a: lag-2 diffs 2, 2 -> scale 2; b: diffs 4, 4 -> scale 4
    preds = pd.DataFrame({"model": ["m"] * 4, "series_id": ["a", "a", "b", "b"],
                          "ts": [ts[4], ts[5]] * 2, "y": [5.0, 6.0, 10.0, 10.0],
                          "yhat": [4.0, 6.0, 14.0, 10.0]})
    out = score(preds, history, season_length=2).set_index(["model", "series_id"], drop=False)
    a = out.loc[("m", "a")]
    assert a["mae"] == pytest.approx(0.5) and a["mase"] == pytest.approx(0.25)
    assert a["rmse"] == pytest.approx(math.sqrt(0.5))
    b = out.loc[("m", "b")]
    assert b["mae"] == pytest.approx(2.0) and b["mase"] == pytest.approx(0.5)
    agg = out[out["series_id"].isna()].iloc[0]
    assert agg["mase"] == pytest.approx((0.25 + 0.5) / 2)
    assert agg["mae"] == pytest.approx((0.5 + 2.0) / 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_forecast_is_unscored_and_cannot_win(bad: float):
    """A NaN step used to count as perfect in sMAPE and be skipped in MASE, so a model that
    failed on part of a series scored better than one that forecast it all, and won."""
    ts = pd.date_range("2020-01-01", periods=6, freq="D")
    history = pd.DataFrame({"series_id": ["a"] * 4 + ["b"] * 4, "ts": list(ts[:4]) * 2,
                            "value": [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 14.0, 14.0]})
    y = [5.0, 6.0, 10.0, 10.0]
    preds = pd.DataFrame({"model": ["broken"] * 4 + ["fine"] * 4, "series_id": ["a", "a", "b", "b"] * 2,
                          "ts": [ts[4], ts[5]] * 4, "y": y * 2,
                          "yhat": [5.0, 6.0, bad, 10.0, 4.0, 7.0, 12.0, 12.0]})
    out = score(preds, history, season_length=2)
    broken = out[out["model"] == "broken"]
    assert broken.loc[broken["series_id"] == "a", "mase"].tolist() == [0.0]  # its finite series stays scored
    assert broken.loc[broken["series_id"] == "b", list(METRICS)].isna().all(axis=None)
    assert broken.loc[broken["series_id"].isna(), list(METRICS)].isna().all(axis=None)
    assert choose_champion(out) == "fine"


def test_score_scales_by_the_history_up_to_each_origin():
    ts = pd.date_range("2020-01-01", periods=6, freq="D")
    history = pd.DataFrame({"series_id": ["a"] * 6, "ts": ts, "value": [0.0, 1.0, 2.0, 3.0, 13.0, 23.0]})
    preds = pd.DataFrame({"model": ["m"], "series_id": ["a"], "origin": [ts[3]], "ts": [ts[4]],
                          "y": [13.0], "yhat": [12.0]})
    out = score(preds, history, season_length=1)
    assert out.loc[0, "mase"] == pytest.approx(1.0)  # scale from 0..3 only (diffs 1), not 13, 23


def test_score_refuses_missing_columns():
    with pytest.raises(ValueError, match="`predictions` lacks columns"):
        score(pd.DataFrame({"model": ["m"]}), pd.DataFrame(), season_length=1)

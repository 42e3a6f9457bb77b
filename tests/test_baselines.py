import numpy as np
import pandas as pd
import pytest

from forecasting import baselines
from forecasting.config import TrainingConfig
from forecasting.forecasters import make_forecaster
from tests.forecast_fixtures import make_panel


def test_naive_and_seasonal_naive_values():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(baselines.naive(y, 3), [5.0, 5.0, 5.0])
    np.testing.assert_array_equal(baselines.seasonal_naive(y, 5, 2), [4.0, 5.0, 4.0, 5.0, 4.0])
    np.testing.assert_array_equal(baselines.seasonal_naive(y[:1], 2, 12), [1.0, 1.0])  # < 1 season


def test_ets_follows_a_clean_seasonal_trend():
    t = np.arange(96)
    y = 50 + 0.5 * t + 5 * np.sin(2 * np.pi * t / 12)
    forecast = baselines.ets(y[:84], 12, 12)
    assert np.abs(forecast - y[84:]).mean() < 0.5 * np.abs(baselines.seasonal_naive(y[:84], 12, 12) - y[84:]).mean()


def test_ets_falls_back_on_short_or_odd_series():
    for y in (np.array([3.0, 4.0, 5.0]), np.zeros(30), np.array([1.0, -1.0] * 20)):
        forecast = baselines.ets(y, 4, 12)
        assert forecast.shape == (4,) and np.isfinite(forecast).all()


@pytest.mark.parametrize("name", ["naive", "seasonal_naive", "ets"])
def test_baseline_forecasters_share_the_interface(name, tmp_path):
    panel = make_panel(2, 40)
    f = make_forecaster(name, freq="MS", horizon=3, season_length=12, training=TrainingConfig())
    calls = []
    out = f.fit(panel, on_epoch=lambda *a: calls.append(a)).predict(panel)
    assert calls == [] and f.history == [] and f.torch_module is None
    assert f.example_input(panel) is None
    assert list(out.columns) == ["series_id", "step", "ts", "value"]
    assert out["step"].tolist() == [1, 2, 3] * 2
    last = panel.groupby("series_id")["ts"].max()
    assert (out.groupby("series_id")["ts"].min() == last + pd.DateOffset(months=1)).all()
    f.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecaster.json"]
    if name == "seasonal_naive":
        expected = panel[panel.series_id == "s0"]["value"].to_numpy()[-12:-9]
        np.testing.assert_allclose(out[out.series_id == "s0"]["value"], expected)

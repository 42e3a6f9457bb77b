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


def test_ets_on_a_short_noisy_history_stays_near_it():
    # 13 months of noise, on which the damped trend alone forecast 6.6x the history's maximum;
    # AICc prefers the level there, as it should for noise.
    y = np.exp(np.random.default_rng(8).normal(3, 1.0, 13))
    assert baselines.ets(y, 12, 12).max() < 1.5 * y.max()
    many = np.exp(np.random.default_rng(0).normal(3, 1.0, 100))
    assert max(baselines.ets(many[i:i + n], 12, 12).max() / many[i:i + n].max()
               for i, n in enumerate(range(10, 40))) < 1.5


@pytest.mark.parametrize("n", [20, 26, 36, 49])
def test_ets_on_a_short_trending_history_keeps_its_trend(n: int):
    # AICc must not take the trend away where the data have one: not without a season (20
    # points), nor with 2 to 4 seasons, where a trend that carried a season's parameters too
    # lost to the level and the forecast was flat.
    t = np.arange(float(n))
    y = 100 + 5 * t + np.random.default_rng(1).normal(0, 1, n)
    forecast = baselines.ets(y, 6, 12)
    assert forecast[-1] > y[-1] + 10


@pytest.mark.parametrize("name", ["naive", "seasonal_naive", "ets"])
def test_baseline_forecasters_share_the_interface(name, tmp_path):
    panel = make_panel(2, 40)
    f = make_forecaster(name, freq="MS", horizon=3, season_length=12, training=TrainingConfig())
    calls = []
    out = f.fit(panel, on_epoch=lambda *a: calls.append(a)).predict(panel)
    assert calls == [] and f.history == [] and f.torch_module is None
    example = f.example_input(panel)  # the registered version's pyfunc input: a season of each series
    assert example.groupby("series_id").size().tolist() == [12, 12]
    assert np.isfinite(f.predict(example)["value"]).all()
    assert list(out.columns) == ["series_id", "step", "ts", "value"]
    assert out["step"].tolist() == [1, 2, 3] * 2
    last = panel.groupby("series_id")["ts"].max()
    assert (out.groupby("series_id")["ts"].min() == last + pd.DateOffset(months=1)).all()
    f.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecaster.json"]
    if name == "seasonal_naive":
        expected = panel[panel.series_id == "s0"]["value"].to_numpy()[-12:-9]
        np.testing.assert_allclose(out[out.series_id == "s0"]["value"], expected)


def test_ets_many_in_worker_processes_equals_one_by_one(monkeypatch):
    rng = np.random.default_rng(3)
    t = np.arange(60)
    histories = [40 + 0.2 * t + 4 * np.sin(2 * np.pi * t / 12 + i) + rng.standard_normal(60) for i in range(6)]
    histories.append(np.array([3.0, 4.0, 5.0]))  # falls back to seasonal naive
    ids = [f"s{i}" for i in range(len(histories))]
    expected = np.stack([baselines.ets(h, 6, 12) for h in histories])
    baselines._ETS_MEMO.clear()
    monkeypatch.setattr(baselines, "PARALLEL_MIN_SERIES", 2)
    parallel = baselines.ets_many(histories, 6, 12, series_ids=ids, n_workers=2)
    np.testing.assert_array_equal(parallel, expected)
    # the same histories again: from the memo, without fitting
    monkeypatch.setattr(baselines, "_ets", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refitted")))
    np.testing.assert_array_equal(baselines.ets_many(histories, 6, 12, series_ids=ids, n_workers=1), expected)


def test_workers_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(baselines.WORKERS_ENV, "3")
    assert baselines.workers() == 3
    monkeypatch.setenv(baselines.WORKERS_ENV, "0")
    with pytest.raises(ValueError, match=r"`FORECASTING_WORKERS` \('0'\) must be an integer >= 1"):
        baselines.workers()
    monkeypatch.delenv(baselines.WORKERS_ENV)
    assert baselines.workers() >= 1


def test_naive_and_seasonal_naive_of_many_series_equal_one_by_one():
    histories = [np.arange(1.0, 30.0), np.array([7.0, 8.0]), np.arange(100.0, 112.0)]
    values = np.concatenate(histories)
    ends = np.cumsum([len(h) for h in histories])
    starts = ends - [len(h) for h in histories]
    np.testing.assert_array_equal(baselines.naive_many(values, ends, 5),
                                  np.stack([baselines.naive(h, 5) for h in histories]))
    np.testing.assert_array_equal(baselines.seasonal_naive_many(values, starts, ends, 5, 12),
                                  np.stack([baselines.seasonal_naive(h, 5, 12) for h in histories]))

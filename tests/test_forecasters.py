import numpy as np
import pandas as pd
import pytest
import torch

from forecasting.backtest import split_at_origin
from forecasting.forecasters import load_forecaster, make_forecaster
from forecasting.metrics import mae
from tests.forecast_fixtures import HORIZON, SEASON, make_panel, one_torch_thread, tiny_training  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PANEL = make_panel(4, 96, noise=0.3)
TRAIN, TEST = split_at_origin(PANEL, cut=HORIZON)


def _fit(cell: str, **overrides):
    f = make_forecaster(cell, freq="MS", horizon=HORIZON, season_length=SEASON,
                        training=tiny_training(**overrides))
    return f.fit(TRAIN)


def _error(forecast: pd.DataFrame) -> float:
    joined = forecast.merge(TEST, on=["series_id", "ts"], suffixes=("_hat", ""))
    assert len(joined) == len(TEST)
    return mae(joined["value"], joined["value_hat"])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_each_cell_learns_sine_plus_trend_better_than_naive(cell):
    naive = make_forecaster("naive", freq="MS", horizon=HORIZON, season_length=SEASON,
                            training=tiny_training()).fit(TRAIN)
    f = _fit(cell, residual="last_value")  # the net must learn the seasonal shape itself
    forecast = f.predict(TRAIN)
    assert list(forecast.columns) == ["series_id", "step", "ts", "value"]
    assert len(forecast) == 4 * HORIZON and forecast["value"].dtype == np.float64
    assert _error(forecast) < 0.7 * _error(naive.predict(TRAIN))


def test_recursive_strategy_forecasts_the_horizon_and_learns():
    # residual "last_value": an untrained net would start as the seasonal naive forecast,
    # which beats naive on this data before any learning.
    f = _fit("gru", strategy="recursive", max_epochs=15, residual="last_value")
    assert f.torch_module.members[0].head.out_features == 1
    assert len(f.history) >= 1
    forecast = f.predict(TRAIN)
    assert forecast["step"].tolist() == list(range(1, HORIZON + 1)) * 4
    naive = make_forecaster("naive", freq="MS", horizon=HORIZON, season_length=SEASON,
                            training=tiny_training()).fit(TRAIN)
    assert _error(forecast) < 0.7 * _error(naive.predict(TRAIN))


def test_same_data_config_and_seed_give_identical_forecasts():
    a = _fit("lstm", max_epochs=4, ensemble=2).predict(TRAIN)
    b = _fit("lstm", max_epochs=4, ensemble=2).predict(TRAIN)
    pd.testing.assert_frame_equal(a, b)
    c = _fit("lstm", max_epochs=4, ensemble=2, seed=8).predict(TRAIN)
    assert not np.allclose(a["value"], c["value"])


def test_the_seed_decides_the_model_when_networks_train_in_threads_of_one_process():
    """Weight init and dropout masks draw from torch's global generator: two fits in threads
    (a Dask worker with several threads) interleaved their draws, and the same seed gave other
    models (max difference 0.1-0.3 here before the fits took turns)."""
    from concurrent.futures import ThreadPoolExecutor

    settings = dict(max_epochs=3, num_layers=2, dropout=0.3)
    alone = {cell: _fit(cell, **settings).predict(TRAIN) for cell in ("gru", "lstm")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = dict(zip(("gru", "lstm"), pool.map(lambda cell: _fit(cell, **settings).predict(TRAIN),
                                                        ("gru", "lstm"))))
    for cell in ("gru", "lstm"):
        pd.testing.assert_frame_equal(together[cell], alone[cell])


def test_save_load_round_trip_gives_the_same_forecast(tmp_path, monkeypatch):
    f = _fit("gru", max_epochs=3, ensemble=2, num_layers=2, dropout=0.1)
    f.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forecaster.json", "weights.pt"]
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    g = load_forecaster(tmp_path)
    assert seen["weights_only"] is True
    pd.testing.assert_frame_equal(f.predict(TRAIN), g.predict(TRAIN))
    assert g.params == f.params and g.history == f.history


def test_a_model_of_integer_series_ids_refuses_to_be_saved_rather_than_load_changed(tmp_path):
    """JSON turned the scaler's int keys into text: the loaded model took every series for a
    new one and scaled it from the history given to predict (its forecasts moved with it)."""
    panel = TRAIN.assign(series_id=pd.factorize(TRAIN["series_id"])[0])
    f = make_forecaster("gru", freq="MS", horizon=HORIZON, season_length=SEASON,
                        training=tiny_training(max_epochs=1)).fit(panel)
    with pytest.raises(ValueError, match=r"forecaster 'gru': `series_id` \(0, int\) must be text"):
        f.save(tmp_path)
    assert not (tmp_path / "forecaster.json").exists()


@pytest.mark.parametrize("strategy", ["direct", "recursive"])
def test_annual_cycle_is_two_more_inputs_that_change_the_forecast_and_survive_saving(tmp_path, strategy):
    daily = make_panel(3, 500, freq="D", season=7, noise=0.3)
    train, _ = split_at_origin(daily, cut=14)

    def fit(annual: bool):
        return make_forecaster("gru", freq="D", horizon=14, season_length=7,
                               training=tiny_training(max_epochs=3, annual_cycle=annual, strategy=strategy,
                                                      residual="last_value")).fit(train)

    with_year, without = fit(True), fit(False)
    assert with_year.torch_module.members[0].rnn.input_size == without.torch_module.members[0].rnn.input_size + 2
    assert with_year.net_config.years_per_step == pytest.approx(1 / 365.2425, rel=1e-3)
    forecast = with_year.predict(train)
    assert len(forecast) == 3 * 14 and np.isfinite(forecast["value"]).all()
    assert not np.allclose(forecast["value"], without.predict(train)["value"])
    with_year.save(tmp_path)
    pd.testing.assert_frame_equal(load_forecaster(tmp_path).predict(train), forecast)


def test_history_callback_params_and_example_input():
    epochs = []
    f = make_forecaster("rnn", freq="MS", horizon=HORIZON, season_length=SEASON,
                        training=tiny_training(max_epochs=3, patience=5))
    f.fit(TRAIN, on_epoch=lambda e, tr, va: epochs.append((e, tr, va)))
    assert [e for e, _, _ in epochs] == [1, 2, 3]
    # each epoch with the torch threads its fit trained on (forecasting.thread_probe: at most the process's)
    assert [{k: v for k, v in h.items() if k != "threads"} for h in f.history] == [
        {"epoch": e, "train_loss": tr, "val_loss": va, "member": 1} for e, tr, va in epochs]
    assert len({h["threads"] for h in f.history}) == 1 and 1 <= f.history[0]["threads"] <= torch.get_num_threads()
    example = f.example_input(TRAIN)  # what the registered version's pyfunc takes: each series' last window
    assert list(example.columns) == ["series_id", "ts", "value"]
    assert example.groupby("series_id").size().tolist() == [36, 36] and example["series_id"].nunique() == 2
    first_two = TRAIN[TRAIN["series_id"].isin(example["series_id"].unique())]
    pd.testing.assert_frame_equal(f.predict(example), f.predict(first_two))  # all a forecast reads
    assert len(f.example_input(TRAIN[TRAIN["series_id"] == "s1"])) == 36
    assert f.params["input_window"] == 36 and f.params["cell"] == "rnn"
    assert f.params["strategy"] == "direct" and f.params["epochs_trained"] == 3


def test_covariates_are_extra_inputs():
    panel = PANEL.assign(price=np.sin(np.arange(len(PANEL))) + 5.0)
    train, _ = split_at_origin(panel, cut=HORIZON)
    for strategy in ("direct", "recursive"):
        f = make_forecaster("gru", freq="MS", horizon=HORIZON, season_length=SEASON, covariates=["price"],
                            training=tiny_training(max_epochs=2, strategy=strategy)).fit(train)
        assert list(f.example_input(train).columns) == ["series_id", "ts", "value", "price"]
        assert np.isfinite(f.predict(train)["value"]).all()
    with pytest.raises(ValueError, match=r"`panel` lacks columns \['price'\]"):
        f.predict(TRAIN)


def test_series_unseen_in_training_are_forecast():
    f = _fit("gru", max_epochs=2)
    other = make_panel(1, 40, seed=3).assign(series_id="new")
    out = f.predict(other)
    assert out["series_id"].unique().tolist() == ["new"] and np.isfinite(out["value"]).all()


def test_bad_input_names_parameter_series_and_value():
    with pytest.raises(ValueError, match=r"`name` \('transformer'\) is not a known model"):
        make_forecaster("transformer", freq="MS", horizon=3, season_length=12, training=tiny_training())
    with pytest.raises(ValueError, match=r"`horizon` \(0\) must be an integer >= 1"):
        make_forecaster("gru", freq="MS", horizon=0, season_length=12, training=tiny_training())
    short = pd.concat([TRAIN, make_panel(1, 20).assign(series_id="tiny")], ignore_index=True)
    with pytest.raises(ValueError, match=r"series 'tiny' has 20 observations, fewer than `input_window \+ horizon` \(42\)"):
        _fit_on(short)
    nan = TRAIN.copy()
    nan.loc[nan.index[100], "value"] = np.nan
    with pytest.raises(ValueError, match=r"`value` of series 's1' is NaN at ts 2010-11-01"):
        _fit_on(nan)
    fitted = _fit("gru", max_epochs=1)
    with pytest.raises(ValueError, match=r"series 's0' has 10 observations, fewer than `input_window` \(36\)"):
        fitted.predict(TRAIN.groupby("series_id").tail(10))
    with pytest.raises(ValueError, match="not fitted"):
        make_forecaster("gru", freq="MS", horizon=3, season_length=12, training=tiny_training()).predict(TRAIN)


def test_a_seen_series_below_minus_one_at_predict_is_named_not_forecast_as_nan():
    fitted = _fit("gru", max_epochs=1)  # positive data: log1p scaling
    recent = TRAIN.copy()
    recent.loc[recent[recent["series_id"] == "s2"].index[-1], "value"] = -3.0
    with pytest.raises(ValueError, match=r"`value` of series 's2' holds -3.0 but the model was trained with log1p"):
        fitted.predict(recent)


def test_a_constant_series_is_forecast_as_its_constant():
    """A series without spread: its divisor is tiny against its size, so the network's residual
    output cannot move it (a divisor of 1 in log1p's units made that a 2% error)."""
    flat = make_panel(1, 96).assign(series_id="flat", value=1e9)
    panel = pd.concat([TRAIN, flat.iloc[:-HORIZON]], ignore_index=True)
    forecast = make_forecaster("gru", freq="MS", horizon=HORIZON, season_length=SEASON,
                               training=tiny_training(max_epochs=2)).fit(panel).predict(panel)
    values = forecast.loc[forecast["series_id"] == "flat", "value"].to_numpy()
    np.testing.assert_allclose(values, 1e9, rtol=1e-7)


def _fit_on(panel):
    return make_forecaster("gru", freq="MS", horizon=HORIZON, season_length=SEASON,
                           training=tiny_training(max_epochs=1)).fit(panel)


def test_batched_predict_equals_predict_series_by_series(monkeypatch):
    import forecasting.forecasters as forecasters

    f = _fit("lstm", max_epochs=2)
    together = f.predict(TRAIN)
    monkeypatch.setattr(forecasters, "PREDICT_BATCH", 3)  # 4 series: batches of 3 and 1
    batched = f.predict(TRAIN)
    one_by_one = pd.concat([f.predict(group) for _, group in TRAIN.groupby("series_id", sort=False)],
                           ignore_index=True)
    pd.testing.assert_frame_equal(batched, together, rtol=1e-5)
    pd.testing.assert_frame_equal(one_by_one, together, rtol=1e-5)


def test_predict_reads_only_the_last_input_window_of_a_seen_series():
    f = _fit("gru", max_epochs=2)
    recent = TRAIN.groupby("series_id", sort=False).tail(f.input_window).reset_index(drop=True)
    pd.testing.assert_frame_equal(f.predict(recent), f.predict(TRAIN))
    # rows of a series need not be contiguous in the panel
    shuffled = TRAIN.sample(frac=1.0, random_state=0).sort_values("ts", kind="stable")
    out = f.predict(shuffled).sort_values(["series_id", "step"], ignore_index=True)
    pd.testing.assert_frame_equal(out, f.predict(TRAIN).sort_values(["series_id", "step"], ignore_index=True))


@pytest.mark.parametrize("name", ["naive", "seasonal_naive", "ets"])
def test_baseline_predict_of_all_series_equals_each_series_alone(name):
    from forecasting import baselines

    panel = pd.concat([PANEL, make_panel(1, 8, seed=5).assign(series_id="short")], ignore_index=True)
    f = make_forecaster(name, freq="MS", horizon=HORIZON, season_length=SEASON, training=tiny_training())
    out = f.fit(panel).predict(panel)
    single = {"naive": lambda y: baselines.naive(y, HORIZON),
              "seasonal_naive": lambda y: baselines.seasonal_naive(y, HORIZON, SEASON),
              "ets": lambda y: baselines.ets(y, HORIZON, SEASON)}[name]
    for sid, group in panel.groupby("series_id", sort=False):
        np.testing.assert_allclose(out.loc[out.series_id == sid, "value"], single(group["value"].to_numpy()))
    ends = panel.groupby("series_id", sort=False)["ts"].max()
    assert (out.groupby("series_id", sort=False)["ts"].min() == ends + pd.DateOffset(months=1)).all()


def test_a_val_steps_that_leaves_no_training_window_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """Every window went to validation, training reused them, and early stopping judged on
    training data: without a word."""
    with caplog.at_level("WARNING", logger="forecasting.forecasters"):
        _fit("gru", max_epochs=1, val_steps=500)
    assert "gru: every window is a validation window (training.val_steps 500" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="forecasting.forecasters"):
        _fit("gru", max_epochs=1)
    assert "every window is a validation window" not in caplog.text

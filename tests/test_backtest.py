import numpy as np
import pandas as pd
import pytest

from forecasting.backtest import choose_champion, run_backtest, split_at_origin
from forecasting.forecasters import Forecaster
from tests.forecast_fixtures import make_panel, one_torch_thread, tiny_training  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Series ending on different dates: the origin is per series.
PANEL = pd.concat([make_panel(2, 70), make_panel(1, 60, seed=1).assign(series_id="late")],
                  ignore_index=True)


def _spy_fits(monkeypatch) -> list[tuple[str, pd.DataFrame]]:
    seen = []
    for cls in Forecaster.__subclasses__():
        real = cls.fit

        def spy(self, panel, *, on_epoch=None, _real=real):
            seen.append((self.name, panel.copy()))
            return _real(self, panel, on_epoch=on_epoch)

        monkeypatch.setattr(cls, "fit", spy)
    return seen


@pytest.mark.parametrize("retrain", [True, False])
def test_backtest_origins_never_peek_at_the_future(monkeypatch, retrain):
    seen = _spy_fits(monkeypatch)
    epochs = []
    result = run_backtest(PANEL, candidates=["naive", "seasonal_naive", "rnn"], freq="MS", horizon=4,
                          season_length=12, training=tiny_training(max_epochs=2), windows=3,
                          retrain=retrain, on_epoch=lambda *a: epochs.append(a))
    preds = result.predictions
    assert list(preds.columns) == ["model", "series_id", "origin", "step", "ts", "y", "yhat"]
    assert len(preds) == 3 * 3 * 3 * 4  # models x series x origins x steps
    assert (preds["ts"] > preds["origin"]).all()
    # The k-th fit of a model (origins run oldest first) ends exactly at each series' k-th
    # origin, so no fit sees data after the origin it is scored at (a fit on a later fold's
    # data failed this). Without retrain the one fit ends at the first origin.
    fits_per_model = pd.Series([name for name, _ in seen]).value_counts()
    assert (fits_per_model == (3 if retrain else 1)).all()
    for name in ["naive", "seasonal_naive", "rnn"]:
        frames = [frame for model, frame in seen if model == name]
        origins = preds[preds.model == name].groupby("series_id")["origin"].unique().map(sorted)
        assert (origins.map(len) == 3).all()
        for k, frame in enumerate(frames):
            last = frame.groupby("series_id")["ts"].max()
            assert last.to_dict() == origins.map(lambda o, k=k: o[k]).to_dict(), (name, k)
    # the last origin ends horizon steps before each series' end, and y are the real values
    ends = PANEL.groupby("series_id")["ts"].max()
    last_origin = preds.groupby("series_id")["origin"].max()
    assert (last_origin == ends - pd.DateOffset(months=4)).all()
    merged = preds.merge(PANEL, on=["series_id", "ts"])
    assert (merged["y"] == merged["value"]).all()
    assert epochs and all(e[0] == "rnn" for e in epochs)
    assert set(result.fit_seconds) == {"naive", "seasonal_naive", "rnn"}
    assert result.histories["naive"] == [] and len(result.histories["rnn"]) >= 1
    agg = result.scores[result.scores["series_id"].isna()]
    assert set(agg["model"]) == {"naive", "seasonal_naive", "rnn"}
    assert result.champion == choose_champion(result.scores)


def test_champion_is_lowest_mase_and_ties_go_to_the_simpler_model():
    def scores(values):
        return pd.DataFrame({"model": list(values), "series_id": [None] * len(values),
                             "mae": 1.0, "rmse": 1.0, "smape": 1.0, "mase": list(values.values())})

    assert choose_champion(scores({"naive": 1.2, "ets": 0.8, "gru": 0.7})) == "gru"
    assert choose_champion(scores({"lstm": 0.7, "gru": 0.7, "rnn": 0.9})) == "gru"
    assert choose_champion(scores({"lstm": 0.7, "ets": 0.7, "seasonal_naive": 0.8})) == "ets"
    assert choose_champion(scores({"gru": float("nan"), "naive": 1.0})) == "naive"
    with pytest.raises(ValueError, match="no model has a defined MASE"):
        choose_champion(scores({"gru": float("nan")}))


def test_a_dataset_of_constant_series_says_why_nothing_can_be_scored():
    """It said "`scores` holds no aggregate row with a defined MASE", naming neither the
    dataset nor the cause."""
    from forecasting.pipeline import backtest_candidate, compare
    from tests.flow_fixtures import tiny_config

    flat = PANEL.assign(value=5.0)
    result = backtest_candidate(tiny_config(), flat, "naive")  # scored: MASE undefined, no error yet
    with pytest.raises(ValueError, match=r"dataset 'sales': no model has a defined MASE, .* which is 0 in every "
                                         r"series' training part here \(constant series"):
        compare([result], dataset="sales")


def test_a_candidate_with_non_finite_forecasts_is_scored_out_not_a_failed_night(monkeypatch):
    """A one-model backtest chose a champion among its one model: a candidate that forecast inf
    for one series raised NoDefinedMase (blaming constant series) and failed the night, where
    it should only lose its aggregate MASE and the comparison go on without it."""
    from forecasting import baselines
    from forecasting.pipeline import backtest_candidate, compare
    from tests.flow_fixtures import tiny_config

    config = tiny_config()
    real = baselines.naive_many

    def diverging(*args, **kwargs):
        rows = real(*args, **kwargs)
        rows[1] = np.inf
        return rows

    monkeypatch.setattr(baselines, "naive_many", diverging)
    naive = backtest_candidate(config, PANEL, "naive")
    agg = naive.backtest.scores[naive.backtest.scores["series_id"].isna()]
    assert agg["mase"].isna().all()
    seasonal = backtest_candidate(config, PANEL, "seasonal_naive")
    assert compare([naive, seasonal], dataset="sales").champion == "seasonal_naive"
    with pytest.raises(ValueError, match=r"dataset 'sales': no model has a defined MASE, so no champion can be "
                                         r"chosen: every candidate \(naive\) forecast non-finite values"):
        compare([naive], dataset="sales")


def test_backtest_bad_input():
    with pytest.raises(ValueError, match=r"`windows` \(0\) must be an integer >= 1"):
        run_backtest(PANEL, candidates=["naive"], freq="MS", horizon=4, season_length=12,
                     training=tiny_training(), windows=0)
    with pytest.raises(ValueError, match=r"series 'late' has 60 observations, not more than `windows` \* `horizon` \(5 \* 12\)"):
        run_backtest(PANEL, candidates=["naive"], freq="MS", horizon=12, season_length=12,
                     training=tiny_training(), windows=5)
    with pytest.raises(ValueError, match=r"series 'late' has 40 observations, fewer than `input_window \+ horizon` \(46\)"):
        run_backtest(PANEL, candidates=["gru"], freq="MS", horizon=10, season_length=12,
                     training=tiny_training(), windows=2)


def test_split_at_origin():
    train, rest = split_at_origin(PANEL, cut=5)
    assert (rest.groupby("series_id").size() == 5).all()
    assert len(train) + len(rest) == len(PANEL)

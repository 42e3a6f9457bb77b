"""MLflow registry and promotion against a real MLflow store (no Prefect, no database)."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pandas.tseries.frequencies import to_offset
from mlflow.protos import databricks_pb2
from mlflow.tracking import MlflowClient

from forecasting import baselines, pipeline, tracking, tracking_process
from forecasting.config import DatasetConfig, Settings
from forecasting.tracking_process import RegisteredForecaster
from tests.flow_fixtures import Failed, tiny_config

CONFIG = tiny_config()


def seasonal_panel() -> pd.DataFrame:
    t = np.arange(60)
    frames = [pd.DataFrame({"series_id": sid, "ts": pd.date_range("2015-01-01", periods=60, freq="MS"),
                            "value": 100.0 * (i + 1) + 10 * np.sin(2 * np.pi * t / 12)})
              for i, sid in enumerate(["a", "b"])]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(autouse=True)
def imports_restored() -> Iterator[None]:
    """mlflow.pyfunc.load_model puts a model's code directory first on sys.path (and its model
    file in sys.modules) for good: a later test's spawned child imported `forecasting` from a
    tmp_path copy. Each test here leaves them as it found them (as registering does)."""
    with tracking._imports_restored():
        yield


@pytest.fixture
def client(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    return tracking.connect(Settings())


def promote(client: MlflowClient, panel: pd.DataFrame, name: str, *, claimed_mase: float | None = None,
            config: DatasetConfig = CONFIG) -> pipeline.Promotion:
    """Backtest `name`, optionally pretend its MASE was `claimed_mase`, register it and decide,
    as the nightly flow does (its logging process's jobs called here)."""
    uri = Settings().mlflow_tracking_uri
    experiment, parent = tracking_process.start_night(uri, config.name, "parent", {}, {})
    result = pipeline.backtest_candidate(config, panel, name)
    comparison = pipeline.compare([result], dataset=config.name)
    if claimed_mase is not None:
        comparison.scores.loc[comparison.scores["series_id"].isna(), "mase"] = claimed_mase
    run_id = tracking.write_candidate_log(client, pipeline.candidate_log(
        experiment=experiment, parent_run_id=parent, config=config, result=result, panel=panel,
        as_of=panel["ts"].max()))
    fitted = pipeline.fit_final(config, panel, name)
    quantiles = pipeline.calibrate(config, panel, comparison)
    current = tracking_process.current_champion(uri, config.name)
    version = tracking_process.register(uri, config.name, fitted, run_id=run_id, example=pipeline.signature_example(panel),
                                        quantiles=quantiles, level=config.interval_level,
                                        trained_through=panel["ts"].max())
    decision = pipeline.decide(config=config, panel=panel, comparison=comparison, fitted=fitted,
                               quantiles=quantiles, current=current)
    promotion = decision.promotion(version, run_id)
    if promotion.promoted:
        moved = tracking_process.set_champion(uri, config.name, promotion.new_version, promotion.replaces)
        assert moved == promotion.new_version
    return promotion


def test_alias_moves_only_when_the_new_model_beats_the_current_champion(client: MlflowClient) -> None:
    panel = seasonal_panel()
    first = promote(client, panel, "seasonal_naive")
    assert first.promoted and first.version == "1" and first.reason == "no current champion"
    assert str(tracking.champion_version(client, "sales").version) == "1"

    # naive is far worse on a seasonal series than seasonal naive re-scored on the same window.
    second = promote(client, panel, "naive")
    assert not second.promoted and second.version == "1"
    assert second.forecaster.name == "seasonal_naive"
    assert second.current_mase is not None and second.new_mase >= second.current_mase
    assert second.decision == "kept" and second.new_version == "2"
    assert str(tracking.champion_version(client, "sales").version) == "1"
    assert client.get_registered_model("sales-forecaster") is not None
    assert len(client.search_model_versions("name='sales-forecaster'")) == 2  # both registered

    # A new model that beats the current champion's re-score takes the alias.
    third = promote(client, panel, "naive", claimed_mase=0.0)
    assert third.promoted and third.version == "3"
    assert str(tracking.champion_version(client, "sales").version) == "3"
    parent_tags = client.get_run(client.get_model_version("sales-forecaster", "3").run_id).data.tags
    assert parent_tags["model"] == "naive"


def test_a_changed_season_promotes_rather_than_compare_mase_on_two_scales(client: MlflowClient) -> None:
    """MASE and the intervals are scaled by the season: a champion registered with another
    season_length is not compared with tonight's candidates, whatever the two scores say."""
    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")  # season 12
    halved = CONFIG.model_copy(update={"season_length": 6})
    night = promote(client, panel, "naive", claimed_mase=1e9, config=halved)
    assert night.promoted and night.decision == "promoted" and night.version == "2"
    assert night.reason == "current champion v1 has season_length 12, the config now 6"


def test_served_versions_are_every_version_the_alias_pointed_at(client: MlflowClient) -> None:
    """What a backfill leaves alone: the nights of every champion, not only the current one."""
    panel = seasonal_panel()
    uri = Settings().mlflow_tracking_uri
    assert tracking_process.served_versions(uri, "sales") == []
    promote(client, panel, "seasonal_naive")
    promote(client, panel, "naive", claimed_mase=0.0)  # promoted: the alias moves on to v2
    kept = promote(client, panel, "seasonal_naive", claimed_mase=float("inf"))  # v3: registered, not champion
    assert kept.decision == "kept" and kept.new_version == "3", kept.reason
    assert tracking_process.served_versions(uri, "sales") == ["1", "2"]
    client.set_registered_model_alias("sales-forecaster", "champion", "3")  # by hand, in the UI
    assert tracking_process.served_versions(uri, "sales") == ["1", "2", "3"]


def test_a_changed_interval_level_promotes_and_predict_refuses_the_old_champion(client: MlflowClient) -> None:
    """A kept champion used to forecast with intervals calibrated at the old level (and
    `predict` always did): a champion's intervals must be at the config's level."""
    panel = seasonal_panel()
    first = promote(client, panel, "seasonal_naive")
    loaded = tracking_process.current_champion(Settings().mlflow_tracking_uri, "sales")
    assert loaded.interval_level == CONFIG.interval_level
    assert pipeline.unlike_config(loaded, CONFIG) is None
    wider = CONFIG.model_copy(update={"interval_level": 0.95})
    night = promote(client, panel, "naive", claimed_mase=1e9, config=wider)  # would have been kept
    assert night.promoted and night.decision == "promoted" and night.version == "2"
    assert night.reason == (f"current champion v1's intervals are calibrated at level {CONFIG.interval_level:g}, "
                            "the config now asks 0.95")
    assert first.version == "1"
    assert pipeline.unlike_config(loaded, wider) == night.reason


def test_a_past_night_after_a_config_change_leaves_the_alias_alone(client: MlflowClient) -> None:
    """`run --as-of` before the champion's data end, after a change the champion is unlike
    (here its interval level): the config's check came first and promoted a model trained on
    less data, which `predict` then forecast with."""
    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")
    past = panel[panel["ts"] <= panel["ts"].max() - pd.DateOffset(months=12)].reset_index(drop=True)
    night = promote(client, past, "naive", config=CONFIG.model_copy(update={"interval_level": 0.95}))
    assert night.decision == "backfill" and not night.promoted
    assert night.reason.startswith("current champion v1 was trained through ")
    assert str(tracking.champion_version(client, "sales").version) == "1"


def test_a_champion_whose_cell_left_models_is_replaced_and_refused_by_predict(client: MlflowClient) -> None:
    """`models: [lstm, gru]` after an rnn champion: the night kept rnn (its re-score still won),
    so a cell taken out of the comparison went on making the production forecast."""
    panel = seasonal_panel()
    promote(client, panel, "rnn")
    without_rnn = CONFIG.model_copy(update={"models": ("lstm", "gru")})
    night = promote(client, panel, "naive", claimed_mase=1e9, config=without_rnn)  # would have been kept
    assert night.promoted and night.version == "2"
    assert night.reason == "current champion v1 is 'rnn', which the config no longer compares (models: ['lstm', 'gru'])"
    loaded = tracking_process.current_champion(Settings().mlflow_tracking_uri, "sales")
    assert pipeline.unlike_config(loaded, without_rnn) is None  # v2 (naive) is a baseline: always compared


def test_a_champion_whose_settings_differ_only_in_name_is_refreshed_not_kept_for_good(client: MlflowClient) -> None:
    """Settings compared whole: a config that named the device, wrote out the default input
    window, or changed what cannot change the model (patience beyond max_epochs) kept the old
    champion forecasting for good: its re-score tied tonight's model, which is not `<`."""
    panel = seasonal_panel()
    on_cpu = CONFIG.model_copy(update={"training": CONFIG.training.model_copy(update={"device": "cpu"})})  # bitwise
    first = promote(client, panel, "gru", config=on_cpu)
    assert first.decision == "promoted"
    named = CONFIG.training.model_copy(update={"device": "auto", "input_window": 36})  # 36: the default here
    assert pipeline.same_settings(first.forecaster, CONFIG.model_copy(update={"training": named}))
    no_effect = on_cpu.training.model_copy(update={"patience": CONFIG.training.patience + 1})  # > max_epochs either way
    night = promote(client, panel, "gru", config=CONFIG.model_copy(update={"training": no_effect}))
    assert night.decision == "refreshed" and night.promoted and night.version == "2", night.reason
    assert night.new_mase == night.current_mase
    assert "scored the same" in night.reason


def test_a_freq_written_another_way_is_the_same_freq() -> None:
    """freq was compared as text: a config changed from "W" to "W-SUN" (the same weeks) replaced
    the champion without a comparison, and `predict` refused it."""
    weekly = tiny_config(freq="W-SUN", season_length=52)
    model = pipeline.make_forecaster("naive", freq="W", horizon=weekly.horizon, season_length=52,
                                     training=weekly.training)
    current = RegisteredForecaster(model, "1", "run", [1.0] * weekly.horizon, None)
    assert pipeline.unlike_config(current, weekly) is None
    assert pipeline.unlike_config(current, tiny_config(freq="W-MON", season_length=52)) is not None
    # registered under pandas 2, as "H" (hours) that pandas 3 no longer reads: another freq, not a failed night
    hourly = tiny_config(freq="h", season_length=24)
    old_hours = pipeline.make_forecaster("naive", freq="h", horizon=hourly.horizon, season_length=24,
                                         training=hourly.training)
    old_hours.freq = "H"
    reason = pipeline.unlike_config(RegisteredForecaster(old_hours, "1", "run", [1.0] * hourly.horizon, None), hourly)
    try:
        to_offset("H")
    except ValueError:  # pandas 3
        assert reason == "current champion v1 forecasts 6 x 'H', the config now 6 x 'h'"
    else:  # pandas 2 (pyproject admits 2.2): still hours
        assert reason is None


def test_a_champion_trained_on_a_gpu_is_re_scored_on_tonights_device(client: MlflowClient,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-scored with its own settings, a champion trained with `device: cuda` failed every
    night on a machine without CUDA ("CUDA is not available"), after all the training."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    panel = seasonal_panel()
    gpu = pipeline.make_forecaster("lstm", freq=CONFIG.freq, horizon=CONFIG.horizon, season_length=CONFIG.season_length,
                                   training=CONFIG.training.model_copy(update={"device": "cuda"}))
    comparison = pipeline.compare([pipeline.backtest_candidate(CONFIG, panel, "naive")], dataset=CONFIG.name)
    scores = pipeline.rescore_current(gpu, CONFIG, panel, comparison)
    assert np.isfinite(scores["mase"])


def test_a_champion_that_cannot_backtest_on_tonights_data_is_replaced_not_a_failed_night(client: MlflowClient) -> None:
    """Its input window is longer than tonight's series allow (the config's window was
    shortened, and validation sized the series for that): re-scoring it raised, and every
    night failed in `decide` until someone moved the alias by hand."""
    long_window = CONFIG.model_copy(update={"training": CONFIG.training.model_copy(update={"input_window": 40})})
    first = promote(client, seasonal_panel(), "lstm", config=long_window)
    assert first.version == "1"
    short = seasonal_panel().groupby("series_id").tail(36).reset_index(drop=True)
    night = promote(client, short, "naive", claimed_mase=1e9)  # would have been kept
    assert night.promoted and night.version == "2"
    assert night.reason.startswith("current champion v1 cannot be re-scored on tonight's data: ")


def test_a_champion_that_re_scores_to_non_finite_forecasts_is_replaced_not_a_failed_night(
        client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its re-score's own backtest chose a champion among its one model, so a non-finite
    forecast raised NoDefinedMase out of `decide`, after training, every night."""
    first = promote(client, seasonal_panel(), "seasonal_naive")
    assert first.version == "1"
    real = baselines.seasonal_naive_many

    def diverging(*args: object, **kwargs: object) -> np.ndarray:
        rows = real(*args, **kwargs)
        rows[0] = np.inf  # series a
        return rows

    monkeypatch.setattr(baselines, "seasonal_naive_many", diverging)
    night = promote(client, seasonal_panel(), "naive", claimed_mase=1e9)  # would have been kept
    assert night.promoted and night.version == "2"
    assert night.reason == "current champion v1 re-scored to no MASE (non-finite forecasts)"


def test_a_kept_champion_is_the_flagged_score_row_with_its_own_scores(client: MlflowClient) -> None:
    """On a night that keeps the current champion, `is_champion` marks the model that forecast:
    a row of its own, with the scores it was re-scored to, not tonight's candidate's."""
    panel = seasonal_panel()
    first = promote(client, panel, "seasonal_naive")
    kept = promote(client, panel, "naive")
    assert kept.decision == "kept"
    rows = pipeline.score_rows(pipeline.compare([pipeline.backtest_candidate(CONFIG, panel, "naive")],
                                                dataset=CONFIG.name),
                               {"naive": "tonights-run"}, promotion=kept)
    flagged = rows[rows["is_champion"]]
    assert flagged["model"].tolist() == ["seasonal_naive v1"] and flagged["series_id"].isna().all()
    assert flagged["mase"].iloc[0] == pytest.approx(kept.current_mase)
    assert flagged[["mae", "rmse", "smape"]].notna().all(axis=None)
    # its intervals' coverage at tonight's origins, as each candidate's (it had none)
    assert flagged["interval_coverage"].iloc[0] == pytest.approx(
        pipeline.backtest_candidate(CONFIG, panel, "seasonal_naive").coverage)
    assert flagged["mlflow_run_id"].iloc[0] == first.run_id
    assert not rows.loc[rows["model"] == "naive", "is_champion"].any()
    promoted = promote(client, panel, "naive", claimed_mase=0.0)
    rows = pipeline.score_rows(pipeline.compare([pipeline.backtest_candidate(CONFIG, panel, "naive")],
                                                dataset=CONFIG.name),
                               {"naive": promoted.run_id}, promotion=promoted)
    assert set(rows.loc[rows["is_champion"], "model"]) == {"naive"} and len(rows) == 3  # a, b, aggregate
    assert (rows["status"] == "scored").all() and rows["detail"].isna().all()
    comparison = pipeline.compare([pipeline.backtest_candidate(CONFIG, panel, "naive")], dataset=CONFIG.name)
    comparison.scores.loc[comparison.scores["series_id"] == "a", ["mae", "rmse", "smape", "mase"]] = float("nan")
    rows = pipeline.score_rows(comparison, {"naive": promoted.run_id}, promotion=promoted)
    failed = rows[rows["status"] == "failed"]  # metrics.score leaves non-finite forecasts unscored
    assert failed["series_id"].tolist() == ["a"] and "non-finite" in failed["detail"].iloc[0]


def test_a_baseline_champion_is_refreshed_after_a_change_to_the_networks_training(client: MlflowClient) -> None:
    """The training block is the networks': a baseline champion is still tonight's baseline of
    that name, so it is refreshed, not kept (and re-scored by a backtest of its own) forever."""
    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")
    retuned = CONFIG.model_copy(update={"training": CONFIG.training.model_copy(update={"hidden_size": 16})})
    night = promote(client, panel, "seasonal_naive", config=retuned)
    assert night.decision == "refreshed" and night.promoted and night.version == "2"


def test_a_champion_needing_a_covariate_the_config_dropped_is_replaced(client: MlflowClient) -> None:
    panel = seasonal_panel()
    with_promo = CONFIG.model_copy(update={"source": CONFIG.source.model_copy(update={"covariates": ("promo",)})})
    promote(client, panel.assign(promo=np.tile(np.arange(60) % 3, 2).astype(float)), "gru", config=with_promo)
    night = promote(client, panel, "naive", claimed_mase=1e9)  # would lose any comparison
    assert night.decision == "promoted" and night.version == "2"
    assert night.reason == "current champion v1 needs covariates ['promo'], which the config no longer reads"
    # predict's check (it failed with "`panel` lacks columns ['promo']", naming no dataset)
    first = tracking.load_version(client, "sales", "1")
    assert pipeline.unlike_config(first, CONFIG) == night.reason
    assert pipeline.unlike_config(first, with_promo) is None


def test_same_model_and_settings_is_refreshed_not_stuck(client: MlflowClient) -> None:
    """A neural champion's own weights have seen the backtest window; it is re-scored by
    refitting, so the same model retrained on newer data ties and takes the alias."""
    panel = seasonal_panel()
    first = promote(client, panel[panel["ts"] <= "2019-06-01"], "gru")
    second = promote(client, panel, "gru")
    assert first.decision == "promoted" and second.decision == "refreshed"
    assert second.current_mase == pytest.approx(second.new_mase)
    assert str(tracking.champion_version(client, "sales").version) == "2"
    assert tracking.load_champion(client, "sales").trained_through == panel["ts"].max()


def test_backfill_leaves_the_alias_and_forecasts_with_its_own_model(client: MlflowClient) -> None:
    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")  # trained through 2019-12
    past = promote(client, panel[panel["ts"] <= "2018-12-01"], "naive")
    assert past.decision == "backfill" and not past.promoted
    assert past.forecaster.name == "naive" and past.version == "2"
    assert str(tracking.champion_version(client, "sales").version) == "1"


def test_the_alias_moves_only_from_where_the_night_found_it(client: MlflowClient) -> None:
    """A night moves `champion` only if no other run (or person) moved it since the night read
    it: a backfill must not move it back past a newer night's model."""
    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")  # v1, champion
    promote(client, panel, "naive", claimed_mase=1e9)  # v2, kept: a night that read v1 and lost
    promote(client, panel, "naive", claimed_mase=0.0)  # v3, promoted by another run
    assert tracking.set_champion(client, "sales", "2", replaces="1") == "3"  # found v3: stays
    assert str(tracking.champion_version(client, "sales").version) == "3"
    assert tracking.set_champion(client, "sales", "3", replaces="1") == "3"  # a retry of v3's own move
    assert tracking.set_champion(client, "sales", "2", replaces="3") == "2"  # unchanged since read: moves
    assert str(tracking.champion_version(client, "sales").version) == "2"
    client.delete_registered_model_alias("sales-forecaster", "champion")  # taken off by hand
    assert tracking.set_champion(client, "sales", "3", replaces="2") is None
    assert tracking.champion_version(client, "sales") is None


def test_registered_model_loads_back_with_the_same_forecast(client: MlflowClient) -> None:
    panel = seasonal_panel()
    promotion = promote(client, panel, "lstm")
    loaded = tracking.load_champion(client, "sales")
    assert loaded is not None and loaded.forecaster.name == "lstm"
    assert loaded.quantiles == pytest.approx(promotion.quantiles)
    expected = promotion.forecaster.predict(panel)
    pd.testing.assert_frame_equal(loaded.forecaster.predict(panel), expected, rtol=1e-6)
    version = client.get_model_version("sales-forecaster", loaded.version)
    assert version.tags["interval_method"] == "split-conformal, |residual| / MASE scale, per step, pooled across series"


def test_a_baseline_champion_is_logged_as_code_and_loads_in_mlflows_own_loader(
        client: MlflowClient, caplog: pytest.LogCaptureFixture) -> None:
    """Logged as a Python object, the pyfunc was cloudpickled (MLflow warned that loading it
    runs what it unpickles); as code, MLflow runs forecasting/pyfunc_model.py instead."""
    import mlflow

    panel = seasonal_panel()
    with caplog.at_level("WARNING", logger="mlflow"):
        promotion = promote(client, panel, "seasonal_naive")
    assert not [r for r in caplog.records if "CloudPickle" in r.getMessage()]
    artifacts = Path(mlflow.artifacts.download_artifacts(
        client.get_model_version_download_uri("sales-forecaster", "1")))
    assert not list(artifacts.rglob("python_model.pkl")) and list(artifacts.rglob("pyfunc_model.py"))
    model = mlflow.pyfunc.load_model("models:/sales-forecaster/1")
    points = ["series_id", "step", "ts", "value"]
    pd.testing.assert_frame_equal(model.predict(panel)[points], promotion.forecaster.predict(panel))
    # rows in any order: each series' last row was taken for its last time point (a forecast
    # dated from a random month of its history)
    shuffled = panel.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(model.predict(shuffled)[points], promotion.forecaster.predict(panel))
    # A version registered before holds a pickle that names forecasting.tracking.ForecasterPyfunc.
    import pickle

    named = pickle.loads(b"cforecasting.tracking\nForecasterPyfunc\n.")
    assert issubclass(named, mlflow.pyfunc.PythonModel)


def test_registering_prints_none_of_the_warnings_that_do_not_apply(client: MlflowClient) -> None:
    """torch.export on nn.RNN warned that `_flat_weights` were 'assigned during export' (views
    of the saved parameters), and MLflow hinted at integer columns that may go missing (a
    forecast's `step` never does): at every registration, to every user."""
    import warnings

    panel = seasonal_panel()
    for name in ("rnn", "seasonal_naive"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            promote(client, panel, name)
        said = [str(w.message) for w in caught]
        assert not [m for m in said if "_flat_weights" in m or "Inferred schema contains integer" in m], said


def test_a_registration_retried_after_it_failed_past_registering_leaves_a_loadable_version(
        client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version was registered, then tagging it failed (a locked store, a timeout): the
    retry finds the version and must still tag it, or the alias could point at a version that
    no later night or predict can load."""
    panel = seasonal_panel()
    uri = Settings().mlflow_tracking_uri
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, CONFIG.name), name="r", tags={})
    fitted = pipeline.fit_final(CONFIG, panel, "seasonal_naive")
    tag = MlflowClient.set_model_version_tag

    def locked_once(self: MlflowClient, *args: object, **kwargs: object) -> None:
        monkeypatch.setattr(MlflowClient, "set_model_version_tag", tag)
        raise tracking.MlflowException("(sqlite3.OperationalError) database is locked",
                                       error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", locked_once)
    register = functools.partial(tracking_process.register, uri, CONFIG.name, fitted, run_id=run_id,
                                 example=pipeline.signature_example(panel), quantiles=[1.0] * CONFIG.horizon,
                                 level=CONFIG.interval_level, trained_through=panel["ts"].max())
    with pytest.raises(tracking.MlflowException, match="database is locked"):
        register()
    assert register() == "1"  # the retry: no second version
    loaded = tracking.load_version(client, CONFIG.name, "1")
    pd.testing.assert_frame_equal(loaded.forecaster.predict(panel), fitted.predict(panel))
    assert client.get_model_version("sales-forecaster", "1").tags["model"] == "seasonal_naive"


def test_load_champion_reads_the_clients_store_not_mlflows_global_one(
        client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README loads the champion with `load_champion(client, ...)`. The files were fetched by
    "models:/name/N" through MLflow's global registry: another store's version N (a wrong
    model, no error), or none."""
    import mlflow

    panel = seasonal_panel()
    promote(client, panel, "seasonal_naive")  # v1 of this store
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    other_client = tracking.connect(Settings())  # MLflow's global URIs now name the other store
    promote(other_client, panel, "naive")  # v1 there
    assert mlflow.get_registry_uri() == other
    loaded = tracking.load_champion(client, CONFIG.name)
    assert loaded.version == "1" and loaded.forecaster.name == "seasonal_naive"


@pytest.mark.parametrize("name", ["gru", "seasonal_naive"])
def test_the_champion_in_mlflows_own_loader_forecasts_the_forecast_tables_rows(client: MlflowClient, name: str) -> None:
    """`models:/<dataset>-forecaster@champion` had two interfaces: a network's took scaled windows
    (a tensor) and gave scaled values, a baseline's took the history and gave point forecasts.
    Both now take the history and give what `forecasts` holds: value, lower, upper."""
    import mlflow

    panel = seasonal_panel()
    promotion = promote(client, panel, name)
    model = mlflow.pyfunc.load_model("models:/sales-forecaster@champion")
    expected = pipeline.forecast(promotion.forecaster, config=CONFIG, panel=panel, quantiles=promotion.quantiles,
                                 version=None, run_id=None)
    got = model.predict(panel.sample(frac=1.0, random_state=0))  # rows in any order
    assert list(got.columns) == ["series_id", "step", "ts", "value", "lower", "upper"]
    columns = ["series_id", "step", "ts", "value", "lower", "upper"]
    pd.testing.assert_frame_equal(got[columns], expected[columns].reset_index(drop=True), rtol=1e-6)
    assert (got["upper"] > got["lower"]).all()
    # The history a caller gives is validated as the pipeline's is: month-end dates given to a
    # month-start model were forecast from, and the forecast dated a month early, silently.
    month_end = panel.assign(ts=panel["ts"] + pd.offsets.MonthEnd(0))
    with pytest.raises(ValueError, match=r"dataset 'sales'.*series 'a': off_frequency at 2015-01-31") as refused:
        model.predict(month_end)
    # an MlflowException too: `mlflow models serve` answered any other error "Encountered an
    # unexpected error while evaluating the model", without this message
    assert isinstance(refused.value, mlflow.exceptions.MlflowException) and refused.value.get_http_status_code() == 400
    with pytest.raises(ValueError, match=r"series 'b': missing_timestamps at 2016-03-01"):
        model.predict(panel.drop(index=panel.index[(panel["series_id"] == "b")][14]))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['value'\]"):  # its signature
        model.predict(panel.rename(columns={"value": "sales"}))


def test_a_registered_version_loads_where_this_package_is_not_installed(client: MlflowClient, tmp_path: Path) -> None:
    """The pyfunc imports `forecasting`: logged without its code, a version loaded only where
    this package is installed, not on a serving host or another team's notebook."""
    import mlflow

    panel = seasonal_panel()
    promote(client, panel, "lstm")
    local = mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("sales-forecaster", "1"),
                                                dst_path=str(tmp_path / "model"))
    panel.to_csv(tmp_path / "history.csv", index=False)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = ("import sys\n"
            f"sys.path.append({site!r})\n"  # site-packages without its .pth files: no editable install
            "try:\n    import forecasting\nexcept ModuleNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('forecasting is importable: the test proves nothing')\n"
            "import mlflow, pandas as pd\n"
            f"history = pd.read_csv({str(tmp_path / 'history.csv')!r}, parse_dates=['ts'])\n"
            f"out = mlflow.pyfunc.load_model({local!r}).predict(history)\n"
            "import forecasting\n"
            "print(len(out), forecasting.__file__)\n")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows, origin = done.stdout.split()
    assert int(rows) == 2 * CONFIG.horizon and origin.startswith(local)


def test_a_baseline_of_a_dataset_with_covariates_forecasts_from_the_target_alone(client: MlflowClient) -> None:
    """A baseline keeps its dataset's covariates on record but reads none: its version refused a
    history without them, or (registered before, whose signature lacked them) failed on a
    KeyError once MLflow had dropped them."""
    import mlflow
    from forecasting.forecasters import make_forecaster
    from tests.forecast_fixtures import make_panel, tiny_training

    panel = make_panel(2, 40).assign(promo=1.0)
    f = make_forecaster("seasonal_naive", freq="MS", horizon=4, season_length=12, training=tiny_training(),
                        covariates=["promo"]).fit(panel)
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, "sales"), name="r", tags={})
    version = tracking.log_and_register(client, f, run_id=run_id, dataset="sales", panel=panel,
                                        quantiles=[1.0] * 4, level=0.8)
    model = mlflow.pyfunc.load_model(f"models:/sales-forecaster/{version}")
    assert model.metadata.get_input_schema().input_names() == ["series_id", "ts", "value"]
    points = ["series_id", "step", "ts", "value"]
    pd.testing.assert_frame_equal(model.predict(panel.drop(columns="promo"))[points], f.predict(panel))


def test_registering_leaves_the_logging_processs_imports_as_they_were(client: MlflowClient) -> None:
    """MLflow loads each model it logs (to check its input example): every registration left the
    model's deleted temporary code directory on sys.path and its model file in sys.modules,
    for the life of the logging process."""
    from forecasting.forecasters import make_forecaster
    from tests.forecast_fixtures import make_panel, tiny_training

    panel = make_panel(2, 40)
    f = make_forecaster("seasonal_naive", freq="MS", horizon=4, season_length=12, training=tiny_training()).fit(panel)
    path, modules = list(sys.path), set(sys.modules)
    for name in ("r1", "r2"):
        run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, "sales"), name=name, tags={})
        tracking.log_and_register(client, f, run_id=run_id, dataset="sales", panel=panel, quantiles=[1.0] * 4, level=0.8)
    assert sys.path == path
    assert not [m for m in set(sys.modules) - modules if m.startswith("code_model")]


def test_a_retried_registration_keeps_the_files_tag_of_the_version_it_finds(client: MlflowClient) -> None:
    """A version registered by the release before (a network's files under `extra_files`) and
    found again by a retry had its tag overwritten with today's place: then it never loaded."""
    from forecasting.forecasters import make_forecaster
    from tests.forecast_fixtures import make_panel, tiny_training

    panel = make_panel(2, 40)
    f = make_forecaster("naive", freq="MS", horizon=4, season_length=12, training=tiny_training()).fit(panel)
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, "sales"), name="r", tags={})
    register = functools.partial(tracking.log_and_register, client, f, run_id=run_id, dataset="sales", panel=panel,
                                 quantiles=[1.0] * 4, level=0.8)
    version = register()
    client.set_model_version_tag("sales-forecaster", version, tracking.FORECASTER_DIR_TAG, "extra_files")
    assert register() == version
    assert client.get_model_version("sales-forecaster", version).tags[tracking.FORECASTER_DIR_TAG] == "extra_files"


def test_an_ensembles_loss_curves_are_one_per_member_each_from_its_first_epoch(client: MlflowClient) -> None:
    """The members train one after another; their epochs were numbered on from the last
    member's, so MLflow drew one `train_loss` curve that fell, jumped back up and fell again."""
    from forecasting.forecasters import make_forecaster
    from tests.forecast_fixtures import make_panel, tiny_training

    f = make_forecaster("gru", freq="MS", horizon=3, season_length=12,
                        training=tiny_training(max_epochs=3, patience=10, ensemble=2)).fit(make_panel(2, 60))
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, "sales"), name="r", tags={})
    tracking.log_history(client, run_id, f.history)
    logged = client.get_run(run_id).data.metrics
    assert set(logged) == {f"member_{m}/{k}" for m in (1, 2) for k in ("train_loss", "val_loss")}
    for member in (1, 2):
        steps = [m.step for m in client.get_metric_history(run_id, f"member_{member}/train_loss")]
        assert sorted(steps) == [1, 2, 3]
    assert f.params["epochs_trained"] == 6
    one = make_forecaster("gru", freq="MS", horizon=3, season_length=12,
                          training=tiny_training(max_epochs=2, patience=10)).fit(make_panel(2, 60))
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, "sales"), name="s", tags={})
    tracking.log_history(client, run_id, one.history)
    assert set(client.get_run(run_id).data.metrics) == {"train_loss", "val_loss"}  # one network: as before


def test_metric_timestamps_are_epoch_milliseconds_whatever_the_machines_time_zone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The local wall clock, read as UTC, put every metric 11 hours after its run in Sydney."""
    import time

    monkeypatch.setenv("TZ", "Australia/Sydney")
    time.tzset()
    try:
        assert abs(tracking._now_ms() - time.time() * 1000) < 60_000
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_deleted_experiment_is_refused_naming_it_and_the_way_out(client: MlflowClient) -> None:
    """Someone deletes the dataset's experiment in the UI: MLflow refused the night's runs in
    it with "must be in the 'active' state", naming neither the dataset nor a remedy."""
    uri = Settings().mlflow_tracking_uri
    tracking_process.start_night(uri, CONFIG.name, "parent", {}, {})
    eid = client.get_experiment_by_name(CONFIG.name).experiment_id
    client.delete_experiment(eid)
    with pytest.raises(tracking_process.TrackingRefused,
                       match=rf"dataset 'sales': its MLflow experiment 'sales' \(id {eid}\) is deleted.*"
                             rf"mlflow experiments restore --experiment-id {eid}"):
        tracking_process.start_night(uri, CONFIG.name, "parent", {}, {})
    assert not tracking_process.tracking_error_may_pass(tracking_process.TrackingRefused("x"))
    client.restore_experiment(eid)
    assert tracking_process.start_night(uri, CONFIG.name, "parent", {}, {})[0] == eid


def test_registered_requirements_pin_public_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's CPU wheel is 2.13.0+cpu: pinned as such, no index but PyTorch's own has it, and
    restoring the model's environment (`mlflow models serve`) failed."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda package: "2.13.0+cpu" if package == "torch" else real(package))
    pins = tracking._requirements()
    assert "torch==2.13.0" in pins and all("+" not in pin for pin in pins)


def test_a_sqlite_store_uri_with_a_query_locks_and_stores_beside_its_own_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`?timeout=60` (SQLAlchemy's, which MLflow passes on) was taken as part of the file name:
    the migration lock, WAL and artifacts went to a stray `mlflow.db?timeout=60`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=60")
    tracking.connect(Settings())
    assert sorted(p.name for p in tmp_path.iterdir() if "?" in p.name) == []
    assert (tmp_path / "mlflow.db.lock").exists()
    assert tracking._artifact_location("sales") == (tmp_path / "mlartifacts" / "sales").resolve().as_uri()


def test_a_run_whose_logging_fails_is_left_failed_not_running_for_the_retry(
        client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried start-tracking or log-candidate makes a new run; the failed attempt's run is
    marked FAILED, not left RUNNING in the UI for good."""
    panel = seasonal_panel()
    experiment = tracking.experiment_id(client, CONFIG.name)

    def refused(*args: object, **kwargs: object) -> None:
        raise tracking.MlflowException("(sqlite3.OperationalError) database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", refused)
        with pytest.raises(tracking.MlflowException, match="database is locked"):
            tracking.start_run(client, experiment=experiment, name="parent", tags={}, params={"horizon": 6})
    parent = tracking.start_run(client, experiment=experiment, name="parent", tags={}, params={"horizon": 6})
    entry = pipeline.candidate_log(experiment=experiment, parent_run_id=parent, config=CONFIG,
                                   result=pipeline.backtest_candidate(CONFIG, panel, "naive"), panel=panel,
                                   as_of=panel["ts"].max())
    with monkeypatch.context() as patch:
        patch.setattr(tracking, "log_figure", refused)
        with pytest.raises(tracking.MlflowException, match="database is locked"):
            tracking.write_candidate_log(client, entry)
    tracking.write_candidate_log(client, entry)
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    statuses = sorted((run.info.run_name, run.info.status) for run in runs)
    assert statuses == sorted([(entry.run_name, "FAILED"), (entry.run_name, "FINISHED"),
                               ("parent", "FAILED"), ("parent", "RUNNING")])


def test_the_nights_review_retried_after_it_failed_half_way_lists_each_model_once(
        client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """finish-tracking retried after its comparison table was logged (the figure failed) ends the
    same parent run with the table as it was: MLflow's log_table appends to a table of that name."""
    panel = seasonal_panel()
    experiment = tracking.experiment_id(client, CONFIG.name)
    parent = tracking.start_run(client, experiment=experiment, name="parent", tags={}, params={})
    comparison = pipeline.compare([pipeline.backtest_candidate(CONFIG, panel, name)
                                   for name in ("naive", "seasonal_naive")], dataset=CONFIG.name)
    fitted = pipeline.fit_final(CONFIG, panel, "seasonal_naive")
    rows = pipeline.forecast(fitted, config=CONFIG, panel=panel, quantiles=pipeline.calibrate(CONFIG, panel, comparison),
                             version=None, run_id=None)
    entry = pipeline.night_log(parent, config=CONFIG, comparison=comparison, panel=panel, forecast_rows=rows,
                               metrics={"forecast_rows": float(len(rows))}, tags={"champion": "seasonal_naive"})

    def refused(*args: object, **kwargs: object) -> None:
        raise tracking.MlflowException("(sqlite3.OperationalError) database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "log_figure", refused)
        with pytest.raises(tracking.MlflowException, match="database is locked"):
            tracking.write_night_log(client, entry)
    tracking.write_night_log(client, entry)  # the retry

    table = client.load_table(experiment, artifact_file="comparison.json", run_ids=[parent])
    assert sorted(table["model"]) == ["naive", "seasonal_naive"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent)} >= {"comparison.csv", "comparison.json", "forecast.png"}


def test_unreachable_tracking_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = Settings(mlflow_tracking_uri="http://user:s3cr3t-SENTINEL@127.0.0.1:9/")
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.connect(settings)
    assert "127.0.0.1:9" in str(caught.value) and "s3cr3t-SENTINEL" not in str(caught.value)


def test_an_unreachable_database_store_fails_without_mlflows_own_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow retries creating a SQL store's engine for 101 s (sleeps of 0.1 s to 51 s), inside
    each of the task's attempts: a night failed after ~7 minutes. Its retry loop must not run."""
    import mlflow.store.db.utils as mlflow_db

    class RetryRan(BaseException):  # not an Exception: nothing on the way catches it
        pass

    def no_sleep(seconds: float) -> None:
        raise RetryRan(f"MLflow's engine retry ran (sleep {seconds} s)")

    monkeypatch.setattr(mlflow_db.time, "sleep", no_sleep)
    settings = Settings(mlflow_tracking_uri="postgresql+psycopg://user:s3cr3t-SENTINEL@127.0.0.1:1/mlflow")
    with pytest.raises(tracking.TrackingError, match="is not reachable") as caught:  # retried by the flow
        tracking.connect(settings)
    assert "127.0.0.1:1" in str(caught.value) and "s3cr3t-SENTINEL" not in str(caught.value)


class Forbidden(http.server.BaseHTTPRequestHandler):
    """What an auth proxy in front of MLflow answers a wrong password: 403, not MLflow's JSON."""

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"Forbidden")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_a_tracking_server_that_refuses_is_a_clear_error_that_is_not_retried() -> None:
    from flows.nightly import is_transient

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings(mlflow_tracking_uri=f"http://user:s3cr3t-SENTINEL@127.0.0.1:{server.server_port}/")
        with pytest.raises(tracking.TrackingRefused) as caught:
            tracking.connect(settings)
    finally:
        server.shutdown()
    message = str(caught.value)
    assert f"127.0.0.1:{server.server_port}" in message and "403" in message and "s3cr3t-SENTINEL" not in message
    assert not is_transient(None, None, Failed(caught.value))


def test_registering_a_baseline_forecasts_only_the_signature_examples_series(
        client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registration must not forecast the whole panel (at 1,000 series it cost half the night)."""
    t = np.arange(60)
    panel = pd.concat([pd.DataFrame({"series_id": f"s{i:02d}", "ts": pd.date_range("2015-01-01", periods=60, freq="MS"),
                                     "value": 100.0 + i + 10 * np.sin(2 * np.pi * t / 12)}) for i in range(30)],
                      ignore_index=True)
    fitted = pipeline.fit_final(CONFIG, panel, "seasonal_naive")
    seen: list[int] = []
    predict = type(fitted).predict
    monkeypatch.setattr(type(fitted), "predict", lambda self, frame: seen.append(frame["series_id"].nunique())
                        or predict(self, frame))
    run_id = tracking.start_run(client, experiment=tracking.experiment_id(client, CONFIG.name), name="r", tags={})
    version = tracking.log_and_register(client, fitted, run_id=run_id, dataset=CONFIG.name, panel=panel,
                                        quantiles=[1.0] * CONFIG.horizon, level=CONFIG.interval_level)
    assert seen and max(seen) <= 2, seen
    loaded = tracking.load_version(client, CONFIG.name, version)
    pd.testing.assert_frame_equal(loaded.forecaster.predict(panel), predict(fitted, panel))


def test_warm_model_logging_fills_mlflows_package_map_before_registration() -> None:
    """In a fresh process (other tests may have filled it here): empty before, filled after.

    Fails when MLflow renames the cache, i.e. when the warm-up would have quietly stopped.
    """
    code = ("from mlflow.utils import requirements_utils as r\n"
            "from forecasting import tracking\n"
            "assert r._MODULES_TO_PACKAGES is None\n"
            "tracking.warm_model_logging()\n"
            "print('torch' in r._MODULES_TO_PACKAGES['torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_a_failing_warm_up_only_costs_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.utils import requirements_utils

    def broken() -> None:
        raise OSError("unreadable dist-info")

    monkeypatch.setattr(requirements_utils, "_init_modules_to_packages_map", broken)
    tracking.warm_model_logging()  # no error: registration will scan as before

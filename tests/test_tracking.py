"""MLflow registry and promotion against a real MLflow store (no Prefect, no database)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from forecasting import pipeline, tracking, tracking_process
from forecasting.config import Settings
from tests.flow_fixtures import tiny_config

CONFIG = tiny_config()


def seasonal_panel() -> pd.DataFrame:
    t = np.arange(60)
    frames = [pd.DataFrame({"series_id": sid, "ts": pd.date_range("2015-01-01", periods=60, freq="MS"),
                            "value": 100.0 * (i + 1) + 10 * np.sin(2 * np.pi * t / 12)})
              for i, sid in enumerate(["a", "b"])]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracking.connect(Settings())


def promote(client: MlflowClient, panel: pd.DataFrame, name: str, *, claimed_mase: float | None = None) -> pipeline.Promotion:
    """Backtest `name`, optionally pretend its MASE was `claimed_mase`, register it and decide,
    as the nightly flow does (its logging process's jobs called here)."""
    uri = Settings().mlflow_tracking_uri
    experiment, parent = tracking_process.start_night(uri, CONFIG.name, "parent", {}, {})
    result = pipeline.backtest_candidate(CONFIG, panel, name)
    comparison = pipeline.compare([result])
    if claimed_mase is not None:
        comparison.scores.loc[comparison.scores["series_id"].isna(), "mase"] = claimed_mase
    run_id = tracking.write_candidate_log(client, pipeline.candidate_log(
        experiment=experiment, parent_run_id=parent, config=CONFIG, result=result, panel=panel,
        as_of=panel["ts"].max()))
    fitted = pipeline.fit_final(CONFIG, panel, name)
    quantiles = pipeline.calibrate(CONFIG, panel, comparison)
    current = tracking_process.current_champion(uri, CONFIG.name)
    version = tracking_process.register(uri, CONFIG.name, fitted, run_id=run_id, example=pipeline.signature_example(panel),
                                        quantiles=quantiles, level=CONFIG.interval_level,
                                        trained_through=panel["ts"].max())
    decision = pipeline.decide(config=CONFIG, panel=panel, comparison=comparison, fitted=fitted,
                               quantiles=quantiles, current=current)
    promotion = decision.promotion(version, run_id)
    if promotion.promoted:
        tracking_process.set_champion(uri, CONFIG.name, promotion.new_version)
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


def test_unreachable_tracking_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = Settings(mlflow_tracking_uri="http://user:s3cr3t-SENTINEL@127.0.0.1:9/")
    with pytest.raises(tracking.TrackingError) as caught:
        tracking.connect(settings)
    assert "127.0.0.1:9" in str(caught.value) and "s3cr3t-SENTINEL" not in str(caught.value)


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
    version = tracking.log_and_register(client, fitted, run_id=run_id, dataset=CONFIG.name, panel=panel)
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

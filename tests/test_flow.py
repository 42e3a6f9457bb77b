"""The nightly flow end to end under a real Prefect API, real MLflow and real databases."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pandas as pd
import pytest
import requests
import sqlalchemy as sa
import torch
from mlflow.tracking import MlflowClient

from flows.nightly import backfill, nightly, predict
from forecasting import db
from forecasting.train import effective_precision, resolve_device
from forecasting.validate import ValidationFailed
from tests.flow_fixtures import SERIES, Failed, load_sales, synthetic_sales, tiny_config

pytestmark = pytest.mark.usefixtures("prefect")


def forecasts(engine: sa.Engine, **kwargs: object) -> pd.DataFrame:
    with engine.connect() as conn:
        return db.read_forecasts(conn, dataset="sales", **kwargs)


def test_run_rerun_predict_and_tracking(engine: sa.Engine, env: dict[str, str]) -> None:
    load_sales(engine)
    config = tiny_config()
    first = nightly(config=config)
    rows = forecasts(engine)
    as_of = pd.Timestamp("2019-12-01")
    assert first["as_of"] == str(as_of)
    assert len(rows) == len(SERIES) * config.horizon == first["forecast_rows"]
    assert (pd.to_datetime(rows["ts"]) > as_of).all()
    expected_ts = [as_of + pd.DateOffset(months=k) for k in range(1, config.horizon + 1)]
    assert sorted(pd.to_datetime(rows["ts"]).unique()) == expected_ts
    assert rows["model"].eq(first["champion"]).all()

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sales")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["parent_run_id"]]
    assert len(parents) == 1 and parents[0].data.tags["dataset"] == "sales"
    assert parents[0].info.run_name == "sales 2019-12-01 nightly"
    assert sorted(r.data.tags["model"] for r in children) == sorted(config.candidates)
    for child in children:
        assert {"mae", "rmse", "smape", "mase"} <= set(child.data.metrics)
    for child in children:  # what a reviewer opens in the UI: the backtest against the actuals
        assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["forecast_vs_actual.png"]
    parent_artifacts = {a.path: a.file_size for a in client.list_artifacts(first["parent_run_id"])}
    assert {"comparison.csv", "forecast.png"} <= set(parent_artifacts)
    assert parent_artifacts["forecast.png"] > 10_000  # a rendered figure, not an empty file
    lstm = next(r for r in children if r.data.tags["model"] == "lstm")
    # training.precision defaults to auto; the run says what that came to on this machine
    assert lstm.data.params["precision"] == "auto"
    assert lstm.data.params["precision_applied"] == effective_precision("auto", resolve_device("auto"))
    # and, beside its fit's seconds, the torch threads it trained on (at most the process's)
    assert 1 <= lstm.data.metrics["threads_trained"] <= torch.get_num_threads()
    for loss in ("train_loss", "val_loss"):  # tiny_config: max_epochs 2, one member; step = epoch
        history = client.get_metric_history(lstm.info.run_id, loss)
        assert sorted(m.step for m in history) == [1, 2], loss
    champion = client.get_model_version_by_alias("sales-forecaster", "champion")
    assert str(champion.version) == first["model_version"]
    assert rows["model_version"].eq(str(champion.version)).all()
    assert rows["mlflow_run_id"].eq(champion.run_id).all()

    # A rerun of the same as_of replaces rows: same count, same values, no duplicates.
    second = nightly(config=config)
    again = forecasts(engine)
    assert len(again) == len(rows)
    pd.testing.assert_series_equal(again["value"], rows["value"])
    assert second["as_of"] == first["as_of"]

    # predict: the registered champion, no training, the same rows as the run wrote.
    champion = str(client.get_model_version_by_alias("sales-forecaster", "champion").version)
    # as for a version the alias was moved to by hand: predict marks what it serves, so a
    # backfill leaves its rows after the alias moves on
    client.delete_model_version_tag("sales-forecaster", champion, "served_as_champion")
    predicted = predict(config=config)
    after_predict = forecasts(engine)
    assert predicted["forecast_rows"] == len(rows)
    assert predicted["model_version"] == champion
    assert client.get_model_version("sales-forecaster", champion).tags["served_as_champion"] == "true"
    same = ["series_id", "as_of", "ts", "step", "model", "model_version", "mlflow_run_id"]
    pd.testing.assert_frame_equal(after_predict[same], again[same])
    for column in ("value", "lower", "upper"):
        pd.testing.assert_series_equal(after_predict[column], again[column], check_exact=False, rtol=1e-5)
    assert (after_predict["lower"] <= after_predict["value"]).all()
    assert (after_predict["value"] <= after_predict["upper"]).all()

    # The champion's intervals were calibrated at the config's level: not at another one.
    with pytest.raises(ValueError, match=r"intervals are calibrated at level 0\.8, the config now asks 0\.95; "
                                         r"run `forecasting run`"):
        predict(config=config.model_copy(update={"interval_level": 0.95}))
    pd.testing.assert_frame_equal(forecasts(engine), after_predict)


def test_past_as_of_uses_no_later_data(engine: sa.Engine, env: dict[str, str]) -> None:
    load_sales(engine)
    config = tiny_config()
    as_of = "2018-12-01"
    latest = nightly(config=config)  # tonight's champion has learnt from data after as_of
    past = nightly(config=config, as_of=as_of)
    assert past["decision"] == "backfill" and past["model_version"] != latest["model_version"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("sales-forecaster", "champion").version) == latest["model_version"]
    with pytest.raises(ValueError, match="after as_of 2018-12-01 00:00:00; a forecast for that date would use later data"):
        predict(config=config, as_of=as_of)
    before = forecasts(engine, as_of=pd.Timestamp(as_of))
    assert len(before) == len(SERIES) * config.horizon
    assert (pd.to_datetime(before["ts"]) > pd.Timestamp(as_of)).all()

    # Change every value after as_of; the forecast for as_of must not move.
    changed = synthetic_sales()
    later = pd.to_datetime(changed["month"]) > pd.Timestamp(as_of)
    changed.loc[later, "turnover"] *= 10
    load_sales(engine, changed)
    nightly(config=config, as_of=as_of)
    after = forecasts(engine, as_of=pd.Timestamp(as_of))
    pd.testing.assert_series_equal(after["value"], before["value"])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_backfill_never_moves_the_alias(engine: sa.Engine, env: dict[str, str]) -> None:
    """Not even for nights after the champion's data: production's schedule may have run later
    nights whose champion was kept, so its data's end says nothing about what production saw."""
    load_sales(engine)
    config = tiny_config()
    first = nightly(config=config, as_of="2019-06-01")
    nights = backfill(config=config, start="2019-07-01", end="2019-08-01")
    assert [n["decision"] for n in nights] == ["backfill", "backfill"]
    assert [n["model_version"] for n in nights] == ["2", "3"]  # each forecast with its own model
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("sales-forecaster", "champion").version) == first["model_version"]


def test_a_backfill_leaves_the_nights_whose_forecast_the_champion_made(engine: sa.Engine, env: dict[str, str]) -> None:
    """A backfill over dates production had run replaced their forecasts with its own models:
    current_forecasts then showed a version the `champion` alias does not point at. Only the
    current champion's nights were left alone; an earlier champion's (2019-06-01, v1, before
    the alias moved on to v2) were replaced, rewriting what production had served."""
    load_sales(engine)
    config = tiny_config()
    first = nightly(config=config, as_of="2019-06-01")
    second = nightly(config=config, as_of="2019-07-01")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    champion = str(client.get_model_version_by_alias("sales-forecaster", "champion").version)
    assert second["model_version"] == champion != first["model_version"]  # the alias moved on
    before = forecasts(engine)
    production = sorted(pd.to_datetime(before.loc[before["model_version"].isin([first["model_version"], champion]),
                                                  "as_of"]).unique())
    nights = backfill(config=config, start="2019-05-01", end="2019-07-01")
    ran = [pd.Timestamp(n["as_of"]) for n in nights]
    assert production == [pd.Timestamp("2019-06-01"), pd.Timestamp("2019-07-01")]
    assert ran == [pd.Timestamp("2019-05-01")]
    after = forecasts(engine)
    for as_of in production:
        pd.testing.assert_frame_equal(after[after["as_of"] == as_of].reset_index(drop=True),
                                      before[before["as_of"] == as_of].reset_index(drop=True))
    with engine.connect() as conn:
        current = conn.execute(sa.text("SELECT DISTINCT model_version FROM current_forecasts")).scalars().all()
    assert current == [champion]
    with pytest.raises(ValueError, match=r"every date from '2019-06-01' to '2019-07-01' holds a champion's forecast"):
        backfill(config=config, start="2019-06-01", end="2019-07-01")


def alias_taken_off_before_the_write(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """During the next night, just before its write, an ML engineer takes `champion` off by
    hand (another run beside the schedule would move it); the registry's client."""
    import flows.nightly as flows_nightly

    # Both URIs named: MLflow's registry URI would otherwise default to a global that another
    # test, calling the logging jobs in this process, may have set to its own store.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    write = flows_nightly.write_night

    def the_alias_is_taken_off_then_write(*args: object) -> object:
        client.delete_registered_model_alias("sales-forecaster", "champion")
        return write(*args)

    monkeypatch.setattr(flows_nightly, "write_night", the_alias_is_taken_off_then_write)
    return client


def stored(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    with engine.connect() as conn:
        scores = pd.read_sql(sa.text("SELECT * FROM model_scores ORDER BY model, series_key"), conn)
    return forecasts(engine), scores


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_kept_night_whose_alias_was_moved_meanwhile_is_superseded(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A night that keeps v1 forecasts with v1; if the alias leaves v1 before the night writes,
    the night says so, as a promoting night does, and writes nothing: v1 is no longer the
    champion, so its forecast under no alias (or another's) would mislead."""
    from forecasting import pipeline

    load_sales(engine)
    config = tiny_config()
    nightly(config=config)  # v1, champion
    before = stored(engine)
    # v1 unbeatable and never the same as tonight's winner: the night keeps it
    monkeypatch.setattr(pipeline, "same_settings", lambda forecaster, config: False)
    monkeypatch.setattr(pipeline, "rescore_current", lambda *args: {"mae": 0.0, "rmse": 0.0, "smape": 0.0, "mase": 0.0})
    client = alias_taken_off_before_the_write(env, monkeypatch)
    second = nightly(config=config)
    assert second["decision"] == "superseded" and second["model_version"] == "1"
    assert (second["forecast_rows"], second["score_rows"]) == (0, 0)
    assert "the alias was moved from v1 to no version during this night" in \
        client.get_run(second["parent_run_id"]).data.tags["promotion.reason"]
    after = stored(engine)
    pd.testing.assert_frame_equal(after[0], before[0])
    pd.testing.assert_frame_equal(after[1], before[1])


# On SQLite only: what this tests is MLflow's alias (two nights a backend); writes on PostgreSQL
# are covered by the other flow tests.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_night_whose_alias_was_moved_meanwhile_leaves_it_there(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The alias changes while this night runs (here an ML engineer takes it off by hand; a
    run beside the schedule would move it): the alias stays as it was left, the night writes
    nothing and says so. (tests/test_tracking.py moves it to another version.)"""
    load_sales(engine)
    config = tiny_config()
    nightly(config=config)  # v1, champion
    before = stored(engine)
    client = alias_taken_off_before_the_write(env, monkeypatch)
    second = nightly(config=config)
    assert second["decision"] == "superseded" and second["model_version"] == "2"
    assert (second["forecast_rows"], second["score_rows"]) == (0, 0)
    assert client.get_registered_model("sales-forecaster").aliases == {}
    after = stored(engine)
    pd.testing.assert_frame_equal(after[0], before[0])
    pd.testing.assert_frame_equal(after[1], before[1])
    parent = client.get_run(second["parent_run_id"])
    assert parent.data.tags["promotion.decision"] == "superseded"
    assert "the alias was moved from v1 to no version during this night" in parent.data.tags["promotion.reason"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_champion_registered_by_hand_is_refused_by_predict_and_replaced_by_the_next_night(
        engine: sa.Engine, env: dict[str, str]) -> None:
    """An ML engineer points `champion` at a version this pipeline did not register (here one
    made by hand from v1's files, without the pipeline's tags). Loading it used to fail as a
    retried TrackingError, after every candidate had trained, on every night from then on."""
    from forecasting.tracking_process import UnusableChampion

    load_sales(engine)
    config = tiny_config()
    nightly(config=config)  # v1, champion
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    v1 = client.get_model_version("sales-forecaster", "1")
    by_hand = client.create_model_version("sales-forecaster", v1.source, run_id=v1.run_id)
    client.set_registered_model_alias("sales-forecaster", "champion", by_hand.version)
    with pytest.raises(UnusableChampion, match="dataset 'sales': version 2 of 'sales-forecaster' has no "
                       "'forecaster_dir' tag.*point the alias 'champion' at a version this pipeline registered"):
        predict(config=config)
    night = nightly(config=config)
    assert night["decision"] == "promoted" and night["model_version"] == "3"
    assert str(client.get_registered_model("sales-forecaster").aliases["champion"]) == "3"
    reason = client.get_run(night["parent_run_id"]).data.tags["promotion.reason"]
    assert reason.startswith("current champion v2 cannot be used: dataset 'sales': version 2 of ")
    assert forecasts(engine)["model_version"].eq("3").all()


def test_validation_failure_fails_the_flow_with_its_message(engine: sa.Engine, env: dict[str, str]) -> None:
    frame = synthetic_sales()
    frame = frame[~((frame["series_id"] == "s2") & (frame["month"] == pd.Timestamp("2017-03-01").date()))]
    load_sales(engine, frame)
    with pytest.raises(ValidationFailed, match="series 's2': missing_timestamps at 2017-03-01"):
        nightly(config=tiny_config())
    assert forecasts(engine).empty


TRANSIENT_CHECK = """
import pickle, sys
import flows.nightly as nightly
print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'matplotlib', 'requests'}))

class Failed:  # a task's state whose result is the error
    def __init__(self, error): self.error = error
    def result(self): raise self.error

print(nightly.is_transient(None, None, Failed(ValueError("bad series"))))
# How an HTTP error of MLflow's client reaches this process: pickled by the logging process.
for error in pickle.loads(sys.stdin.buffer.read()):
    print(nightly.is_transient(None, None, Failed(error)))
"""


def test_flow_process_imports_neither_mlflow_matplotlib_nor_requests_yet_retries_http_failures() -> None:
    """mlflow and matplotlib load in the logging process (forecasting.tracking_process), requests
    (0.1 s of every run's start) only when an HTTP error of that process is unpickled here; such
    an error is still retried when it is a connection failure or a timeout, and only then."""
    errors = [requests.exceptions.ConnectionError("connection refused"),
              requests.exceptions.ReadTimeout("read timed out"),
              requests.exceptions.HTTPError("400 Client Error: Bad Request")]
    out = subprocess.run([sys.executable, "-c", TRANSIENT_CHECK], input=pickle.dumps(errors),
                         capture_output=True, check=True)
    assert out.stdout.decode().split() == ["[]", "False", "True", "True", "False"]


@pytest.mark.parametrize("message, code, transient", [
    ("API request to http://mlflow:5000/api/2.0/mlflow/runs/create failed with exception "
     "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded", "INTERNAL_ERROR", True),
    ("API request to http://mlflow:5000/api/2.0/mlflow/runs/create failed with timeout exception "
     "Read timed out.", "INTERNAL_ERROR", True),
    ("API request to http://mlflow:5000/api/2.0/mlflow/runs/create failed with exception "
     "HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/create "
     "(Caused by ResponseError('too many 502 error responses'))", "INTERNAL_ERROR", True),
    ("(sqlite3.OperationalError) database is locked", "TEMPORARILY_UNAVAILABLE", True),
    ("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200. "
     "Response body: 'Forbidden'", "PERMISSION_DENIED", False),
    ("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200. "
     "Response body: 'Unauthorized'", "UNAUTHENTICATED", False),
    ("Registered Model with name=sales-forecaster not found", "RESOURCE_DOES_NOT_EXIST", False),
], ids=["no-connection", "timeout", "502-until-retries-ran-out", "sqlite-locked", "forbidden", "unauthorized", "not-found"])
def test_mlflow_errors_are_retried_only_when_they_may_pass(message: str, code: str, transient: bool) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from flows.nightly import is_transient

    error = MlflowException(message, error_code=getattr(databricks_pb2, code))
    assert is_transient(None, None, Failed(error)) is transient


def test_every_mlflow_call_of_a_night_is_made_by_the_logging_process(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's client and fluent API refuse to work in this process: the night and a predict
    still track everything, so none of their MLflow calls was made here."""
    import mlflow

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("an MLflow call in the flow's process")

    load_sales(engine)
    config = tiny_config()
    monkeypatch.setattr(MlflowClient, "__init__", refused)
    monkeypatch.setattr(mlflow, "start_run", refused)
    summary = nightly(config=config)
    predicted = predict(config=config)
    monkeypatch.undo()
    assert predicted["model_version"] == summary["model_version"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["promotion.decision"] == summary["decision"] == "promoted"
    assert parent.data.tags["promotion.new_version"] == summary["model_version"]
    assert "promotion_new_mase" in parent.data.metrics
    assert str(client.get_model_version_by_alias("sales-forecaster", "champion").version) == summary["model_version"]

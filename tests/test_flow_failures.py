"""The bad night: unreachable database or MLflow, a transient error, a backfill, a rerun."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import sqlalchemy as sa

from flows.nightly import backfill, nightly
from forecasting import db, pipeline, tracking, tracking_process
from tests.flow_fixtures import SERIES, load_sales, tiny_config

pytestmark = pytest.mark.usefixtures("prefect")
SENTINEL = "s3cr3t-SENTINEL"


def test_unreachable_database_fails_clearly_within_seconds(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("FORECASTING_DATABASE_URL", f"postgresql+psycopg://app:{SENTINEL}@127.0.0.1:1/prod")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    started = time.perf_counter()
    with pytest.raises(db.DatabaseError) as caught:
        nightly(config=tiny_config())
    assert time.perf_counter() - started < 60  # three retries with 1, 2, 4 s backoff
    message = str(caught.value)
    assert "127.0.0.1:1/prod is not usable" in message and SENTINEL not in message


def test_a_served_run_asking_for_cuda_where_there_is_none_fails_before_loading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI refused it; a served or API run failed only when the first network trained,
    after the baselines' backtests, with a message that named no dataset."""
    import torch

    import flows.nightly

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(flows.nightly, "load_series", loaded)
    with pytest.raises(ValueError, match=r"dataset 'sales': `training.device` is 'cuda', but torch .* sees no CUDA"):
        nightly(config=tiny_config(training={"device": "cuda"}))


def test_a_bad_config_given_as_a_mapping_gets_the_pipelines_message_not_pydantics_dump() -> None:
    """Prefect validated a mapping against DatasetConfig itself: it logged pydantic's raw error
    list, with a misleading "config.str: Input should be a valid string", and no dataset."""
    from forecasting.config import ConfigError

    raw = tiny_config().model_dump(mode="json") | {"horizon": 0}
    with pytest.raises(ConfigError, match=r"^config of dataset 'sales': key `horizon` \(value 0\): Input should be "
                                          r"greater than or equal to 1$"):
        nightly(config=raw)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # what it tests is the flow's order
def test_negative_targets_under_log_scaling_stop_the_night_before_training_unless_dropped(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """They failed as the first network trained, after the baselines' backtests, naming no
    dataset. A series the policy drops is not trained on: its negative stops nothing."""
    from forecasting.validate import ValidationFailed
    from tests.flow_fixtures import synthetic_sales

    frame = synthetic_sales()
    frame.loc[frame.index[(frame["series_id"] == "s2")][10], "turnover"] = -4.0
    load_sales(engine, frame)
    trained: list[str] = []
    real = pipeline.backtest_candidate
    monkeypatch.setattr(pipeline, "backtest_candidate", lambda config, panel, name, **kw: trained.append(name)
                        or real(config, panel, name, **kw))
    log_scaling = tiny_config(training={"max_epochs": 1, "hidden_size": 4, "scaling": "log"})
    with pytest.raises(ValidationFailed, match=r"series 's2': negative_target at 2015-11-01 00:00:00"):
        nightly(config=log_scaling)
    assert trained == []
    # s2 dropped (it also stops early): the others train, on log scaling
    cut = frame[~((frame["series_id"] == "s2") & (pd.to_datetime(frame["month"]) > "2018-06-01"))]
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM sales")
    load_sales(engine, cut)
    summary = nightly(config=log_scaling.model_copy(update={"validation": log_scaling.validation.model_copy(
        update={"policy": "drop"})}))
    assert summary["dropped_series"] == ["s2"] and trained


@pytest.mark.parametrize("flow", ["nightly", "predict"])
def test_a_bad_forecasting_workers_stops_a_served_run_before_loading(flow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI refuses it; a served or API run found it at the ETS backtest (or forecast)."""
    import flows.nightly
    from forecasting.config import SettingError

    monkeypatch.setenv("FORECASTING_WORKERS", "0")

    def loaded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(flows.nightly, "load_series", loaded)
    with pytest.raises(SettingError, match=r"`FORECASTING_WORKERS` \('0'\) must be an integer >= 1"):
        getattr(flows.nightly, flow)(config=tiny_config())


def test_unreachable_mlflow_fails_clearly_and_writes_nothing(engine: sa.Engine, env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    load_sales(engine)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SENTINEL}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    started = time.perf_counter()
    with pytest.raises(tracking.TrackingError) as caught:
        nightly(config=tiny_config())
    assert time.perf_counter() - started < 60
    assert "127.0.0.1:9" in str(caught.value) and SENTINEL not in str(caught.value)
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales").empty


def test_a_parent_run_that_cannot_start_stops_the_night_before_the_other_candidates_train(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The night's parent MLflow run starts in a background thread while the first candidates
    train; when it fails for good, the night stops at the next candidate instead of training
    them all first, and writes nothing."""
    load_sales(engine)
    config = tiny_config()
    real_backtest, trained = pipeline.backtest_candidate, []

    def counting_backtest(config, panel, name, **kwargs):
        trained.append(name)
        time.sleep(1.0)  # a candidate takes a while to train; the tiny ones here would not
        return real_backtest(config, panel, name, **kwargs)

    def refused(*args, **kwargs):
        raise PermissionError("MLflow store refused the parent run")  # not transient: no retry

    monkeypatch.setattr(pipeline, "backtest_candidate", counting_backtest)
    # The logging process's jobs run in this process, so that the failure injected here reaches them.
    monkeypatch.setattr(tracking_process, "_in_this_process", True)
    monkeypatch.setattr(tracking, "connect", refused)
    with pytest.raises(PermissionError, match="refused the parent run"):
        nightly(config=config)
    assert 1 <= len(trained) < len(config.candidates) and config.candidates[-1] not in trained
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales").empty


def test_transient_database_error_is_retried(engine: sa.Engine, env: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    load_sales(engine)
    real_load, calls = pipeline.load, []

    def flaky_load(*args, **kwargs):  # connection refused once, then the server is back
        calls.append(1)
        if len(calls) == 1:
            raise db.DatabaseError("database postgresql://x is not usable: connection refused")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load", flaky_load)
    summary = nightly(config=tiny_config())
    assert len(calls) == 2 and summary["forecast_rows"] == len(SERIES) * 6


def test_backfill_past_the_data_end_runs_each_night_once(engine: sa.Engine, env: dict[str, str]) -> None:
    """Dates after the data's last month used to train and write that month's night again."""
    load_sales(engine)  # monthly, to 2019-12-01
    summaries = backfill(config=tiny_config(), start="2019-11-01", end="2020-02-01")
    assert [s["as_of"] for s in summaries] == ["2019-11-01 00:00:00", "2019-12-01 00:00:00"]
    with pytest.raises(ValueError, match=r"no 'MS' date from '2020-03-01' to '2020-04-01' has data of its own"):
        backfill(config=tiny_config(), start="2020-03-01", end="2020-04-01")


def test_backfill_touches_only_its_dates_and_reruns_change_nothing(engine: sa.Engine, env: dict[str, str]) -> None:
    load_sales(engine)
    config = tiny_config()
    nightly(config=config, as_of="2019-06-01")
    with engine.connect() as conn:
        other_before = db.read_forecasts(conn, dataset="sales", as_of=pd.Timestamp("2019-06-01"))
    summaries = backfill(config=config, start="2019-02-01", end="2019-03-01")
    assert [s["as_of"] for s in summaries] == ["2019-02-01 00:00:00", "2019-03-01 00:00:00"]  # oldest first
    with engine.connect() as conn:
        everything = db.read_forecasts(conn, dataset="sales")
        other_after = db.read_forecasts(conn, dataset="sales", as_of=pd.Timestamp("2019-06-01"))
    assert pd.to_datetime(everything["as_of"]).value_counts().to_dict() == {
        pd.Timestamp(d): len(SERIES) * 6 for d in ("2019-02-01", "2019-03-01", "2019-06-01")}
    pd.testing.assert_frame_equal(other_after, other_before)
    for _, group in everything.groupby("as_of"):  # each as_of forecasts from its own next step
        assert (pd.to_datetime(group["ts"]) > pd.to_datetime(group["as_of"])).all()
    # Every forecast up to the data's end (2019-12) meets its actual: each night read only up to
    # its own as_of, so the backfilled nights' steps after 2019-03 used to have none until the
    # next scheduled night.
    with engine.connect() as conn:
        actuals = conn.execute(sa.text("SELECT MIN(ts), MAX(ts) FROM actuals WHERE dataset = 'sales'")).one()
        met = conn.execute(sa.text("SELECT COUNT(*) FROM forecast_accuracy WHERE dataset = 'sales'")).scalar_one()
    assert [str(pd.Timestamp(t).date()) for t in actuals] == ["2019-03-01", "2019-12-01"]
    assert met == len(everything)
    backfill(config=config, start="2019-02-01", end="2019-03-01")
    with engine.connect() as conn:
        again = db.read_forecasts(conn, dataset="sales")
    # Same rows and values; model_version and mlflow_run_id name the newest run that wrote them.
    provenance = ["created_at", "model_version", "mlflow_run_id"]
    pd.testing.assert_frame_equal(again.drop(columns=provenance), everything.drop(columns=provenance))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # SQLite: a REAL column takes text
def test_a_backfill_whose_newest_data_cannot_be_read_keeps_its_nights(engine: sa.Engine, env: dict[str, str]) -> None:
    """The actuals recorded after the nights read the data to its end: a bad value after the
    last backfilled date failed the whole backfill, every night of it already written."""
    load_sales(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE sales SET turnover = 'n/a' WHERE series_id = 's1' AND month = '2019-12-01'")
    summaries = backfill(config=tiny_config(), start="2019-02-01", end="2019-03-01")
    assert [s["as_of"] for s in summaries] == ["2019-02-01 00:00:00", "2019-03-01 00:00:00"]


def test_candidate_logging_in_the_background_is_retried_and_its_failure_fails_the_night(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates' MLflow runs are logged in a background thread while the next one trains: a
    transient failure there is retried like any tracking call, and a lasting one still fails the
    night before anything is written, with the parent run marked FAILED."""
    from mlflow.tracking import MlflowClient

    load_sales(engine)
    real_log, calls = pipeline.candidate_log, []

    def flaky_log(*args, **kwargs):
        calls.append(kwargs["result"].name)
        if calls.count("lstm") == 1 and kwargs["result"].name == "lstm":
            raise tracking.TrackingError("MLflow tracking at http://x is not reachable: timed out")
        return real_log(*args, **kwargs)

    monkeypatch.setattr(pipeline, "candidate_log", flaky_log)
    summary = nightly(config=tiny_config())
    assert calls.count("lstm") == 2 and summary["forecast_rows"] == len(SERIES) * 6

    def broken_log(*args, **kwargs):
        raise PermissionError("MLflow store refused the write")  # not transient: no retry

    monkeypatch.setattr(pipeline, "candidate_log", broken_log)
    before = forecasts_of(engine)
    with pytest.raises(PermissionError, match="refused the write"):
        nightly(config=tiny_config(), as_of="2019-11-01")
    pd.testing.assert_frame_equal(forecasts_of(engine), before)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    failed = client.search_runs([client.get_experiment_by_name("sales").experiment_id],
                                filter_string="tags.role = 'nightly' and tags.as_of = '2019-11-01 00:00:00'")
    assert [run.info.status for run in failed] == ["FAILED"]


def forecasts_of(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return db.read_forecasts(conn, dataset="sales")

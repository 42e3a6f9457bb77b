"""A sentinel password in the database URL appears nowhere: logs, Prefect logs, MLflow, errors."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows.nightly import nightly
from forecasting import tracking_process
from forecasting.config import DatasetConfig
from tests.flow_fixtures import load_sales, tiny_config

SENTINEL = "Sentinel-pw-4711"


@pytest.fixture
def fresh_logging_worker():
    """The MLflow logging process started inside the test: it inherits the test's environment
    (the URL with the password) and file descriptors 1 and 2, which capfd captures. A worker
    that an earlier test started would write to that test's capture, or to the terminal."""
    def stop() -> None:
        pool = tracking_process._pool
        if pool is not None:
            tracking_process._discard(pool)
            pool.shutdown(wait=True)

    stop()
    yield
    stop()  # the next test's worker must not write into this test's (closed) capture



@pytest.mark.usefixtures("prefect", "fresh_logging_worker")
def test_password_never_leaks_pg(pg_url: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    engine = sa.create_engine(pg_url)
    load_sales(engine)
    engine.dispose()
    # The machine's PostgreSQL trusts local connections, so any password connects.
    with_password = sa.make_url(pg_url).set(password=SENTINEL).render_as_string(hide_password=False)
    monkeypatch.setenv("FORECASTING_DATABASE_URL", with_password)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    env = {"MLFLOW_TRACKING_URI": mlflow_uri}
    caplog.set_level(logging.DEBUG)
    summary = nightly(config=tiny_config())

    # A failing run too: its error text must not carry the password either.
    missing = tiny_config(source={"table": "nope", "time_column": "month", "target_column": "turnover"})
    with pytest.raises(Exception) as failed:
        nightly(config=missing)
    assert "nope" in str(failed.value) and SENTINEL not in str(failed.value)

    assert tracking_process._pool is not None, "no logging process ran: its output went unchecked"
    out = capfd.readouterr()  # this process's and the logging process's stdout and stderr
    assert SENTINEL not in out.out + out.err
    assert SENTINEL not in caplog.text

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in client.search_runs([client.get_experiment_by_name("sales").experiment_id]):
        assert SENTINEL not in repr(run.data.params) + repr(run.data.tags)
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs()
        logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    assert logs, "the flow runs logged nothing to the Prefect API"
    assert all(SENTINEL not in log.message for log in logs)
    assert all(SENTINEL not in repr(r.parameters) for r in runs)
    assert summary["forecast_rows"] == 18


def test_hostile_identifiers_are_refused_before_any_sql() -> None:
    for hostile in ('x"; DROP TABLE t;--', "sales; DELETE FROM forecasts", "a b", "ünïcode"):
        with pytest.raises(ValueError, match="not a valid SQL identifier"):
            DatasetConfig.from_mapping({**tiny_config().model_dump(mode="json"),
                                        "source": {"table": hostile, "time_column": "month",
                                                   "target_column": "turnover"}})

"""The bad night, part two: a dropped series, runs at once, a target that refuses writes.

Each test runs on SQLite and on PostgreSQL (the `database_url` fixture), with real flow runs,
a real MLflow sqlite store and the session's Prefect API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from mlflow.tracking import MlflowClient

from flows.nightly import WARNED_STATE, nightly
from forecasting import db, pipeline, tracking
from tests import old_schemas
from tests.conftest import schema_of
from tests.flow_fixtures import SERIES, load_sales, synthetic_sales, tiny_config

pytestmark = pytest.mark.usefixtures("prefect")
HORIZON = 6  # tiny_config's


def query(engine: sa.Engine, sql: str, **params: object) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(sa.text(sql), params)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def source_rows(engine: sa.Engine) -> pd.DataFrame:
    return query(engine, "SELECT * FROM sales ORDER BY series_id, month")


# ----------------------------------------------------------------------------- 4. isolation


def test_a_dropped_series_is_named_in_the_state_and_in_model_scores(engine: sa.Engine, env: dict[str, str]) -> None:
    frame = synthetic_sales()
    frame = frame[~((frame["series_id"] == "s2") & (frame["month"] == pd.Timestamp("2017-03-01").date()))]
    load_sales(engine, frame)

    state = nightly(config=tiny_config(validation={"policy": "drop"}), return_state=True)

    assert state.is_completed() and state.name == WARNED_STATE
    assert "1 series dropped" in state.message and "s2" in state.message
    assert state.result()["dropped_series"] == ["s2"]
    written = query(engine, "SELECT DISTINCT series_id FROM forecasts WHERE dataset = 'sales'")
    assert sorted(written["series_id"]) == ["s1", "s3"]
    dropped = query(engine, "SELECT * FROM model_scores WHERE dataset = 'sales' AND status = 'dropped'")
    assert dropped["series_id"].tolist() == ["s2"]
    assert "missing_timestamps at 2017-03-01" in dropped["detail"].iloc[0]
    assert dropped["mase"].isna().all() and not dropped["is_champion"].astype(bool).any()
    scored = query(engine, "SELECT DISTINCT series_id FROM model_scores "
                           "WHERE dataset = 'sales' AND status = 'scored' AND series_id IS NOT NULL")
    assert sorted(scored["series_id"]) == ["s1", "s3"]


def test_a_whole_night_completes_without_the_warning(engine: sa.Engine, env: dict[str, str]) -> None:
    load_sales(engine)
    state = nightly(config=tiny_config(validation={"policy": "drop"}), return_state=True)
    assert state.is_completed() and state.name == "Completed"
    assert query(engine, "SELECT COUNT(*) AS n FROM model_scores WHERE status = 'dropped'")["n"].iloc[0] == 0


# ------------------------------------------------------------------ 6 + 7. runs at the same time


def write_config(path: Path, name: str) -> Path:
    raw = tiny_config(name=name, models=["rnn"]).model_dump(mode="json")  # concurrency, not accuracy
    path.write_text(yaml.safe_dump(raw))
    return path


# On SQLite only: what this tests is the MLflow sqlite store and the processes' start and exit
# (30-40 s a backend here). Two writers of one night on PostgreSQL: test_two_writers_of_one_night.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_three_flow_runs_at_once_on_one_sqlite_mlflow_store(engine: sa.Engine, env: dict[str, str],
                                                           tmp_path: Path) -> None:
    """Three worker processes start at once on a fresh MLflow sqlite store (its tables are created
    by the first of them); two of them run the same dataset and as_of. Four found the race first;
    three still race on the store's creation and on one night, for less of the suite's CPU."""
    from prefect.settings import PREFECT_API_URL

    load_sales(engine)
    # What this tests starts from no store at all, not the suite's ready-made copy (conftest).
    tracking.sqlite_store_path(env["MLFLOW_TRACKING_URI"]).unlink()
    names = ["sales", "sales", "sales_b"]
    child_env = {**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "forecasting.cli", "run",
             "--config", str(write_config(tmp_path / f"run{i}.yaml", name))],
            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, name in enumerate(names)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]

    for name, process, output in zip(names, processes, outputs):
        assert process.returncode == 0, f"{name}:\n{output[-4000:]}"
        assert "database is locked" not in output, f"{name}:\n{output[-4000:]}"
    counts = query(engine, "SELECT dataset, COUNT(*) AS n, COUNT(DISTINCT mlflow_run_id) AS runs "
                           "FROM forecasts GROUP BY dataset ORDER BY dataset")
    # The two runs of 'sales' left one set: as many rows as each other dataset, from one run.
    assert counts.to_dict("records") == [
        {"dataset": name, "n": len(SERIES) * HORIZON, "runs": 1} for name in ("sales", "sales_b")
    ]
    scores = query(engine, "SELECT dataset, COUNT(*) AS n FROM model_scores GROUP BY dataset ORDER BY dataset")
    assert scores["n"].nunique() == 1, scores
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    for name in ("sales", "sales_b"):
        assert tracking.champion_version(client, name) is not None
    runs = client.search_runs([client.get_experiment_by_name("sales").experiment_id],
                              filter_string="tags.role = 'nightly'")
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    # Each process ended through cli.exit_quickly: its flow run's last log still reached the API.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    nightly_runs = client.search_runs([client.get_experiment_by_name(name).experiment_id
                                       for name in ("sales", "sales_b")],
                                      filter_string="tags.role = 'nightly'")
    flow_run_ids = [UUID(run.data.tags["prefect.flow_run_id"]) for run in nightly_runs]
    assert len(flow_run_ids) == 3
    with get_client(sync_client=True) as prefect_client:
        for flow_run_id in flow_run_ids:
            logs = prefect_client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            assert any(log.message.startswith("done: RunSummary(") for log in logs), flow_run_id


def test_two_writers_of_one_night_leave_exactly_one_set(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first writer is held inside its transaction after its DELETE; the second starts then.
    Without a lock, PostgreSQL would keep the union of both sets (the second writer's DELETE
    cannot see the first one's uncommitted rows)."""
    load_sales(engine)
    config = tiny_config()
    as_of = pd.Timestamp("2019-12-01")
    first_inside = threading.Event()
    real_write_actuals = db.write_actuals

    def slow_write_actuals(conn: sa.Connection, **kwargs: object) -> int:
        if threading.current_thread().name == "first":
            first_inside.set()
            time.sleep(1.5)
        return real_write_actuals(conn, **kwargs)

    monkeypatch.setattr(db, "write_actuals", slow_write_actuals)

    def forecast(series: list[str], run_id: str) -> pd.DataFrame:
        ts = pd.date_range("2020-01-01", periods=HORIZON, freq="MS")
        return pd.DataFrame([{"series_id": s, "ts": t, "step": i + 1, "value": 1.0, "lower": 0.0, "upper": 2.0,
                              "model": "gru", "model_version": "1", "mlflow_run_id": run_id}
                             for s in series for i, t in enumerate(ts)])

    actuals = synthetic_sales().rename(columns={"month": "ts", "turnover": "value"})
    actuals["ts"] = pd.to_datetime(actuals["ts"])
    errors: list[BaseException] = []

    def write(series: list[str], run_id: str) -> None:
        try:
            pipeline.write(engine, config=config, as_of=as_of, forecasts=forecast(series, run_id),
                           scores=None, actuals=actuals)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    first = threading.Thread(target=write, args=(["s1", "s2"], "first"), name="first")
    second = threading.Thread(target=write, args=(["s2", "s3"], "second"), name="second")
    first.start()
    assert first_inside.wait(30)
    second.start()
    first.join(60)
    second.join(60)

    assert errors == []
    rows = query(engine, "SELECT series_id, mlflow_run_id FROM forecasts WHERE dataset = 'sales'")
    assert sorted(rows["series_id"].unique()) == ["s2", "s3"] and set(rows["mlflow_run_id"]) == {"second"}
    assert len(rows) == 2 * HORIZON


def test_actuals_recorded_after_a_backfill_wait_for_the_datasets_lock(engine: sa.Engine) -> None:
    """record_actuals (after a backfill) wrote beside a night's write of the same dataset: each
    compares what it read with what is stored, and one could delete, as withdrawn, what the
    other had just recorded. It now waits for the dataset's lock, as a night's write does."""
    load_sales(engine)
    config = tiny_config()
    actuals = synthetic_sales().rename(columns={"month": "ts", "turnover": "value"})
    actuals["ts"] = pd.to_datetime(actuals["ts"])
    forecast = pd.DataFrame([{"series_id": "s1", "ts": pd.Timestamp("2019-07-01"), "step": 1, "value": 1.0,
                              "lower": 0.0, "upper": 2.0, "model": "gru", "model_version": "1",
                              "mlflow_run_id": "r"}])
    pipeline.write(engine, config=config, as_of=pd.Timestamp("2019-06-01"), forecasts=forecast, scores=None)
    holding, release, released_at = threading.Event(), threading.Event(), []

    def hold() -> None:  # another writer of the dataset, inside its lock
        with pipeline._dataset_lock(engine, config):
            holding.set()
            release.wait(30)
            released_at.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    threading.Timer(1.0, release.set).start()
    written = pipeline.write_actuals(engine, config=config, actuals=actuals)
    done_at = time.monotonic()
    holder.join(30)
    assert released_at and done_at >= released_at[0]  # it waited for the holder
    after = actuals[actuals["ts"] > pd.Timestamp("2019-06-01")]
    assert written == len(after) > 0
    assert query(engine, "SELECT COUNT(*) AS n FROM actuals WHERE dataset = 'sales'")["n"].iloc[0] == len(after)


# --------------------------------------------------------------- 9. a target that refuses writes


@contextmanager
def role_of_schema(engine: sa.Engine, pg_url: str, name: str, *grants: str) -> Iterator[str]:
    """A login role of this test's schema (USAGE, and `grants` such as "SELECT ON ALL TABLES"):
    the URL that connects as it. Dropped afterwards."""
    url = sa.make_url(pg_url)
    role = f"{name}_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    schema = schema_of(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        for grant in grants:
            conn.exec_driver_sql(f'GRANT {grant} IN SCHEMA "{schema}" TO "{role}"')
    try:
        yield url.set(username=role).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


@pytest.fixture
def read_only_url(database_url: str, engine: sa.Engine) -> Iterator[str]:
    """The same database, reachable only for reading: SQLite opened read-only; on PostgreSQL a
    role that may SELECT but not INSERT, UPDATE or DELETE."""
    load_sales(engine)
    url = sa.make_url(database_url)
    if url.get_backend_name() == "sqlite":
        yield f"sqlite:///file:{url.database}?mode=ro&uri=true"
        return
    with role_of_schema(engine, database_url, "reader", "SELECT ON ALL TABLES") as as_reader:
        yield as_reader


def test_a_role_that_may_not_read_the_source_is_told_so_pg(pg_url: str) -> None:
    """A raw "ProgrammingError ... permission denied for table sales", naming no dataset."""
    engine = sa.create_engine(pg_url)
    load_sales(engine)
    by_query = tiny_config(source={"query": "SELECT series_id, month, turnover FROM sales", "id_column": "series_id",
                                   "time_column": "month", "target_column": "turnover"})
    with role_of_schema(engine, pg_url, "noread") as no_select:
        as_role = db.make_engine(url=no_select)
        try:
            for config, named in ((tiny_config(), "table 'sales'"), (by_query, "`source.query`")):
                with pytest.raises(db.DataError, match=f"dataset 'sales': the database role may not read {named}: "
                                                       "permission denied for table sales; GRANT SELECT"):
                    pipeline.load(as_role, config, None)
        finally:
            as_role.dispose()
    engine.dispose()


def test_init_db_by_a_role_that_may_not_create_tables_is_told_so_pg(pg_url: str, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw "ProgrammingError ... permission denied for schema" traceback before."""
    from forecasting.cli import main

    engine = sa.create_engine(pg_url)
    with role_of_schema(engine, pg_url, "nocreate") as no_create:
        monkeypatch.setenv("FORECASTING_DATABASE_URL", no_create)
        assert main(["init-db"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "was refused and created nothing: the role may not create the pipeline's tables (permission " \
               "denied for schema" in out and "GRANT CREATE ON SCHEMA" in out
        assert sa.inspect(engine).get_table_names() == []
    engine.dispose()


def test_the_write_check_needs_every_privilege_a_write_uses_pg(pg_url: str) -> None:
    """The probe upserted new keys only, a plain INSERT: a role without UPDATE passed it, and
    the night failed at its write after training, on the first restated actual or rerun. A
    role without TEMPORARY (the staging tables) was told to GRANT what it had. And no more
    than a write needs."""
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        db.init_db(conn)
    database = sa.make_url(pg_url).database
    try:
        with role_of_schema(engine, pg_url, "noupdate", "SELECT, INSERT, DELETE ON ALL TABLES") as no_update:
            target = db.make_engine(url=no_update)
            with target.connect() as conn, pytest.raises(db.OutputNotWritable, match=r"lacks a privilege .* UPDATE .* "
                                                                                     r"\(permission denied for table"):
                db.check_output_writable(conn, dataset="sales")
            target.dispose()
        # A forecast's two tables take INSERT and DELETE only (a new run_key each write): a
        # role without UPDATE on them passes, and writes a night and its rerun.
        with role_of_schema(engine, pg_url, "noupdateforecasts", "SELECT ON ALL TABLES") as writer:
            with engine.begin() as conn:
                role = sa.make_url(writer).username
                conn.exec_driver_sql(f'GRANT INSERT, DELETE ON forecast_runs, forecast_steps TO "{role}"')
                conn.exec_driver_sql(f'GRANT INSERT, UPDATE, DELETE ON model_scores, actuals TO "{role}"')
            target = db.make_engine(url=writer)
            with target.connect() as conn:
                db.check_output_writable(conn, dataset="sales")
            forecasts = pd.DataFrame({"series_id": ["a", "a"], "ts": pd.date_range("2021-01-01", periods=2, freq="MS"),
                                      "step": [1, 2], "value": [1.0, 2.0], "model": "gru"})
            for _ in range(2):
                with target.begin() as conn:
                    db.write_run(conn, dataset="sales", as_of=pd.Timestamp("2020-12-01"), forecasts=forecasts,
                                 scores=None)
            target.dispose()
        with role_of_schema(engine, pg_url, "notemp", "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES") as no_temp:
            with engine.begin() as conn:  # this session's database only
                conn.exec_driver_sql(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
            target = db.make_engine(url=no_temp)
            with target.connect() as conn, pytest.raises(db.OutputNotWritable, match=r"TEMPORARY on the database .* "
                                                                                     r"\(permission denied to create "
                                                                                     r"temporary tables"):
                db.check_output_writable(conn, dataset="sales")
            target.dispose()
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'GRANT TEMPORARY ON DATABASE "{database}" TO PUBLIC')
        engine.dispose()


def test_a_read_only_target_fails_before_training_and_touches_nothing(
    engine: sa.Engine, env: dict[str, str], read_only_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = source_rows(engine)
    monkeypatch.setenv("FORECASTING_DATABASE_URL", read_only_url)
    trained: list[str] = []
    monkeypatch.setattr(pipeline, "backtest_candidate", lambda *a, **k: trained.append("x"))
    started = time.perf_counter()
    with pytest.raises(db.OutputNotWritable) as caught:
        nightly(config=tiny_config())
    assert time.perf_counter() - started < 30  # no retries: a read-only target stays read-only
    message = str(caught.value)
    assert "dataset 'sales'" in message and "refuse writes" in message and "Nothing was written" in message
    assert ("read-only" in message) if engine.dialect.name == "sqlite" else ("privilege" in message)
    assert trained == []
    pd.testing.assert_frame_equal(source_rows(engine), before)
    for table in ("forecasts", "model_scores", "actuals"):
        assert query(engine, f"SELECT COUNT(*) AS n FROM {table}")["n"].iloc[0] == 0


def test_a_write_refused_midway_leaves_the_previous_rows(engine: sa.Engine, database_url: str) -> None:
    """The target stops taking rows after the transaction has deleted and inserted some:
    SQLite runs out of pages, and on PostgreSQL the role loses INSERT on model_scores."""
    load_sales(engine)
    config = tiny_config()
    as_of = pd.Timestamp("2019-12-01")
    ts = pd.date_range("2020-01-01", periods=HORIZON, freq="MS")

    def night(value: float, n_series: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        series = [f"s{i:05d}" for i in range(n_series)]
        forecasts = pd.DataFrame([{"series_id": s, "ts": t, "step": k + 1, "value": value, "lower": None,
                                   "upper": None, "model": "gru", "model_version": "1", "mlflow_run_id": "r"}
                                  for s in series for k, t in enumerate(ts)])
        scores = pd.DataFrame([{"model": "gru", "series_id": s, "mase": value, "is_champion": True,
                                "status": "scored"} for s in [*series, None]])
        return forecasts, scores

    forecasts, scores = night(1.0, 3)
    pipeline.write(engine, config=config, as_of=as_of, forecasts=forecasts, scores=scores)
    before = query(engine, "SELECT * FROM forecasts ORDER BY series_id, ts")
    scores_before = query(engine, "SELECT * FROM model_scores ORDER BY series_key")

    if engine.dialect.name == "sqlite":
        pages = query(engine, "PRAGMA page_count")["page_count"].iloc[0]

        def cap(dbapi_connection: object, _record: object) -> None:
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 2}")  # type: ignore[attr-defined]

        target = db.make_engine(url=database_url)
        sa.event.listen(target, "connect", cap)
        forecasts, scores = night(2.0, 3000)  # 18,000 rows: far more than two pages
        expected = "full"
    else:
        role = f"writer_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
        schema = schema_of(database_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
            conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
            conn.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
            conn.exec_driver_sql(f'REVOKE INSERT ON model_scores FROM "{role}"')
        target = db.make_engine(url=sa.make_url(database_url).set(username=role).render_as_string(hide_password=False))
        forecasts, scores = night(2.0, 3)
        expected = "privilege"
    try:
        with pytest.raises(db.OutputNotWritable, match=expected):
            pipeline.write(target, config=config, as_of=as_of, forecasts=forecasts, scores=scores)
    finally:
        target.dispose()
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
                conn.exec_driver_sql(f'DROP ROLE "{role}"')
    pd.testing.assert_frame_equal(query(engine, "SELECT * FROM forecasts ORDER BY series_id, ts"), before)
    pd.testing.assert_frame_equal(query(engine, "SELECT * FROM model_scores ORDER BY series_key"), scores_before)
    if engine.dialect.name == "sqlite":
        assert query(engine, "PRAGMA integrity_check")["integrity_check"].iloc[0] == "ok"


def test_migrating_an_older_database_adds_the_status_columns(engine: sa.Engine) -> None:
    """A database made before model_scores had status/detail gets them from init-db, once (and
    the later migrations)."""
    with engine.begin() as conn:
        db.init_db(conn)
        old_schemas.forecasts_as_a_table(conn)
        conn.exec_driver_sql("DROP VIEW IF EXISTS model_leaderboard")
        conn.exec_driver_sql("DROP TABLE model_scores")
        conn.exec_driver_sql("DROP TABLE schema_migrations")
        old = db.sql_statements(db.SQL_DIR / "schema.sql")
        create = next(s for s in old if "CREATE TABLE IF NOT EXISTS model_scores" in s)
        lines = [line for line in create.splitlines() if "status" not in line and "detail" not in line]
        conn.exec_driver_sql("\n".join(lines))
    with engine.begin() as conn:
        assert db.init_db(conn) == ["001_model_scores_status.sql", "002_forecast_runs_and_steps.sql"]
    with engine.begin() as conn:
        assert db.init_db(conn) == []
        columns = {c["name"] for c in sa.inspect(conn).get_columns("model_scores")}
    assert {"status", "detail"} <= columns


def test_load_waits_for_another_processes_write_on_sqlite_instead_of_failing(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock and commits while our load checks that the
    outputs are writable: the check waits (busy_timeout) and succeeds. A transaction that read
    before its first write would fail at once with 'database is locked' when the other commits
    (a stale WAL snapshot is not retried); seen with four flow runs starting together."""
    import sqlite3

    path = tmp_path / "forecasting.db"
    engine = db.make_engine(url=f"sqlite:///{path}")
    load_sales(engine)
    holding, released = threading.Event(), threading.Event()

    def other_writer() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO actuals (dataset, series_id, ts, value) VALUES ('other', 'x', '2000-01-01', 1.0)")
        holding.set()
        time.sleep(1.5)  # while our load reads and then wants to write
        other.execute("COMMIT")
        other.close()
        released.set()

    thread = threading.Thread(target=other_writer)
    thread.start()
    assert holding.wait(10)
    started = time.perf_counter()
    panel, as_of = pipeline.load(engine, tiny_config(), None)
    thread.join()
    assert released.is_set() and time.perf_counter() - started >= 1.0  # it waited for the lock
    assert len(panel) == len(synthetic_sales()) and as_of == panel["ts"].max()
    engine.dispose()


def test_rows_after_the_last_observed_target_set_neither_as_of_nor_history(tmp_path: Path) -> None:
    """Rows of the future (covariates known in advance, no target yet) set as_of, and policy
    `fill` carried each series' last value over them: a forecast from made-up history."""
    engine = db.make_engine(url=f"sqlite:///{tmp_path / 'forecasting.db'}")
    frame = synthetic_sales()
    last = pd.to_datetime(frame["month"]).max()
    future = frame[pd.to_datetime(frame["month"]) == last].assign(
        month=(last + pd.DateOffset(months=1)).date(), turnover=None)
    load_sales(engine, pd.concat([frame, future], ignore_index=True))
    config = tiny_config(validation={"policy": "fill"})
    panel, as_of = pipeline.load(engine, config, None)
    assert as_of == last and panel["ts"].max() == last and len(panel) == len(frame)
    assert panel["value"].notna().all()
    engine.dispose()

"""Shared fixtures: a real database per test on SQLite and on PostgreSQL, MLflow, Prefect.

PostgreSQL: one fresh database per test session (dropped at the end), one fresh schema per test
inside it. Under CI=true a PostgreSQL that cannot be reached fails the run instead of skipping,
and a session in which no PostgreSQL test passed fails too.

The suite runs in pytest-xdist workers (pyproject's addopts): each is a process with its own
session fixtures (its own PostgreSQL database and Prefect API), and the cores are split between
them for torch (below). The controller counts the PostgreSQL tests that passed, from the
workers' reports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "FORECASTING_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
_pg_passed = 0

# An xdist worker's torch threads: its share of the cores (configure_torch_threads reads
# OMP_NUM_THREADS). With every worker on all cores their threads spin-wait against each other,
# which on a busy machine made training ~10x slower (benchmarks/training_speed.py's docstring).
# Processes the tests start (flows in subprocesses, Dask workers) inherit it. The ETS baselines'
# worker processes (forecasting.baselines.workers) get the same share, or each test worker would
# spawn one per core; tests/test_baselines.py asks for 2 by name, so that path stays tested.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    _SHARE = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _SHARE)
    os.environ.setdefault("FORECASTING_WORKERS", _SHARE)

# The compiled kernels and `precision: auto`'s probe answer live in one cache directory per test
# run, shared by its workers and the processes they start: the probe measured under the suite's
# load is no answer for the user's later nights, which read ~/.cache/forecasting
# (set by the controller, before it starts the workers, which inherit it; removed at its end).
_OWN_CACHE_DIR = "FORECASTING_CACHE_DIR" not in os.environ
os.environ.setdefault("FORECASTING_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"forecasting-tests-{os.getpid()}"))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[sa.URL]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"forecasting_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        message = f"PostgreSQL at {sa.make_url(PG_ADMIN_URL).render_as_string()} unreachable: {exc.orig}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    yield sa.make_url(PG_ADMIN_URL).set(database=name)
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database of each backend; PostgreSQL gets a schema of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'forecasting.db'}"
    return pg_schema_url(request.getfixturevalue("pg_database"))


@pytest.fixture
def pg_url(pg_database: sa.URL) -> str:
    """For the tests that only PostgreSQL can run (a URL with a password, roles)."""
    return pg_schema_url(pg_database)


def pg_schema_url(base: sa.URL) -> str:
    """A fresh schema in the session's database, first on the search_path of the URL."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine.dispose()
    return base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def schema_of(url: str | sa.URL) -> str:
    """The schema that `pg_schema_url` put first on the URL's search_path."""
    options = sa.make_url(url).query.get("options", "")
    if not options.startswith("-csearch_path="):
        raise ValueError(f"url={sa.make_url(url).render_as_string()!r} names no search_path schema")
    return options.removeprefix("-csearch_path=")


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    from forecasting import db

    engine = db.make_engine(url=database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store with its tables created, for `mlflow_uri` to copy.

    MLflow creates a new store's tables by running its alembic migrations: ~1 s of CPU, which
    each of a hundred tests paid again, on a suite that keeps both cores busy. The template is
    made the way MLflow makes any store, in the rollback-journal mode it leaves a file in, so
    that the file alone holds it (no -wal beside it) and a copy is the same store. Tests of a
    store's first opening (the migration race, its lock) make theirs from nothing.
    """
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
    engine = sa.create_engine(uri)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal", path
    engine.dispose()
    return path


@pytest.fixture
def mlflow_uri(mlflow_store_template: Path, tmp_path: Path) -> str:
    """A new MLflow sqlite store in this test's tmp_path (a copy of the session's template)."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def env(database_url: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings of the product pointed at this test's database and a fresh MLflow store."""
    values = {
        "FORECASTING_DATABASE_URL": database_url,
        "MLFLOW_TRACKING_URI": mlflow_uri,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    # MLflow's global tracking and registry URIs win over the environment, and the logging
    # process's jobs, when a test calls them in this process, set them to that test's store:
    # without this, a later test's MlflowClient read another test's registry.
    import mlflow

    mlflow.set_tracking_uri(values["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(values["MLFLOW_TRACKING_URI"])
    return values


@pytest.fixture(scope="session")
def prefect() -> Iterator[None]:
    """One temporary Prefect API for every flow test of the session (starting it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Marked on the worker, read by the controller: user_properties travel with the report.
    # pg_database is in the closure of pg_url's tests; database_url[postgresql] asks for it
    # at run time, so those are known by their parameter.
    if "pg_database" in getattr(item, "fixturenames", ()) or "[postgresql" in item.nodeid:
        item.user_properties.append(("postgresql", True))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _pg_passed
    if report.when == "call" and report.passed and ("postgresql", True) in report.user_properties:
        _pg_passed += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    terminalreporter.write_line(f"postgresql tests passed: {_pg_passed}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A suite that selected database tests but ran none on PostgreSQL proves nothing about it.
    # Judged by the controller, which sees every worker's reports (a worker may run none).
    if hasattr(session.config, "workerinput"):
        return
    if _OWN_CACHE_DIR:
        shutil.rmtree(os.environ["FORECASTING_CACHE_DIR"], ignore_errors=True)
    if IN_CI and _pg_passed == 0 and session.testscollected > 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Databases as older releases left them, for the tests of init-db's migrations."""

from __future__ import annotations

import sqlalchemy as sa

# The forecasts table of schema.sql before migration 002 made it a view.
FORECASTS_TABLE = """CREATE TABLE forecasts (
    dataset VARCHAR(64) NOT NULL, series_id VARCHAR(255) NOT NULL, as_of TIMESTAMP NOT NULL,
    ts TIMESTAMP NOT NULL, step INTEGER NOT NULL CHECK (step >= 1), value DOUBLE PRECISION NOT NULL,
    lower DOUBLE PRECISION, upper DOUBLE PRECISION, model VARCHAR(64) NOT NULL, model_version VARCHAR(32),
    mlflow_run_id VARCHAR(64), created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT forecasts_key UNIQUE (dataset, series_id, as_of, ts))"""


def forecasts_as_a_table(conn: sa.Connection) -> None:
    """In a database init-db made: the forecasts table in place of forecast_runs, forecast_steps
    and the views on them, and migration 002 not applied."""
    for view in ("latest_forecasts", "current_forecasts", "forecast_accuracy", "forecasts"):
        conn.exec_driver_sql(f"DROP VIEW IF EXISTS {view}")
    conn.exec_driver_sql("DROP TABLE forecast_runs")
    conn.exec_driver_sql("DROP TABLE forecast_steps")
    conn.exec_driver_sql(FORECASTS_TABLE)
    conn.exec_driver_sql("DELETE FROM schema_migrations WHERE name = '002_forecast_runs_and_steps.sql'")

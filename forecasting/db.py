"""Database I/O: engine from Settings, apply sql/, read a dataset, upsert forecasts and scores.

Callers open connections and transactions (`with engine.begin() as conn:`); the helpers here
never commit on their own, so a caller can make several writes atomic. Table and column names
come from config and are checked against a strict identifier pattern and the reflected table;
every value is a bound parameter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from forecasting.config import DatasetConfig, Settings, check_identifier, redact_url, scrub

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
FORECASTS = "forecasts"
MODEL_SCORES = "model_scores"
ACTUALS = "actuals"
AGGREGATE_KEY = ""  # model_scores.series_key of the aggregate row (its series_id is NULL)

# SQLite has no timestamp type; store 'YYYY-MM-DD HH:MM:SS' text so that analysts can write
# `WHERE as_of = '2017-12-01 00:00:00'` and text order is time order.
_SQLITE_TIMESTAMP = sqlite.DATETIME(
    storage_format="%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d"
)
TIMESTAMP = sa.DateTime().with_variant(_SQLITE_TIMESTAMP, "sqlite")


# Errors of reaching the database (server down, refused, timed out), worth a retry; errors of
# the data or the SQL (IntegrityError, ProgrammingError) are not.
CONNECTION_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError)


class DatabaseError(RuntimeError):
    """The database cannot be used as configured; the message never holds a password."""


class DataError(ValueError):
    """The source data does not match the dataset config; names the dataset, series and value."""


def make_engine(settings: Settings | None = None, *, url: str | None = None) -> Engine:
    settings = settings or Settings()
    url = url or settings.database_url
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Fail fast when the server is down; the flow's retries give it time to come back.
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets analysts read while the nightly run writes; readers see committed rows only.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def describe(engine: Engine) -> str:
    return redact_url(engine.url.render_as_string(hide_password=False))


def connect_error(engine: Engine, exc: Exception) -> DatabaseError:
    """A DatabaseError that says which database (password masked) and why."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    reason = scrub(reason, engine.url.render_as_string(hide_password=False))
    return DatabaseError(f"database {describe(engine)} is not usable: {reason}")


def sql_statements(path: Path) -> list[str]:
    """Split a .sql file on ';' at the end of a line, dropping comment-only chunks."""
    text = path.read_text()
    statements = []
    for chunk in re.split(r";\s*$", text, flags=re.M):
        body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--"))
        if body.strip():
            statements.append(body.strip())
    return statements


def apply_sql(conn: Connection, path: Path) -> int:
    statements = sql_statements(path)
    for statement in statements:
        conn.exec_driver_sql(statement)
    return len(statements)


def init_db(conn: Connection) -> None:
    """Create the pipeline's tables and views; safe to run any number of times."""
    for name in ("schema.sql", "views.sql"):
        path = SQL_DIR / name
        if path.exists():
            apply_sql(conn, path)


def reflect_table(conn: Connection, name: str, *, dataset: str | None = None) -> sa.Table:
    check_identifier(name, key="table")
    metadata = sa.MetaData()
    overrides = []
    timestamps = {FORECASTS: ("as_of", "ts", "created_at"), MODEL_SCORES: ("as_of", "created_at"),
                  ACTUALS: ("ts", "loaded_at")}
    overrides = [sa.Column(column, TIMESTAMP, primary_key=name == ACTUALS and column == "ts")
                 for column in timestamps.get(name, ())]
    try:
        return sa.Table(name, metadata, *overrides, autoload_with=conn)
    except sa.exc.NoSuchTableError:
        where = f"dataset {dataset!r}: " if dataset else ""
        hint = " (run `forecasting init-db`)" if name in (FORECASTS, MODEL_SCORES, ACTUALS) else ""
        raise DataError(f"{where}table {name!r} does not exist{hint}") from None


# --------------------------------------------------------------------------------------- read


def read_dataset(
    conn: Connection, config: DatasetConfig, *, as_of: datetime | None = None
) -> pd.DataFrame:
    """The dataset as a long frame: series_id, ts, value, covariates (sorted, ts <= as_of).

    Only the configured columns are read. Rows after `as_of` are dropped here, before any
    check or model sees them, so a past as_of never leaks later data.
    """
    source = config.source
    wanted = [c for c in (source.id_column, source.time_column, source.target_column) if c]
    wanted += list(source.covariates)
    if source.table is not None:
        table = reflect_table(conn, source.table, dataset=config.name)
        _require_columns(config, source.table, wanted, table.columns.keys())
        query: Any = sa.select(*(table.c[c] for c in wanted))
    else:
        query = sa.text(source.query)
    result = conn.execute(query)
    frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    if source.query is not None:
        _require_columns(config, "source.query", wanted, frame.columns)
    return to_long_frame(frame, config, as_of=as_of)


def _require_columns(
    config: DatasetConfig, where: str, wanted: Iterable[str], available: Iterable[str]
) -> None:
    available = list(available)
    keys = {config.source.time_column: "source.time_column",
            config.source.target_column: "source.target_column",
            **{c: "source.covariates" for c in config.source.covariates}}
    if config.source.id_column:
        keys[config.source.id_column] = "source.id_column"
    missing = [c for c in wanted if c not in available]
    if missing:
        named = ", ".join(f"`{keys.get(c, '?')}` ({c!r})" for c in missing)
        raise DataError(
            f"dataset {config.name!r}: {named} not found in {where}; available columns: {available}"
        )


def to_long_frame(
    frame: pd.DataFrame, config: DatasetConfig, *, as_of: datetime | None = None
) -> pd.DataFrame:
    source = config.source
    out = pd.DataFrame()
    if source.id_column:
        out["series_id"] = frame[source.id_column].astype(str)
    else:
        out["series_id"] = pd.Series(config.name, index=frame.index, dtype=object)
    try:
        # Time-zone aware columns (PostgreSQL timestamptz) become naive UTC; naive ones stay.
        ts = pd.to_datetime(frame[source.time_column], utc=True).dt.tz_localize(None)
        out["ts"] = ts.astype("datetime64[ns]")
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"dataset {config.name!r}: column {source.time_column!r} (time_column) "
            f"holds values that are not timestamps: {exc}"
        ) from None
    # Sort first so that an error names the first offending row in (series, time) order.
    order = out.sort_values(["series_id", "ts"], kind="stable").index
    out, frame = out.loc[order].reset_index(drop=True), frame.loc[order].reset_index(drop=True)
    for column, role in [(source.target_column, "target_column")] + [
        (c, "covariates") for c in source.covariates
    ]:
        name = "value" if role == "target_column" else column
        out[name] = _numeric(frame[column], out["series_id"], config=config, column=column, role=role)
    if as_of is not None:
        out = out[out["ts"] <= pd.Timestamp(as_of)].reset_index(drop=True)
    return out


def _numeric(
    values: pd.Series, series_ids: pd.Series, *, config: DatasetConfig, column: str, role: str
) -> pd.Series:
    converted = pd.to_numeric(values, errors="coerce")
    bad = converted.isna() & values.notna()
    if bad.any():
        first = bad.idxmax()
        raise DataError(
            f"dataset {config.name!r}, series {series_ids[first]!r}: column {column!r} ({role}) "
            f"is not numeric, e.g. {values[first]!r}"
        )
    return converted.astype("float64")


# -------------------------------------------------------------------------------------- write


def upsert(
    conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], *, key: Sequence[str]
) -> int:
    """INSERT ... ON CONFLICT (key) DO UPDATE, batched by the driver; returns rows sent."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise DatabaseError(f"dialect {dialect!r} is not supported (use sqlite or postgresql)")
    columns = rows[0].keys()
    updates = {c: stmt.excluded[c] for c in columns if c not in key}
    stmt = stmt.on_conflict_do_update(index_elements=list(key), set_=updates)
    conn.execute(stmt, list(rows))
    return len(rows)


def write_run(
    conn: Connection,
    *,
    dataset: str,
    as_of: datetime,
    forecasts: pd.DataFrame,
    scores: pd.DataFrame | None,
    actuals: pd.DataFrame | None = None,
) -> tuple[int, int]:
    """Replace the forecasts (and scores, unless None) of one (dataset, as_of), in the caller's transaction.

    Rows of the previous run of this (dataset, as_of) that the new run does not produce (e.g. a
    series dropped since) are deleted first; then the new rows are upserted, which also settles
    a race with a concurrent writer of the same key.
    """
    forecasts_table = reflect_table(conn, FORECASTS)
    scores_table = reflect_table(conn, MODEL_SCORES)
    as_of = pd.Timestamp(as_of).to_pydatetime()
    created_at = datetime.now().replace(microsecond=0)
    if actuals is not None:
        write_actuals(conn, dataset=dataset, panel=actuals, created_at=created_at)
    tables = [forecasts_table] if scores is None else [forecasts_table, scores_table]
    for table in tables:
        conn.execute(
            sa.delete(table).where(table.c.dataset == dataset, table.c.as_of == as_of)
        )
    forecast_rows = to_records(forecasts, dataset=dataset, as_of=as_of, created_at=created_at)
    n_forecasts = upsert(
        conn, forecasts_table, forecast_rows, key=("dataset", "series_id", "as_of", "ts")
    )
    if scores is None:
        return n_forecasts, 0
    score_frame = scores.assign(
        series_key=scores["series_id"].where(scores["series_id"].notna(), AGGREGATE_KEY)
    )
    score_rows = to_records(score_frame, dataset=dataset, as_of=as_of, created_at=created_at)
    n_scores = upsert(conn, scores_table, score_rows, key=("dataset", "as_of", "model", "series_key"))
    return n_forecasts, n_scores


def write_actuals(conn: Connection, *, dataset: str, panel: pd.DataFrame, created_at: datetime) -> int:
    """Upsert the observations that can match a stored forecast: ts after its oldest as_of.

    Older observations can never join a forecast, so a nightly run writes only the recent tail
    of each series, not the whole history again.
    """
    forecasts_table = reflect_table(conn, FORECASTS)
    oldest = conn.execute(
        sa.select(sa.func.min(forecasts_table.c.as_of)).where(forecasts_table.c.dataset == dataset)
    ).scalar_one()
    if oldest is None:
        return 0
    recent = panel.loc[panel["ts"] > pd.Timestamp(oldest), ["series_id", "ts", "value"]]
    recent = recent[recent["value"].notna()]
    rows = to_records(recent, dataset=dataset, loaded_at=created_at)
    return upsert(conn, reflect_table(conn, ACTUALS), rows, key=("dataset", "series_id", "ts"))


def to_records(frame: pd.DataFrame, **constants: Any) -> list[dict[str, Any]]:
    """Plain Python values (no numpy scalars, NaN as None) for the driver."""
    frame = frame.assign(**constants)
    records = []
    for row in frame.to_dict(orient="records"):
        records.append({k: _plain(v) for k, v in row.items()})
    return records


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def read_forecasts(conn: Connection, *, dataset: str, as_of: datetime | None = None) -> pd.DataFrame:
    table = reflect_table(conn, FORECASTS)
    query = sa.select(table).where(table.c.dataset == dataset)
    if as_of is not None:
        query = query.where(table.c.as_of == pd.Timestamp(as_of).to_pydatetime())
    query = query.order_by(table.c.as_of, table.c.series_id, table.c.ts)
    result = conn.execute(query)
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

"""Database I/O: engine from Settings, apply sql/, read a dataset, upsert forecasts and scores.

Callers open connections and transactions (`with engine.begin() as conn:`); the helpers here
never commit on their own, so a caller can make several writes atomic. Table and column names
come from config and are checked against a strict identifier pattern and the reflected table;
every value is a bound parameter.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
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
FORECASTS = "forecasts"  # the analysts' view: forecast_runs joined to forecast_steps (views.sql)
FORECAST_RUNS = "forecast_runs"
FORECAST_STEPS = "forecast_steps"
MODEL_SCORES = "model_scores"
ACTUALS = "actuals"
AGGREGATE_KEY = ""  # model_scores.series_key of the aggregate row (its series_id is NULL)
OUTPUT_TABLES = (FORECAST_RUNS, FORECAST_STEPS, MODEL_SCORES, ACTUALS)  # what a night writes
OUTPUT_RELATIONS = (FORECASTS, *OUTPUT_TABLES)
# A forecast row's columns by the table that holds them: a run's provenance, a step's values.
RUN_COLUMNS = ("model", "model_version", "mlflow_run_id")
STEP_COLUMNS = ("series_id", "ts", "step", "value", "lower", "upper")

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


class OutputNotWritable(RuntimeError):
    """The output tables refuse writes: read-only database or role, no privilege, disk full.

    Not a DatabaseError on purpose: retrying cannot help, so the flow fails at once.
    """


# Why a database refuses a write, by PostgreSQL SQLSTATE and by SQLite message.
_REFUSED_SQLSTATES = {
    "42501": "the role lacks a privilege (a write needs SELECT, INSERT and DELETE on the output tables, UPDATE "
             "on model_scores and actuals, and TEMPORARY on the database for its staging tables)",
    "25006": "the transaction is read-only (default_transaction_read_only or a standby)",
    "53100": "the disk is full",
    "53400": "a configured limit was reached",
}
_REFUSED_SQLITE = {
    "readonly database": "the database file or its directory is read-only",
    "database or disk is full": "the disk (or max_page_count) is full",
}


def write_refusal(exc: BaseException) -> str | None:
    """Why the database refused a write, or None when `exc` is something else."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _REFUSED_SQLSTATES:
        return f"{_REFUSED_SQLSTATES[sqlstate]} ({str(orig).strip().splitlines()[0]})"
    text = str(orig)
    for needle, reason in _REFUSED_SQLITE.items():
        if needle in text:
            return f"{reason} ({text.strip().splitlines()[0]})"
    return None


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


@contextlib.contextmanager
def naming_connection_errors(engine: Engine) -> Iterator[None]:
    """Connection errors inside, raised as a DatabaseError that names the database with its
    password masked: their own text may hold the URL."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise connect_error(engine, exc) from None


def connect_error(engine: Engine, exc: Exception) -> DatabaseError:
    """A DatabaseError that says which database (password masked) and why."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    reason = scrub(reason, engine.url.render_as_string(hide_password=False))
    return DatabaseError(f"database {describe(engine)} is not usable: {reason}")


_ONLY_ON = re.compile(r"^\s*--\s*only on (\w+)\s*$", re.M)  # a statement of one dialect
_AFTER_VIEWS = re.compile(r"^\s*--\s*after the views\s*$", re.M)  # a migration's, run after views.sql


# A PostgreSQL dollar quote, $$ or $tag$ (a tag is an identifier without '$', any letters); not
# one that ends an identifier, which may hold '$'
_DOLLAR_QUOTE = re.compile(r"(?<![\w$])\$(?:[^\W\d]\w*)?\$")
_OUTSIDE_BODY = re.compile(r"--|'|" + _DOLLAR_QUOTE.pattern)  # what ends plain SQL text on a line
_IN_LITERAL = re.compile(r"'(?!')|''")  # inside '...': its end, or a doubled quote that is text


def _dollar_quote_open_after(line: str, open_quote: str | None) -> str | None:
    """The dollar quote ($$ or $tag$) still open at the end of `line`, given the one open at its
    start. Only the same tag closes a body, so a $$ inside a $fn$ body neither opens nor
    closes anything; outside a body a `--` comment ends what is read of the line, and a
    '...' literal on the line is skipped ('' inside it included)."""
    pos = 0
    while True:
        if open_quote is not None:
            end = line.find(open_quote, pos)
            if end == -1:
                return open_quote
            open_quote, pos = None, end + len(open_quote)
            continue
        found = _OUTSIDE_BODY.search(line, pos)
        if found is None or found.group() == "--":
            return None
        if found.group() == "'":
            close = _IN_LITERAL.finditer(line, found.end())
            pos = next((m.end() for m in close if m.group() == "'"), len(line))
            continue
        open_quote, pos = found.group(), found.end()


def sql_statements(path: Path, *, dialect: str | None = None, after_views: bool = False) -> list[str]:
    """The statements of a .sql file: split on ';' at the end of a line (outside a dollar-quoted
    body, $$ or $tag$), comment-only chunks dropped.

    A statement whose comment lines include `-- only on <dialect>` is one of that dialect's
    (kept when `dialect` is it or None); one with `-- after the views` is a migration's that
    init-db runs after views.sql (kept only when `after_views`). Those and the other `--` lines
    are read outside dollar-quoted bodies only: a body reaches the database as written.
    Not parsed: /* */ comments, and a '...' literal that spans lines (a ';' ending one of its
    lines would split it); the files in sql/ use neither.
    """
    statements, chunk, open_quote = [], [], None
    for line in path.read_text().splitlines():
        chunk.append((line, open_quote is not None))  # whether the line starts inside a body
        open_quote = _dollar_quote_open_after(line, open_quote)
        if line.rstrip().endswith(";") and open_quote is None:
            last, inside = chunk[-1]
            chunk[-1] = (last.rstrip().removesuffix(";"), inside)
            statements.append(chunk)
            chunk = []
    if open_quote is not None:  # else the rest of the file would reach the database as one statement
        raise ValueError(f"{path}: the dollar-quoted body opened by {open_quote} is never closed")
    statements.append(chunk)
    kept = []
    for statement in statements:
        comments = "\n".join(line for line, inside in statement if not inside and line.strip().startswith("--"))
        only = _ONLY_ON.findall(comments)
        unknown = sorted(set(only) - {"sqlite", "postgresql"})
        if unknown:  # a misspelt tag would leave the statement out on every database
            raise ValueError(f"{path}: `-- only on {unknown[0]}`: the dialects are sqlite and postgresql")
        if (dialect is not None and only and dialect not in only) or bool(_AFTER_VIEWS.search(comments)) != after_views:
            continue
        body = "\n".join(line for line, inside in statement if inside or not line.strip().startswith("--"))
        if body.strip():
            kept.append(body.strip())
    return kept


def apply_sql(conn: Connection, path: Path, *, after_views: bool = False) -> int:
    statements = sql_statements(path, dialect=conn.dialect.name, after_views=after_views)
    for statement in statements:
        conn.exec_driver_sql(statement)
    return len(statements)


MIGRATIONS_DIR = SQL_DIR / "migrations"


def init_db(conn: Connection) -> list[str]:
    """Create or upgrade the pipeline's tables and views; safe to run any number of times.

    schema.sql always describes the current tables, so a new database gets it whole and every
    migration is recorded as applied; a database created by an older release gets the
    migrations it has not had, in file-name order. Returns the migrations applied now.
    """
    # One transaction on SQLite too: pysqlite runs DDL outside any transaction of its own, so
    # an init-db stopped half-way left tables without their schema_migrations rows, and every
    # later init-db re-ran a migration's ALTER TABLE ("duplicate column name").
    take_write_lock(conn)
    if conn.dialect.name == "postgresql":  # two at once on a new database both created each table
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key("init-db")})
    existed = sa.inspect(conn).has_table(MODEL_SCORES)  # in every release's schema
    apply_sql(conn, SQL_DIR / "schema.sql")
    done = set(conn.execute(sa.text("SELECT name FROM schema_migrations")).scalars())
    applied = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if path.name in done:
            continue
        if existed:
            _migrate(conn, path, after_views=False)
            applied.append(path.name)
        conn.execute(sa.text("INSERT INTO schema_migrations (name) VALUES (:name)"), {"name": path.name})
    apply_views(conn)
    for name in applied:
        _migrate(conn, MIGRATIONS_DIR / name, after_views=True)
    return applied


def _migrate(conn: Connection, path: Path, *, after_views: bool) -> None:
    """The statements of a migration that run before views.sql, or after it; a DatabaseError
    that names the migration if the database refuses one (the caller's transaction then
    leaves everything as it was)."""
    try:
        apply_sql(conn, path, after_views=after_views)
    except sa.exc.DBAPIError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate == "2BP01":  # dependent objects still exist
            raise _dependents_block(exc, f"init-db must apply the migration {path.name}, which drops or "
                                    f"changes a table or view (see the comments of sql/migrations/{path.name})") from None
        if sqlstate == "42501" and "must be owner" in str(exc.orig):
            reason = str(exc.orig).strip().splitlines()[0]
            raise DatabaseError(f"init-db cannot apply the migration {path.name}: {reason}. Run init-db as the "
                                "role that owns the pipeline's tables (or a superuser). Nothing was changed") from None
        if isinstance(exc, sa.exc.IntegrityError):
            reason = " ".join(str(exc.orig).split())
            raise DatabaseError(f"init-db cannot apply the migration {path.name}: the stored rows break "
                                f"a constraint ({reason}); see the comments of sql/migrations/{path.name}. "
                                "Nothing was changed") from None
        raise


def apply_views(conn: Connection) -> None:
    """views.sql. On PostgreSQL each view is replaced in place (CREATE OR REPLACE VIEW), so the
    views analysts build on ours survive init-db; PostgreSQL refuses to drop a view others
    depend on. Only a view whose columns a release changes is dropped and created again, and
    if other objects depend on it the error names them (SQLite does not track dependencies)."""
    postgres = conn.dialect.name == "postgresql"
    for statement in sql_statements(SQL_DIR / "views.sql"):
        if not postgres:
            conn.exec_driver_sql(statement)
            continue
        if statement.upper().startswith("DROP VIEW"):
            continue  # dropped below, only if it cannot be replaced
        name = re.match(r"CREATE VIEW (\w+)", statement).group(1)  # type: ignore[union-attr]
        try:
            with _savepoint(conn):
                conn.exec_driver_sql(statement.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
            continue
        except sa.exc.DBAPIError:  # its columns changed, which only a new view can do
            pass
        try:
            with _savepoint(conn):
                conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
                conn.exec_driver_sql(statement)
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != "2BP01":  # dependent objects still exist
                raise
            raise _dependents_block(exc, f"init-db must replace the view {name!r}, whose columns this "
                                    "release changes") from None


def _dependents_block(exc: sa.exc.DBAPIError, what: str) -> DatabaseError:
    """PostgreSQL refused to drop what `what` names (2BP01): the error names what depends on it."""
    detail = str(getattr(exc.orig.diag, "message_detail", "") or "").replace("\n", "; ")
    return DatabaseError(f"{what}, but other objects depend on it ({detail}). "
                         "Drop them, run init-db, then create them again")


def _savepoint(conn: Connection) -> contextlib.AbstractContextManager[Any]:
    """A savepoint, so that a failed statement leaves the transaction usable; none on an
    AUTOCOMMIT connection, where each statement is its own transaction (and SAVEPOINT fails)."""
    autocommit = bool(getattr(conn.connection.dbapi_connection, "autocommit", False))  # psycopg's flag
    return contextlib.nullcontext() if autocommit else conn.begin_nested()


def reflect_table(conn: Connection, name: str, *, dataset: str | None = None) -> sa.Table:
    check_identifier(name, key="table")
    metadata = sa.MetaData()
    overrides = []
    timestamps = {FORECASTS: ("as_of", "ts", "created_at"), FORECAST_RUNS: ("as_of", "created_at"),
                  FORECAST_STEPS: ("ts",), MODEL_SCORES: ("as_of", "created_at"), ACTUALS: ("ts", "loaded_at")}
    in_primary_key = {ACTUALS: ("ts",), FORECAST_STEPS: ("ts",)}.get(name, ())
    overrides = [sa.Column(column, TIMESTAMP, primary_key=column in in_primary_key)
                 for column in timestamps.get(name, ())]
    try:
        return sa.Table(name, metadata, *overrides, autoload_with=conn)
    except sa.exc.NoSuchTableError:
        where = f"dataset {dataset!r}: " if dataset else ""
        hint = " (run `forecasting init-db`)" if name in OUTPUT_RELATIONS else ""
        inspector = sa.inspect(conn)
        same_but_case = [t for t in (*inspector.get_table_names(), *inspector.get_view_names())
                         if t.lower() == name.lower() and t != name]
        if same_but_case:  # PostgreSQL folds unquoted names to lower case: CREATE TABLE Sales made sales
            hint = f"; {same_but_case[0]!r} does: names are case-sensitive here, write it so in the config"
        raise DataError(f"{where}table {name!r} does not exist in {describe(conn.engine)}{hint}") from None


# --------------------------------------------------------------------------------------- read


def read_dataset(
    conn: Connection, config: DatasetConfig, *, as_of: datetime | None = None
) -> pd.DataFrame:
    """The dataset as a long frame: series_id, ts, value, covariates (sorted, ts <= as_of).

    Only the configured columns are read. Rows after `as_of` are dropped here, before any
    check or model sees them, so a past as_of never leaks later data.
    """
    source = config.source
    wanted = _source_columns(config)
    if source.table is not None:
        table = _source_table(conn, config, wanted)
        query: Any = sa.select(*(table.c[c] for c in wanted))
    else:
        query = _source_query(source.query)
    frame = frame_of(_execute_source(conn, config, query))
    if source.query is not None:
        _require_columns(config, "source.query", wanted, frame.columns)
        twice = sorted(set(frame.columns[frame.columns.duplicated()]) & set(wanted))
        if twice:
            raise DataError(f"dataset {config.name!r}: `source.query` returns the column {twice[0]!r} more "
                            "than once; name each column once (AS ...)")
    return to_long_frame(frame, config, as_of=as_of)


def _source_query(sql: str) -> sa.TextClause:
    # Escaped: text() reads ':word' as a bind parameter, even inside a string literal
    # ('store :north'), and no parameters are ever bound here; '::' casts stay as they are.
    return sa.text(sql.replace(":", "\\:"))


def _source_columns(config: DatasetConfig) -> list[str]:
    """The source columns the config reads: id (if any), time, target, covariates."""
    source = config.source
    return [c for c in (source.id_column, source.time_column, source.target_column, *source.covariates) if c]


def _source_table(conn: Connection, config: DatasetConfig, wanted: Sequence[str]) -> sa.Table:
    """The config's source table, reflected, refused by name if it lacks a `wanted` column."""
    table = reflect_table(conn, config.source.table, dataset=config.name)
    _require_columns(config, config.source.table, wanted, table.columns.keys())
    return table


# A final semicolon, and the blank space and comments after it
_FINAL_SEMICOLON = re.compile(r";(?:\s|--[^\n]*|/\*.*?\*/)*\Z", re.S)


def _subquery_of(sql: str) -> str:
    """`sql` ready to be wrapped as `(...) AS name`: without comments (a trailing `-- ...` would
    swallow the closing parenthesis) or a final semicolon (it would end the statement), both of
    which a query run as written may have. sqlparse knows string literals from comments; past
    its 10,000 tokens (a long IN list) it refuses, and then only a final semicolon is taken off,
    the text ending in a line break so that a trailing `-- ...` ends before the parenthesis."""
    import sqlparse
    from sqlparse.exceptions import SQLParseError

    try:
        return sqlparse.format(sql, strip_comments=True).strip().rstrip(";").strip()
    except SQLParseError:  # the CLI's source check failed on such a query with a traceback
        return _FINAL_SEMICOLON.sub("", sql.strip()) + "\n"


def _execute_source(conn: Connection, config: DatasetConfig, query: Any) -> sa.CursorResult[Any]:
    try:
        return conn.execute(query)
    except sa.exc.DBAPIError as exc:
        reason = (str(exc.orig).strip() or type(exc.orig).__name__).splitlines()[0]
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege: a raw traceback before
            source = "`source.query`" if config.source.query is not None else f"table {config.source.table!r}"
            raise DataError(f"dataset {config.name!r}: the database role may not read {source}: {reason}; "
                            "GRANT SELECT on it to that role") from None
        if config.source.query is not None and _is_query_error(exc):
            raise DataError(f"dataset {config.name!r}: `source.query` fails: {reason}") from None
        raise


def check_source(conn: Connection, config: DatasetConfig) -> None:
    """The config's source exists and has its columns, checked without reading a row: the CLI
    runs it before starting a flow, so that a typo fails in a second, not after Prefect's
    start-up with the flow's tracebacks."""
    source = config.source
    wanted = _source_columns(config)
    if source.table is not None:
        _source_table(conn, config, wanted)
        return
    inner = _subquery_of(source.query)
    result = _execute_source(conn, config, _source_query(f"SELECT * FROM (\n{inner}\n) AS source_rows LIMIT 0"))
    keys = list(result.keys())
    result.close()
    _require_columns(config, "source.query", wanted, keys)


def read_times(conn: Connection, config: DatasetConfig, *, until: datetime) -> pd.DatetimeIndex:
    """The distinct timestamps of the dataset's target values up to `until`, oldest first: the
    as_of dates that have data of their own (a backfill's nights), read without the values.
    Rows without a target (the future's, say) are none: a night there would read up to the
    last observation (pipeline.load), and repeat that night."""
    source = config.source
    time, target = source.time_column, source.target_column
    if source.table is not None:
        table = _source_table(conn, config, [time, target])
        columns = table.c
    else:
        columns = _source_query(_subquery_of(source.query)).columns(sa.column(time), sa.column(target)).subquery(
            "source_rows").c
    # Neither NULL (which compares to nothing) nor NaN, which PostgreSQL's floating and numeric
    # types hold and read_dataset reads as missing. Compared as text: a text target (read_dataset
    # parses it) compared with a float is an error there.
    observed = sa.cast(columns[target], sa.Text) != "NaN"
    # The values as the driver gives them, as read_dataset reads them: through the reflected
    # type, SQLite's NUM (CREATE TABLE ... AS SELECT declares columns by affinity) converted
    # '2020-01-01' to a decimal and failed.
    query: Any = sa.select(sa.type_coerce(columns[time], sa.types.NullType())).where(observed).distinct()
    raw = pd.Series(_execute_source(conn, config, query).scalars().all(), dtype=object).dropna()
    times = _source_times(raw, config) if len(raw) else pd.Series([], dtype="datetime64[ns]")
    return pd.DatetimeIndex(sorted(set(times[times <= pd.Timestamp(until)])))


READ_CHUNK_ROWS = 250_000  # rows turned into columns at a time


# SQLite reports a mistake in the SQL as OperationalError, the class of a database that cannot
# be reached or is locked (retried); its message tells the two apart.
_SQLITE_QUERY_MISTAKES = re.compile(r"^(no such (column|table|function)|.*syntax error|incomplete input|ambiguous column"
                                    r"|.*(mismatch|misuse|wrong number of arguments))")


def _is_query_error(exc: sa.exc.DBAPIError) -> bool:
    """Whether `exc` is a mistake in the query itself (no retry can help), not the database's
    being unreachable or busy."""
    if isinstance(exc, (sa.exc.ProgrammingError, sa.exc.DataError)):  # PostgreSQL: undefined
        return True                                                 # column, syntax, bad cast
    return isinstance(exc, sa.exc.OperationalError) and bool(_SQLITE_QUERY_MISTAKES.match(str(exc.orig)))


def frame_of(result: sa.CursorResult[Any]) -> pd.DataFrame:
    """A query's rows as a DataFrame, built from the driver's own tuples a chunk at a time.

    pd.DataFrame(result.fetchall()) held every Row object at once and built the frame row by
    row: 7.3M rows (10,000 daily series) took 39 s and peaked at 3.45 GiB; a chunk at a time
    bounds what is held. The tuples come from the DBAPI cursor, not through SQLAlchemy's Row
    objects and result processors: building those was 70% of reading the sales demo (0.29 s
    against 0.08 s for its 64,532 rows), and the 10,000-series load took 18 s against 55 s
    (benchmarks/scale.py, 2026-11-29). Types are settled later (to_long_frame), which is also
    why SQLite's dates may stay the ISO strings it stores.
    """
    keys = list(result.keys())
    cursor = result.cursor
    chunks = []
    while rows := cursor.fetchmany(READ_CHUNK_ROWS):
        chunks.append(pd.DataFrame.from_records(rows, columns=keys))
    result.close()
    if not chunks:
        return pd.DataFrame(columns=keys)
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


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
        ids = frame[source.id_column]
        if ids.isna().any():  # astype(str) would keep them as NaN, a series no check sees
            raise DataError(
                f"dataset {config.name!r}: column {source.id_column!r} (id_column) is NULL in "
                f"{int(ids.isna().sum())} row(s); every row must name its series"
            )
        out["series_id"] = ids.astype(str)
        _require_storable_ids(out["series_id"], config=config)
    else:
        out["series_id"] = pd.Series(config.name, index=frame.index, dtype=object)
    out["ts"] = _source_times(frame[source.time_column], config)
    if out["ts"].isna().any():
        series = out.loc[out["ts"].isna(), "series_id"]
        raise DataError(
            f"dataset {config.name!r}, series {sorted(series.unique())[0]!r}: column "
            f"{source.time_column!r} (time_column) is NULL in {len(series)} row(s)"
        )
    if as_of is not None:  # before the values are parsed: a past night never reads later rows
        kept = (out["ts"] <= pd.Timestamp(as_of)).to_numpy()
        out, frame = out[kept], frame[kept]
    # Sort first so that an error names the first offending row in (series, time) order.
    order = out.sort_values(["series_id", "ts"], kind="stable").index
    out, frame = out.loc[order].reset_index(drop=True), frame.loc[order].reset_index(drop=True)
    for column, role in [(source.target_column, "target_column")] + [
        (c, "covariates") for c in source.covariates
    ]:
        name = "value" if role == "target_column" else column
        out[name] = _numeric(frame[column], out["series_id"], config=config, column=column, role=role)
    return out


SERIES_ID_LENGTH = 255  # the series_id columns of forecasts, model_scores and actuals (schema.sql)


def _require_storable_ids(ids: pd.Series, *, config: DatasetConfig) -> None:
    """Refuse ids the output tables cannot hold, before any training: an empty id (which
    PostgreSQL keeps apart from NULL) fails model_scores' aggregate check, a longer one
    PostgreSQL's VARCHAR(255) - both at the write, after the night's work."""
    lengths = ids.str.len()
    bad = (lengths == 0) | (lengths > SERIES_ID_LENGTH)
    if bad.any():
        first = ids[bad.idxmax()]
        shown = repr(first) if len(first) <= 60 else f"{first[:60]!r}... ({len(first)} characters)"
        raise DataError(
            f"dataset {config.name!r}, series {shown}: column {config.source.id_column!r} (id_column) "
            f"must be 1 to {SERIES_ID_LENGTH} characters ({int(bad.sum())} row(s) are not)"
        )


# A time of day followed by a UTC offset or Z: text that carries its own zone (SQLite's way).
_TEXT_OFFSET = re.compile(r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)$")


def _source_times(column: pd.Series, config: DatasetConfig) -> pd.Series:
    """naive_times of the source's time column; values that are not timestamps named."""
    name = config.source.time_column
    try:
        times = naive_times(column, config.source.timezone)
    except (ValueError, TypeError) as exc:
        raise DataError(f"dataset {config.name!r}: column {name!r} (time_column) holds values that are not "
                        f"timestamps: {exc}") from None
    _warn_of_days_off_midnight(column, times, config)
    return times


def _warn_of_days_off_midnight(column: pd.Series, times: pd.Series, config: DatasetConfig) -> None:
    """Days counted in another zone than `source.timezone`: Tokyo's midnights read on UTC's clock
    are 15:00 the day before, a grid validation accepts, so every day was labelled (and every
    forecast dated) a day early, silently. Not refused: a reading taken at 09:00 each day is
    daily data too; a warning names the key."""
    from forecasting.validate import _sub_daily

    if _sub_daily(config.freq) or not _aware(column) or times.empty:
        return
    off = times[times != times.dt.normalize()]
    if off.empty:
        return
    log.warning("dataset %r: column %r (time_column) holds times with a zone, %d of them not at midnight on the "
                "clock of `source.timezone` (%r), e.g. %s: if the days are counted in another zone, set "
                "`source.timezone` to it, or every %r step is dated from that time of day",
                config.name, config.source.time_column, len(off), config.source.timezone, off.iloc[0], config.freq)


def _aware(column: pd.Series) -> bool:
    """Whether the source's times carry a zone (timestamptz, or text with an offset)."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        return True
    first = column.first_valid_index()
    sample = column[first] if first is not None else None
    return getattr(sample, "tzinfo", None) is not None or (
        isinstance(sample, str) and _TEXT_OFFSET.search(sample.strip()) is not None)


def naive_times(column: pd.Series, timezone: str) -> pd.Series:
    """Timestamps without a zone: aware ones (PostgreSQL timestamptz, which psycopg returns in
    the session's zone, or text with an offset, as SQLite stores them) on the wall clock of
    `timezone`; naive ones as they are."""
    first = column.first_valid_index()
    sample = column[first] if first is not None else None
    if isinstance(sample, (int, float, np.integer, np.floating)) and not isinstance(sample, bool):
        # pandas would read them as nanoseconds since 1970, and every check then saw 1970
        raise ValueError(f"numbers (e.g. {sample}), not dates or timestamps; convert them in `source.query`, "
                         "e.g. datetime(col, 'unixepoch') on SQLite or to_timestamp(col) on PostgreSQL for "
                         "seconds since 1970")
    aware = _aware(column)
    try:
        ts = pd.to_datetime(column, utc=True)  # mixed offsets (daylight saving) need one zone first
    except ValueError as first_error:
        if not isinstance(sample, str):
            raise
        # pandas takes the first value's format for all: SQLite text mixing '2018-06-01' and
        # '2018-06-01 00:00:00' (rows written by two tools) was refused. Any ISO 8601 form, else the first error.
        try:
            ts = pd.to_datetime(column, utc=True, format="ISO8601")
        except ValueError:
            raise first_error from None
    if aware:
        ts = ts.dt.tz_convert(timezone)
    return ts.dt.tz_localize(None).astype("datetime64[ns]")


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
    conn: Connection,
    table: sa.Table,
    rows: pd.DataFrame | Sequence[dict[str, Any]],
    *,
    key: Sequence[str],
) -> int:
    """INSERT ... ON CONFLICT (key) DO UPDATE of `rows` (a frame, or dicts with the same keys).

    Runs in the caller's transaction and returns the number of rows sent. A key that occurs
    more than once in `rows` ends with its last row, as one INSERT per row would leave it.
    PostgreSQL (psycopg): the rows are COPYed into a temporary staging table, then moved with
    one INSERT ... SELECT (see `_pg_upsert`); a frame skips the dicts altogether. SQLite
    (in-process, no round trips) and other PostgreSQL drivers: one executemany of INSERT ...
    ON CONFLICT. Values must already have their column's type (a float into an INTEGER column
    is rounded, as PostgreSQL's assignment cast does).
    """
    if len(rows) == 0:
        return 0
    given = rows.columns if isinstance(rows, pd.DataFrame) else rows[0].keys()
    unknown = [str(c) for c in given if c not in table.columns]
    if unknown:  # also what keeps the names spliced into _pg_upsert's SQL to the table's own
        raise ValueError(f"upsert into {table.name!r}: `rows` hold columns the table has not: {unknown}")
    dialect = conn.dialect.name
    if dialect == "postgresql" and conn.dialect.driver == "psycopg":
        frame = rows if isinstance(rows, pd.DataFrame) else _records_frame(rows)
        _pg_upsert(conn, table, frame, key=key)
        return len(rows)
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise DatabaseError(f"dialect {dialect!r} is not supported (use sqlite or postgresql)")
    records = to_records(rows) if isinstance(rows, pd.DataFrame) else list(rows)
    updates = {c: stmt.excluded[c] for c in records[0] if c not in key}
    conn.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=updates), records)
    return len(records)


_PG_COPY_CHUNK = 50_000  # rows turned into Python values at a time while COPYing
# What binary COPY can write into each column type (else the whole COPY goes as text).
_PG_BINARY = {"bool": "bool", "int2": "int", "int4": "int", "int8": "int", "float4": "float",
              "float8": "float", "text": "str", "varchar": "str", "bpchar": "str",
              "timestamp": "timestamp", "date": "date"}


def _pg_upsert(conn: Connection, table: sa.Table, frame: pd.DataFrame, *, key: Sequence[str]) -> None:
    """COPY `frame` into a staging table, then move it into `table` with one INSERT ... SELECT.

    The staging table is TEMP, under a fresh name (upsert may run several times in one
    transaction, on the same table too), with the target's column types but none of its
    constraints (NOT NULL and CHECK fire in the INSERT and name the real table); it is dropped
    after the INSERT, and ON COMMIT anyway. COPY goes through the caller's psycopg connection,
    so it is part of the caller's transaction: an error anywhere leaves nothing behind. The
    INSERT is a plain one while no key exists yet, else ON CONFLICT (`_insert_if_all_new`).
    ON CONFLICT DO UPDATE refuses to touch a row twice in one statement, so of the rows that
    share a key only the last is sent (keys holding a NULL never conflict: all are kept).
    """
    import contextlib
    import uuid

    from psycopg import sql  # the driver of postgresql+psycopg URLs; only this path needs it

    key = list(key)
    repeated = frame.duplicated(subset=key, keep="last") & frame[key].notna().all(axis=1)
    if repeated.any():
        frame = frame[~repeated.to_numpy()]
    driver = conn.connection.driver_connection
    # Under AUTOCOMMIT every statement would commit (and drop the staging table): one block.
    with driver.transaction() if driver.autocommit else contextlib.nullcontext():
        # No values in the SQL: every value travels through COPY. The identifiers (the table's
        # own column names, checked by upsert; the target; a uuid staging name) are composed
        # and quoted by psycopg.sql, since COPY and DDL take no bound parameters.
        columns = [str(c) for c in frame.columns]
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        target = sql.Identifier(*([table.schema] if table.schema else []), table.name)
        staging = sql.Identifier(f"upsert_{uuid.uuid4().hex}")

        def run(statement: sql.Composable) -> None:  # through SQLAlchemy: its errors, savepoints
            conn.exec_driver_sql(statement.as_string(driver))

        run(sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            staging, names, target))
        _pg_copy(conn, staging, frame)
        insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(target, names, names, staging)
        updates = [sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns if c not in key]
        on_conflict = insert + sql.SQL(" ON CONFLICT ({}) ").format(
            sql.SQL(", ").join(map(sql.Identifier, key))) + (
            sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(updates)) if updates else sql.SQL("DO NOTHING"))
        if not (_unique_on(table, key) and _insert_if_all_new(conn, insert.as_string(driver))):
            run(on_conflict)
        run(sql.SQL("DROP TABLE {}").format(staging))


def _pg_copy(conn: Connection, target: Any, frame: pd.DataFrame) -> None:
    """COPY `frame` into `target` (a psycopg.sql identifier; the frame's columns are the table's
    own, as upsert and insert_new check), binary where every column allows, in the caller's
    transaction."""
    import psycopg
    from psycopg import sql

    driver = conn.connection.driver_connection
    names = sql.SQL(", ").join(sql.Identifier(str(c)) for c in frame.columns)
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(target, names)
    try:
        with driver.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT {} FROM {} LIMIT 0").format(names, target))
            types = [driver.adapters.types.get(c.type_code) for c in cursor.description]
            frame, binary = _pg_copy_frame(frame, [t.name if t else None for t in types])
            if binary:
                copy_sql += sql.SQL(" (FORMAT BINARY)")
            with cursor.copy(copy_sql) as copy:
                if binary:
                    copy.set_types([t.oid for t in types])
                for start in range(0, len(frame), _PG_COPY_CHUNK):
                    chunk = frame.iloc[start : start + _PG_COPY_CHUNK]
                    for row in zip(*(_plain_column(series) for _, series in chunk.items())):
                        copy.write_row(row)
    except psycopg.Error as exc:  # the same exception classes as every other statement here
        raise sa.exc.DBAPIError.instance(copy_sql.as_string(driver), None, exc, psycopg.Error) from exc


def insert_new(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> int:
    """INSERT `frame`, whose keys cannot exist yet (a new run_key's steps), in the caller's
    transaction; the number of rows. PostgreSQL (psycopg): one COPY straight into the table,
    no staging table and no ON CONFLICT, which cost a first write of 1,000,000 steps 1.67x the
    COPY itself. A key met twice, in the table or in `frame`, fails the write (IntegrityError)."""
    if frame.empty:
        return 0
    unknown = [str(c) for c in frame.columns if c not in table.columns]
    if unknown:  # also what keeps the names spliced into _pg_copy's SQL to the table's own
        raise ValueError(f"insert into {table.name!r}: `frame` holds columns the table has not: {unknown}")
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        from psycopg import sql

        _pg_copy(conn, sql.Identifier(*([table.schema] if table.schema else []), table.name), frame)
    else:
        conn.execute(sa.insert(table), to_records(frame))
    return len(frame)


def _insert_if_all_new(conn: Connection, insert: str) -> bool:
    """Run a plain INSERT in a savepoint; False, and nothing inserted, if a key already exists.

    A plain INSERT costs about two thirds of INSERT ... ON CONFLICT (which checks the unique
    index before every row and confirms each insertion); when no key exists yet (a first write,
    or write_run's rows after its DELETE) it is all the upsert needs. When a key exists, it
    fails on that row (at once for a rerun, whose first row already exists) and the caller
    runs ON CONFLICT; a concurrent writer of the same keys ends the same way.
    """
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(insert)
    except sa.exc.IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != "23505":  # unique_violation
            raise
        return False
    return True


def _unique_on(table: sa.Table, key: Sequence[str]) -> bool:
    """Whether `table` (as reflected) has a primary key, unique constraint or index on exactly `key`.

    Only then can a plain INSERT stand in for ON CONFLICT: without one it would never fail, and
    ON CONFLICT must be the statement that reports the missing constraint.
    """
    wanted = set(key)
    uniques = [c for c in table.constraints if isinstance(c, (sa.PrimaryKeyConstraint, sa.UniqueConstraint))]
    uniques += [index for index in table.indexes if index.unique]
    return any({column.name for column in unique.columns} == wanted for unique in uniques)


def _pg_copy_frame(frame: pd.DataFrame, types: Sequence[str | None]) -> tuple[pd.DataFrame, bool]:
    """`frame` with ints for INTEGER and floats for DOUBLE columns, and whether COPY can be binary.

    A float into an integer column is rounded half to even, as PostgreSQL's assignment cast does.
    Binary COPY needs every column to hold what its type's binary form takes; otherwise the
    whole COPY goes as text and PostgreSQL parses each value (e.g. an int into a VARCHAR).
    """
    binary = True
    for (name, series), type_name in zip(list(frame.items()), types):
        want, have = _PG_BINARY.get(type_name or ""), _value_kind(series)
        if want == "int" and have == "float":
            frame = frame.assign(**{name: np.rint(series).astype("Int64")})
        elif want == "float" and have == "int":
            frame = frame.assign(**{name: series.astype("float64")})
        elif want is None or have not in (want, "null"):
            binary = False
    return frame, binary


def _value_kind(series: pd.Series) -> str:
    """What a column holds: null, bool, int, float, str, timestamp (naive), date or other."""
    if not series.notna().any():
        return "null"
    dtype = series.dtype
    if isinstance(dtype, pd.DatetimeTZDtype):
        return "other"
    if dtype.kind in "biufM":  # numpy and pandas' nullable dtypes alike
        return {"b": "bool", "i": "int", "u": "int", "f": "float", "M": "timestamp"}[dtype.kind]
    inferred = pd.api.types.infer_dtype(series, skipna=True)
    return {"string": "str", "boolean": "bool", "integer": "int", "floating": "float",
            "mixed-integer-float": "float", "date": "date"}.get(inferred, "other")


def _records_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Dicts with the keys of the first one as a frame (None becomes NaN/NaT, read back as None)."""
    return pd.DataFrame(list(rows), columns=list(rows[0]))


def write_run(
    conn: Connection,
    *,
    dataset: str,
    as_of: datetime,
    forecasts: pd.DataFrame,
    scores: pd.DataFrame | None,
    actuals: pd.DataFrame | None = None,
) -> tuple[int, int]:
    """Replace the forecast (and scores, unless None) of one (dataset, as_of), in the caller's transaction.

    `forecasts` holds the rows of the `forecasts` view less dataset, as_of and created_at: one
    per series and step (STEP_COLUMNS), and the model that made them all (RUN_COLUMNS). The
    previous run of this (dataset, as_of), if any, goes whole with its steps (a series dropped
    since keeps none); the new one is written under a new run_key (see schema.sql).
    """
    _require_finite(forecasts, dataset=dataset)
    _require_one_row_per_step(forecasts, dataset=dataset)
    stamp = pd.Timestamp(as_of)
    if stamp.tzinfo is not None:  # the tables' TIMESTAMPs are the dataset's wall clock
        raise ValueError(f"dataset {dataset!r}: `as_of` ({as_of!r}) must be naive, on the dataset's "
                         "wall clock (see config.parse_as_of)")
    as_of = stamp.to_pydatetime()
    provenance = _one_provenance(forecasts, dataset=dataset, as_of=as_of)
    runs, steps = reflect_table(conn, FORECAST_RUNS), reflect_table(conn, FORECAST_STEPS)
    scores_table = reflect_table(conn, MODEL_SCORES)
    created_at = datetime.now().replace(microsecond=0)
    lock_run(conn, dataset=dataset, as_of=as_of)
    replaced = conn.execute(sa.select(runs.c.run_key).where(runs.c.dataset == dataset, runs.c.as_of == as_of))
    old_key = replaced.scalar_one_or_none()  # UNIQUE (dataset, as_of): one run at most
    if old_key is not None:
        conn.execute(sa.delete(steps).where(steps.c.run_key == old_key))
        conn.execute(sa.delete(runs).where(runs.c.run_key == old_key))
    if scores is not None:
        conn.execute(sa.delete(scores_table).where(scores_table.c.dataset == dataset, scores_table.c.as_of == as_of))
    if actuals is not None:
        write_actuals(conn, dataset=dataset, panel=actuals, created_at=created_at)
    n_forecasts = 0
    if provenance is not None:  # no rows, no run: the as_of holds no forecast, as it would have no rows
        run_key = _insert_run(conn, runs, {"dataset": dataset, "as_of": as_of, **provenance, "created_at": created_at})
        step_rows = forecasts[[c for c in STEP_COLUMNS if c in forecasts]].assign(run_key=run_key)
        n_forecasts = insert_new(conn, steps, step_rows)
    if scores is None:
        _flag_forecasting_model(conn, scores_table, dataset=dataset, as_of=as_of, forecasts=forecasts)
        return n_forecasts, 0
    score_frame = scores.assign(
        series_key=scores["series_id"].where(scores["series_id"].notna(), AGGREGATE_KEY)
    )
    score_rows = score_frame.assign(dataset=dataset, as_of=as_of, created_at=created_at)
    n_scores = upsert(conn, scores_table, score_rows, key=("dataset", "as_of", "model", "series_key"))
    return n_forecasts, n_scores


def _one_provenance(forecasts: pd.DataFrame, *, dataset: str, as_of: datetime) -> dict[str, Any] | None:
    """The model, model_version and mlflow_run_id that every row of `forecasts` names (absent
    columns: None), or None for no rows. Raises ValueError for a column that is neither a step's
    nor a run's, or for rows of more than one model: a forecast_runs row holds one."""
    unknown = sorted(set(map(str, forecasts.columns)) - set(STEP_COLUMNS) - set(RUN_COLUMNS))
    if unknown:
        raise ValueError(f"dataset {dataset!r}, as_of {as_of}: the forecast rows hold column(s) {unknown}, "
                         f"which the forecasts view has not; write_run takes {[*STEP_COLUMNS, *RUN_COLUMNS]}")
    if forecasts.empty:
        return None
    present = [c for c in RUN_COLUMNS if c in forecasts]
    made_by = forecasts[present].drop_duplicates() if present else pd.DataFrame([{}])
    if len(made_by) > 1:
        described = "; ".join(", ".join(f"{c}={v!r}" for c, v in row.items()) for row in made_by.head(3).to_dict("records"))
        raise ValueError(f"dataset {dataset!r}, as_of {as_of}: the forecast rows name {len(made_by)} models "
                         f"({described}); one forecast is made by one model")
    return {c: _plain(made_by[c].iloc[0]) if c in made_by else None for c in RUN_COLUMNS}


def _insert_run(conn: Connection, runs: sa.Table, row: dict[str, Any]) -> int:
    """Insert the forecast_runs row under a new run_key; the key.

    The key grows with the clock (microseconds), so that a run's steps go in at the right edge
    of forecast_steps' key index; the random low bits keep two writers of the same microsecond
    (of other datasets or as_ofs: lock_run serialises the same one) apart, and should they meet
    anyway the primary key refuses the second, which takes another key.
    """
    tries = 0
    while True:
        run_key = (time.time_ns() // 1000) << 8 | secrets.randbits(8)
        try:
            with _savepoint(conn):
                conn.execute(sa.insert(runs).values(run_key=run_key, **row))
            return run_key
        except sa.exc.IntegrityError:
            tries += 1
            if tries == 3:  # not a clash of keys: the row itself (e.g. model NULL)
                raise


def _flag_forecasting_model(conn: Connection, scores_table: sa.Table, *, dataset: str, as_of: datetime,
                            forecasts: pd.DataFrame) -> None:
    """Forecasts replaced without scores (`forecasting predict`): `is_champion` keeps marking
    the model that made the as_of's forecast. Its rows are those logged by the forecasts' MLflow
    run (the registered model's); if no score row of the as_of is, none is flagged."""
    runs = forecasts["mlflow_run_id"].dropna().unique() if "mlflow_run_id" in forecasts else []
    made_it = sa.and_(scores_table.c.mlflow_run_id.in_(list(runs)), scores_table.c.status == "scored")
    conn.execute(
        sa.update(scores_table)
        .where(scores_table.c.dataset == dataset, scores_table.c.as_of == as_of)
        .values(is_champion=sa.case((made_it, True), else_=False))
    )


def _require_finite(forecasts: pd.DataFrame, *, dataset: str) -> None:
    """Refuse NaN or infinite forecasts before anything is written: a database stores an
    infinity (PostgreSQL's 'Infinity', SQLite's Inf) without complaint, and analysts' sums
    and averages over it are then meaningless. Interval bounds may be NULL, never infinite."""
    for column in ("value", "lower", "upper"):
        if column not in forecasts:
            continue
        values = forecasts[column].to_numpy(dtype="float64", na_value=np.nan)
        bad = np.isinf(values) | (np.isnan(values) if column == "value" else False)
        if bad.any():
            first = int(bad.argmax())
            row = forecasts.iloc[first]
            raise DataError(
                f"dataset {dataset!r}, series {row['series_id']!r}: forecast column {column!r} is "
                f"{values[first]} at ts {row['ts']} ({int(bad.sum())} such row(s)); nothing was written"
            )


def _require_one_row_per_step(forecasts: pd.DataFrame, *, dataset: str) -> None:
    """Refuse a series forecast twice at one ts before anything is written. upsert kept the last
    of such rows silently; a new run's steps go in by COPY, which would fail on the second one
    half-way through the write. (40 ms for 1,000,000 rows.)"""
    if not {"series_id", "ts"} <= set(forecasts.columns):
        return
    twice = forecasts.duplicated(["series_id", "ts"], keep=False).to_numpy()
    if twice.any():
        row = forecasts.iloc[int(twice.argmax())]
        raise DataError(f"dataset {dataset!r}, series {row['series_id']!r}: {int(twice.sum())} forecast rows "
                        f"share their (series_id, ts), e.g. ts {row['ts']}: one row per series and step; "
                        "nothing was written")


def lock_run(conn: Connection, *, dataset: str, as_of: datetime, wait_seconds: int = 300) -> None:
    """Serialise writers of the same (dataset, as_of) until the caller's transaction ends.

    Without it, two runs of one night on PostgreSQL (READ COMMITTED) could each delete before
    the other inserts and leave the union of both sets. With it, the second writer waits, then
    deletes the first one's rows and writes its own: exactly one set remains. On SQLite the
    database's single write lock does it, taken here at the start of the transaction (see
    take_write_lock), waiting up to busy_timeout, and held to the end of the transaction. On
    PostgreSQL, after `wait_seconds` a DatabaseError (transient: the flow retries), not a wait
    without end behind a session that hangs holding it.
    """
    if conn.dialect.name == "sqlite":
        take_write_lock(conn)
        return
    if conn.dialect.name != "postgresql":
        return
    _advisory_xact_lock(conn, f"{dataset}\x00{as_of.isoformat()}", wait_seconds=wait_seconds,
                        held_by=f"dataset {dataset!r}: another write of as_of {as_of} has held its lock")


def _advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock's key (a signed bigint) for `name`."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _advisory_xact_lock(conn: Connection, name: str, *, wait_seconds: int, held_by: str) -> None:
    """PostgreSQL: the advisory transaction lock of `name`, waited for at most `wait_seconds`
    (lock_timeout, for this statement only); then a DatabaseError of `held_by`."""
    before = conn.execute(sa.text("SHOW lock_timeout")).scalar_one()
    set_local = sa.text("SELECT set_config('lock_timeout', :value, true)")  # SET LOCAL, with a bound value
    conn.execute(set_local, {"value": f"{int(wait_seconds)}s"})
    try:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(name)})
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        raise DatabaseError(f"{held_by} for {wait_seconds} s") from None
    conn.execute(set_local, {"value": before})


def lock_dataset(conn: Connection, *, dataset: str, wait_seconds: int = 300) -> None:
    """PostgreSQL: hold this dataset's lock until the caller's transaction ends (an advisory
    transaction lock: lost only with the transaction itself, whose rows then roll back). After
    `wait_seconds` for it, a DatabaseError (transient: the flow retries)."""
    _advisory_xact_lock(conn, f"dataset\x00{dataset}", wait_seconds=wait_seconds,
                        held_by=f"dataset {dataset!r}: another night's write of it has held the dataset's lock")


@contextlib.contextmanager
def sqlite_dataset_lock(engine: Engine, *, dataset: str, wait_seconds: int = 300) -> Iterator[None]:
    """SQLite: within the block no other process or thread holds this dataset's lock, a file
    beside the database. Held outside any transaction: a transaction's write lock is the whole
    file's, and an MLflow store in the same file could not move the alias under it."""
    path = _sqlite_file(engine)
    if path is None:  # in memory: no other process sees it
        with _THREAD_LOCKS.setdefault(dataset, threading.Lock()):
            yield
        return
    import filelock

    digest = hashlib.blake2b(dataset.encode(), digest_size=6).hexdigest()  # any dataset name, a safe file name
    lock_path = f"{path}.{digest}.lock"
    try:  # with the database's permissions: another user writing the database can take it too
        mode = os.stat(path).st_mode & 0o666
    except OSError:
        mode = 0o644
    lock = filelock.FileLock(lock_path, timeout=wait_seconds, mode=mode)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise DatabaseError(f"dataset {dataset!r}: another night's write of it has held {lock_path} for "
                            f"{wait_seconds} s") from None
    except OSError as exc:
        raise not_writable(engine, dataset, f"its lock file {lock_path} cannot be opened: {exc.strerror}") from None
    try:
        yield
    finally:
        lock.release()


def _sqlite_file(engine: Engine) -> str | None:
    """The real path of a SQLite database file (a `file:` URI's too), or None in memory."""
    database = engine.url.database or ""
    if database.startswith("file:"):
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(database)
        if "memory" in (parse_qs(parts.query).get("mode", []) + [engine.url.query.get("mode")]):
            return None
        database = unquote(parts.path)
    if database in ("", ":memory:"):
        return None
    return os.path.realpath(database)  # one lock for every name of the file (relative, symlinked)


_THREAD_LOCKS: dict[str, threading.Lock] = {}


def take_write_lock(conn: Connection) -> None:
    """On SQLite, begin the connection's transaction as a writer (BEGIN IMMEDIATE).

    pysqlite begins transactions DEFERRED. One that reads before it writes (table reflection,
    a SELECT) holds a read snapshot, and if another process commits meanwhile, its first write
    fails at once with "database is locked": the busy timeout does not apply to that case.
    Seen with four flow runs starting together. Taking the write lock first waits up to
    busy_timeout instead. A no-op on other databases, or once the transaction has begun.
    """
    if conn.dialect.name != "sqlite":
        return
    if not conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def check_output_writable(conn: Connection, *, dataset: str) -> None:
    """Raise OutputNotWritable unless a run could write its rows; writes nothing.

    Run before training, so a read-only database or a role without INSERT fails the night in
    a second rather than after hours of training. It writes probe rows with the statements of
    the night's writes, so the same privileges, then deletes them and rolls back. A forecast's
    two tables take what write_run sends them: an INSERT under a new run_key (COPY on
    PostgreSQL) and a DELETE. model_scores and actuals take an upsert twice: a new key takes a
    plain INSERT (see _insert_if_all_new) and only an existing one the ON CONFLICT DO UPDATE
    that a restated actual runs, for which PostgreSQL checks UPDATE.
    """
    probe = {"dataset": dataset, "as_of": datetime(1900, 1, 1)}
    # Negative, as no write's is; one per dataset, so that probes of two datasets never wait for each other.
    run_key = -1 - (_advisory_key(f"write probe\x00{dataset}") & (2**62 - 1))
    inserted = {
        FORECAST_RUNS: {**probe, "run_key": run_key, "model": "-"},
        FORECAST_STEPS: {"run_key": run_key, "series_id": "-", "ts": datetime(1900, 1, 2), "step": 1, "value": 0.0},
    }
    upserted = {
        MODEL_SCORES: ({**probe, "model": "-", "series_key": AGGREGATE_KEY, "series_id": None},
                       ("dataset", "as_of", "model", "series_key")),
        ACTUALS: ({"dataset": dataset, "series_id": "-", "ts": datetime(1900, 1, 1), "value": 0.0},
                  ("dataset", "series_id", "ts")),
    }
    with conn.begin_nested() if conn.in_transaction() else conn.begin() as transaction:
        try:
            take_write_lock(conn)
            for name, row in inserted.items():
                table = reflect_table(conn, name, dataset=dataset)
                insert_new(conn, table, pd.DataFrame([row]))
                conn.execute(sa.delete(table).where(table.c.run_key == run_key))
            for name, (row, key) in upserted.items():
                table = reflect_table(conn, name, dataset=dataset)
                upsert(conn, table, [row], key=key)
                upsert(conn, table, [row], key=key)
                conn.execute(sa.delete(table).where(*(table.c[k] == row[k] for k in key)))
        except sa.exc.DBAPIError as exc:
            reason = write_refusal(exc)
            if reason is None:
                raise
            raise not_writable(conn.engine, dataset, reason) from None
        finally:
            if transaction.is_active:
                transaction.rollback()


def not_writable(engine: Engine, dataset: str, reason: str) -> OutputNotWritable:
    reason = scrub(reason, engine.url.render_as_string(hide_password=False))
    return OutputNotWritable(
        f"dataset {dataset!r}: the output tables ({', '.join(OUTPUT_TABLES)}) of "
        f"database {describe(engine)} refuse writes: {reason}. Nothing was written; the source "
        "tables were only read"
    )


def write_actuals(conn: Connection, *, dataset: str, panel: pd.DataFrame, created_at: datetime) -> int:
    """Make `actuals` hold what the source holds now, for the observations that can match a
    stored forecast (ts after its oldest as_of); the number of rows written (new or changed).

    `panel` is what the run read of the source (a row whose value is NaN holds no observation).
    Compared with what `actuals` holds (`_stored_actuals`):
    - a new observation, or one whose value the source restated, is upserted (its `loaded_at`
      is this write's `created_at`); an unchanged one is not written again. Every night reads
      the tail since the oldest forecast, which grows with the forecasts' history: writing it
      all again each night would cost a growing upsert, a read costs far less;
    - a stored actual the source no longer holds - the row deleted there, or its value set to
      NULL: a correction - is deleted, so that `forecast_accuracy` stops scoring forecasts
      against it.
    """
    runs = reflect_table(conn, FORECAST_RUNS)
    oldest = conn.execute(sa.select(sa.func.min(runs.c.as_of)).where(runs.c.dataset == dataset)).scalar_one()
    if oldest is None:
        return 0
    actuals_table = reflect_table(conn, ACTUALS)
    recent = panel.loc[panel["ts"] > pd.Timestamp(oldest), ["series_id", "ts", "value"]]
    held = _actual_keys(recent[recent["value"].notna()]).drop_duplicates(["series_id", "ts"], keep="last")
    stored = _stored_actuals(conn, actuals_table, dataset=dataset, panel=panel, after=pd.Timestamp(oldest))
    both = stored.merge(held, on=["series_id", "ts"], how="outer", suffixes=("_stored", ""), indicator=True)
    withdrawn = both[both["_merge"] == "left_only"]
    if len(withdrawn):
        log.warning("dataset %r: deleted %d stored actual(s) that the source no longer holds (e.g. series %r at %s)",
                    dataset, len(withdrawn), withdrawn["series_id"].iloc[0], withdrawn["ts"].iloc[0])
        conn.execute(
            sa.delete(actuals_table).where(actuals_table.c.dataset == dataset,
                                           actuals_table.c.series_id == sa.bindparam("withdrawn_id"),
                                           actuals_table.c.ts == sa.bindparam("withdrawn_ts")),
            [{"withdrawn_id": i, "withdrawn_ts": t} for i, t in
             zip(withdrawn["series_id"].tolist(), withdrawn["ts"].dt.to_pydatetime().tolist())],
        )
    new = (both["_merge"] == "right_only") | ((both["_merge"] == "both") & (both["value"] != both["value_stored"]))
    rows = both.loc[new, ["series_id", "ts", "value"]].assign(dataset=dataset, loaded_at=created_at)
    return upsert(conn, actuals_table, rows, key=("dataset", "series_id", "ts"))


def _actual_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """series_id, ts, value with one type and unit whatever their source: PostgreSQL gives
    datetimes, SQLite the ISO text it stores, a panel nanoseconds (and str ids: to_long_frame)."""
    return pd.DataFrame({"series_id": frame["series_id"].astype(str).to_numpy(),
                         "ts": pd.to_datetime(frame["ts"], format="ISO8601").astype("datetime64[us]").to_numpy(),
                         "value": frame["value"].astype("float64").to_numpy()})


def _stored_actuals(conn: Connection, table: sa.Table, *, dataset: str, panel: pd.DataFrame,
                    after: pd.Timestamp) -> pd.DataFrame:
    """The stored actuals (series_id, ts, value) that `panel` can judge: of its series, ts after
    `after`, from the series' first timestamp in `panel` up to the panel's last.

    Only what the run read can tell. A past as_of (a backfill night) reads only up to it, so
    later actuals are never judged by it; a source that keeps only recent history (a retention
    policy, a query over the last n months) never read the older ones either; a series the run
    did not read at all (gone from the source) keeps its actuals, which still score the
    forecasts made for it. `panel` is as old as the run's read: an actual another process
    recorded since (`forecasting backfill` ending, `predict`) at or before its last timestamp is
    deleted, and recorded again by the next run that reads it.
    """
    empty = _actual_keys(pd.DataFrame({"series_id": [], "ts": [], "value": []}))
    if panel.empty:
        return empty
    through = pd.Timestamp(panel["ts"].max())
    stored = frame_of(conn.execute(sa.select(table.c.series_id, table.c.ts, table.c.value).where(
        table.c.dataset == dataset, table.c.ts > after.to_pydatetime(), table.c.ts <= through.to_pydatetime()
    )))  # the driver's tuples: a frame built from Row objects took 2.7 s for 365,000 rows
    if stored.empty:
        return empty
    stored = _actual_keys(stored)
    first = panel.groupby(panel["series_id"].astype(str))["ts"].min().astype("datetime64[us]")
    return stored[stored["ts"].to_numpy() >= stored["series_id"].map(first).to_numpy()]  # NaT: not read


def to_records(frame: pd.DataFrame, **constants: Any) -> list[dict[str, Any]]:
    """One dict per row of plain Python values (NaN, NaT and NA as None) for the driver."""
    frame = frame.assign(**constants)
    names = list(frame.columns)
    columns = [_plain_column(series) for _, series in frame.items()]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _plain_column(series: pd.Series) -> list[Any]:
    """`_plain` of every value of a column, a whole array at a time for the usual dtypes."""
    dtype = series.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biu":
        return series.to_numpy().tolist()
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        values = series.to_numpy()
        plain = values.tolist()
        for i in np.flatnonzero(np.isnan(values)).tolist():
            plain[i] = None
        return plain
    if isinstance(dtype, np.dtype) and dtype.kind == "M":  # naive; NaT becomes None
        return series.to_numpy().astype("datetime64[us]").tolist()
    values = series.to_numpy(dtype=object, na_value=None)
    if isinstance(dtype, pd.StringDtype):
        return values.tolist()
    return [_plain(v) for v in values]


def as_ofs_forecast_by(conn: Connection, *, dataset: str, versions: Sequence[str]) -> list[pd.Timestamp]:
    """The as_of dates whose stored forecast one of the model `versions` made, oldest first."""
    table = reflect_table(conn, FORECAST_RUNS)
    query = (sa.select(table.c.as_of).where(table.c.dataset == dataset, table.c.model_version.in_(list(versions)))
             .distinct().order_by(table.c.as_of))
    return [pd.Timestamp(t) for t in conn.execute(query).scalars()]


def holds_forecast_by(conn: Connection, *, dataset: str, as_of: datetime, version: str) -> bool:
    """Whether the stored forecast of (dataset, as_of) is model version `version`'s."""
    table = reflect_table(conn, FORECAST_RUNS)
    query = sa.select(table.c.as_of).where(table.c.dataset == dataset, table.c.model_version == version,
                                           table.c.as_of == pd.Timestamp(as_of).to_pydatetime()).limit(1)
    return conn.execute(query).first() is not None


def read_forecasts(conn: Connection, *, dataset: str, as_of: datetime | None = None) -> pd.DataFrame:
    table = reflect_table(conn, FORECASTS)
    query = sa.select(table).where(table.c.dataset == dataset)
    if as_of is not None:
        query = query.where(table.c.as_of == pd.Timestamp(as_of).to_pydatetime())
    query = query.order_by(table.c.as_of, table.c.series_id, table.c.ts)
    result = conn.execute(query)
    return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

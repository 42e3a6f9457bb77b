"""Database I/O on SQLite and on the machine's real PostgreSQL."""

from __future__ import annotations

import re
import threading
import uuid
from datetime import date, datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from forecasting import db, demo
from forecasting.config import DatasetConfig, Settings
from tests import old_schemas
from tests.conftest import pg_schema_url, schema_of

SALES = DatasetConfig.from_mapping({
    "name": "sales",
    "source": {"table": "sales", "id_column": "series_id", "time_column": "month", "target_column": "turnover"},
    "freq": "MS", "horizon": 12, "season_length": 12,
})


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_init_db_twice(engine: sa.Engine) -> None:
    for _ in range(2):
        with engine.begin() as conn:
            db.init_db(conn)
    assert {"forecast_runs", "forecast_steps", "model_scores"} <= table_names(engine)
    assert "forecasts" in sa.inspect(engine).get_view_names()
    columns = {c["name"] for c in sa.inspect(engine).get_columns("forecasts")}
    assert columns == {"dataset", "series_id", "as_of", "ts", "step", "value", "lower", "upper",
                       "model", "model_version", "mlflow_run_id", "created_at"}


def test_init_db_run_at_once_by_several_processes_on_a_new_database(pg_database: sa.URL) -> None:
    """Two `forecasting init-db` at once on a new PostgreSQL database: one failed with a raw
    "duplicate key value violates unique constraint pg_type_typname_nsp_index" (both created
    the same table). Each round on a fresh schema; four writers at once."""

    for _ in range(5):
        engine = db.make_engine(url=pg_schema_url(pg_database))
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def init() -> None:
            try:
                with engine.begin() as conn:
                    barrier.wait()
                    db.init_db(conn)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=init) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        engine.dispose()
        assert not errors, errors[0]


def test_load_demo_twice_leaves_same_rows(engine: sa.Engine) -> None:
    snapshots = []
    for _ in range(2):
        with engine.begin() as conn:
            written = demo.load_demo(conn)
        with engine.connect() as conn:
            sales = pd.read_sql("SELECT * FROM sales ORDER BY series_id, month", conn)
            weather = pd.read_sql("SELECT * FROM weather ORDER BY date", conn)
        snapshots.append((sales, weather))
    assert written == {"sales": len(snapshots[0][0]), "weather": len(snapshots[0][1])}
    assert snapshots[0][0]["series_id"].nunique() == 152  # aus_retail: one series per State x Industry
    assert len(snapshots[0][1]) == 1461  # seattle-weather: 2012-2015, daily
    pd.testing.assert_frame_equal(snapshots[0][0], snapshots[1][0])
    pd.testing.assert_frame_equal(snapshots[0][1], snapshots[1][1])
    assert list(snapshots[0][0].columns) == ["series_id", "state", "industry", "month", "turnover"]


@pytest.fixture
def small_sales(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        db.apply_sql(conn, db.SQL_DIR / "demo.sql")
        table = db.reflect_table(conn, "sales")
        rows = [
            {"series_id": sid, "state": "S", "industry": "I", "month": month.date(), "turnover": value}
            for sid, offset in (("b", 100.0), ("a", 10.0))
            for value, month in zip(range(6), pd.date_range("2020-01-01", periods=6, freq="MS"))
            for value in [offset + value]
        ]
        db.upsert(conn, table, rows, key=("series_id", "month"))
    return engine


def test_read_by_table_and_by_query_agree(small_sales: sa.Engine) -> None:
    by_query = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, turnover FROM sales WHERE state = 'S'"})})
    with small_sales.connect() as conn:
        from_table = db.read_dataset(conn, SALES)
        from_query = db.read_dataset(conn, by_query)
    pd.testing.assert_frame_equal(from_table, from_query)
    assert list(from_table.columns) == ["series_id", "ts", "value"]
    assert list(from_table["series_id"].unique()) == ["a", "b"]  # sorted by series, then time
    assert from_table["ts"].dtype == "datetime64[ns]"
    assert from_table.loc[0, "value"] == 10.0


def test_read_in_chunks_equals_read_at_once(small_sales: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks split inside series, and one chunk whose target is all NULL: the same frame."""
    with small_sales.begin() as conn:
        conn.execute(sa.text("UPDATE sales SET turnover = NULL WHERE series_id = 'b' AND month >= :m"),
                     {"m": datetime(2020, 4, 1).date()})
    query = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, turnover FROM sales ORDER BY series_id DESC, month"})})
    for config in (SALES, query):
        with small_sales.connect() as conn:
            whole = db.read_dataset(conn, config)
        monkeypatch.setattr(db, "READ_CHUNK_ROWS", 3)  # rows 10-12 (b, Apr-Jun) are the NULLs alone
        with small_sales.connect() as conn:
            chunked = db.read_dataset(conn, config)
        monkeypatch.undo()
        pd.testing.assert_frame_equal(chunked, whole)
        assert len(whole) == 12 and whole["value"].isna().sum() == 3
        assert whole["value"].dtype == "float64" and whole["ts"].dtype == "datetime64[ns]"


def test_read_up_to_as_of_drops_later_rows(small_sales: sa.Engine) -> None:
    with small_sales.connect() as conn:
        frame = db.read_dataset(conn, SALES, as_of=datetime(2020, 3, 1))
    assert frame["ts"].max() == pd.Timestamp("2020-03-01")
    assert len(frame) == 6


def test_values_after_as_of_are_not_read(small_sales: sa.Engine) -> None:
    """A past night (a backfill) neither uses nor parses rows after its as_of."""
    config = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, CASE WHEN turnover = 15 THEN 'n/a' "
                                "ELSE CAST(turnover AS VARCHAR(20)) END AS turnover FROM sales"})})
    with small_sales.connect() as conn:
        frame = db.read_dataset(conn, config, as_of=datetime(2020, 3, 1))
        assert len(frame) == 6 and frame["value"].tolist() == [10.0, 11.0, 12.0, 100.0, 101.0, 102.0]
        with pytest.raises(db.DataError, match=r"series 'a': column 'turnover' \(target_column\) is not numeric, e.g. 'n/a'"):
            db.read_dataset(conn, config)


@pytest.mark.parametrize("select", ["SELECT series_id, month, turnovr AS turnover FROM sales",
                                    "SELECT series_id, month, turnover FROM salez",
                                    "SELECT series_id, month, turnover FROM sales WHERE"])
def test_a_mistake_in_source_query_is_a_data_error_naming_it(small_sales: sa.Engine, select: str) -> None:
    """Not retried as if the database were unreachable (SQLite reports both as OperationalError),
    nor a traceback (PostgreSQL's ProgrammingError)."""
    config = SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": None, "query": select})})
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match=r"dataset 'sales': `source.query` fails: .*(turnovr|salez|syntax|incomplete input)"):
            db.read_dataset(conn, config)


def test_query_returning_a_column_twice_is_named(small_sales: sa.Engine) -> None:
    config = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, turnover, month AS month FROM sales"})})
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match=r"dataset 'sales': `source.query` returns the column 'month' more than once"):
            db.read_dataset(conn, config)


def test_single_series_dataset_is_named_after_dataset(small_sales: sa.Engine) -> None:
    config = SALES.model_copy(update={"name": "total", "source": SALES.source.model_copy(
        update={"table": None, "id_column": None,
                "query": "SELECT month, SUM(turnover) AS turnover FROM sales GROUP BY month"})})
    with small_sales.connect() as conn:
        frame = db.read_dataset(conn, config)
    assert set(frame["series_id"]) == {"total"}
    assert frame["value"].tolist() == [110.0 + 2 * i for i in range(6)]


def test_missing_table_and_column_are_named(small_sales: sa.Engine) -> None:
    missing_table = SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": "nope"})})
    missing_column = SALES.model_copy(update={"source": SALES.source.model_copy(update={"target_column": "revenue"})})
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match="dataset 'sales': table 'nope' does not exist"):
            db.read_dataset(conn, missing_table)
        # PostgreSQL made `CREATE TABLE Sales` sales; SQLite, whose names ignore case, reads it
        other_case = SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": "Sales"})})
        if conn.dialect.name == "postgresql":
            with pytest.raises(db.DataError, match=r"table 'Sales' does not exist in postgresql.*; 'sales' does: names are case-sensitive"):
                db.read_dataset(conn, other_case)
        else:
            assert len(db.read_dataset(conn, other_case)) == 12
        with pytest.raises(db.DataError, match=r"`source.target_column` \('revenue'\) not found in sales"):
            db.read_dataset(conn, missing_column)


def test_non_numeric_target_names_dataset_series_and_value(small_sales: sa.Engine) -> None:
    config = SALES.model_copy(update={"source": SALES.source.model_copy(update={"target_column": "industry"})})
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match=r"dataset 'sales', series 'a': column 'industry' \(target_column\) is not numeric, e.g. 'I'"):
            db.read_dataset(conn, config)


def test_a_numeric_time_column_is_refused_naming_it_and_how_to_convert(small_sales: sa.Engine) -> None:
    """Seconds since 1970 in an INTEGER column were read as nanoseconds: every timestamp in
    January 1970, and the checks then complained about 1970 (off the grid, duplicates)."""
    epoch = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, CAST(turnover * 1000000 AS INTEGER) AS month, turnover FROM sales"})})
    with small_sales.connect() as conn:
        for read in (lambda: db.read_dataset(conn, epoch), lambda: db.read_times(conn, epoch, until=datetime(2030, 1, 1))):
            with pytest.raises(db.DataError, match=r"dataset 'sales': column 'month' \(time_column\) holds values "
                               r"that are not timestamps: numbers \(e.g. \d+\), not dates or timestamps; convert "
                               r"them in `source.query`"):
                read()


def test_null_series_id_or_time_is_named(small_sales: sa.Engine) -> None:
    """A NULL id would become a series no check sees; a NULL time, a crash naming nothing."""
    def from_query(select: str) -> DatasetConfig:
        return SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": None, "query": select})})

    null_id = from_query("SELECT CASE WHEN turnover = 12 THEN NULL ELSE series_id END AS series_id, "
                         "month, turnover FROM sales")
    null_time = from_query("SELECT series_id, CASE WHEN turnover = 12 THEN NULL ELSE month END AS month, "
                           "turnover FROM sales")
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match=r"dataset 'sales': column 'series_id' \(id_column\) is NULL in 1 row"):
            db.read_dataset(conn, null_id)
        with pytest.raises(db.DataError, match=r"dataset 'sales', series 'a': column 'month' \(time_column\) "
                                               r"is NULL in 1 row"):
            db.read_dataset(conn, null_time, as_of=datetime(2020, 6, 1))


def test_series_ids_the_output_tables_cannot_hold_are_named_at_the_read(small_sales: sa.Engine) -> None:
    """An empty id failed model_scores' aggregate check, a 300-character one PostgreSQL's
    VARCHAR(255): both at the write, after the night's training."""
    def from_query(select: str) -> DatasetConfig:
        return SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": None, "query": select})})

    empty = from_query("SELECT CASE WHEN series_id = 'a' THEN '' ELSE series_id END AS series_id, month, turnover FROM sales")
    long = from_query(f"SELECT CASE WHEN series_id = 'a' THEN '{'x' * 300}' ELSE series_id END AS series_id, "
                      "month, turnover FROM sales")
    with small_sales.connect() as conn:
        with pytest.raises(db.DataError, match=r"dataset 'sales', series '': column 'series_id' \(id_column\) must be "
                                               r"1 to 255 characters \(6 row\(s\)"):
            db.read_dataset(conn, empty)
        with pytest.raises(db.DataError, match=r"series 'x{60}'\.\.\. \(300 characters\)"):
            db.read_dataset(conn, long)


def test_a_colon_word_in_source_query_is_sql_not_a_bind_parameter(small_sales: sa.Engine) -> None:
    config = SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": None, "query": (
        "SELECT series_id, month, turnover FROM sales WHERE industry <> 'store :north'")})})
    with small_sales.connect() as conn:
        assert len(db.read_dataset(conn, config)) == 12


def test_text_timestamps_with_an_offset_are_read_on_the_wall_clock_of_source_timezone() -> None:
    """SQLite keeps times as text: one with an offset was read in UTC, off the local grid."""
    config = DatasetConfig.from_mapping({
        "name": "readings", "source": {"table": "r", "id_column": "sid", "time_column": "d", "target_column": "y",
                                       "timezone": "Europe/Berlin"},
        "freq": "D", "horizon": 3, "season_length": 7})
    frame = pd.DataFrame({"sid": "a", "d": ["2020-01-01 00:00:00+01:00", "2020-07-02 00:00:00+02:00",
                                            "2020-07-03 00:00:00+02:00"], "y": [1.0, 2.0, 3.0]})
    out = db.to_long_frame(frame, config)
    assert out["ts"].tolist() == [pd.Timestamp("2020-01-01"), pd.Timestamp("2020-07-02"), pd.Timestamp("2020-07-03")]
    naive = frame.assign(d=["2020-01-01 00:00:00", "2020-07-02 00:00:00", "2020-07-03 00:00:00"])
    assert db.to_long_frame(naive, config)["ts"].dt.day.tolist() == [1, 2, 3]


def test_pg_timestamptz_is_read_on_the_wall_clock_of_source_timezone(pg_url: str) -> None:
    """Monthly local midnights in a timestamptz (both daylight-saving offsets): on the dataset's
    zone they are the monthly grid, whatever the reading session's zone; in UTC, the day before."""
    from forecasting.pipeline import parse_as_of
    from forecasting.validate import validate

    engine = db.make_engine(url=pg_url)
    months = pd.date_range("2019-01-01", periods=36, freq="MS")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE readings (sid TEXT, d TIMESTAMPTZ, y DOUBLE PRECISION)")
        conn.exec_driver_sql("SET LOCAL TIME ZONE 'Europe/Berlin'")
        conn.execute(sa.text("INSERT INTO readings VALUES ('a', CAST(:d AS TIMESTAMP), :y)"),
                     [{"d": month.to_pydatetime(), "y": float(i)} for i, month in enumerate(months)])
    source = {"table": "readings", "id_column": "sid", "time_column": "d", "target_column": "y"}
    local = DatasetConfig.from_mapping({"name": "readings", "source": {**source, "timezone": "Europe/Berlin"},
                                        "freq": "MS", "horizon": 3, "season_length": 12})
    utc = local.model_copy(update={"source": local.source.model_copy(update={"timezone": "UTC"})})
    with engine.connect() as conn:  # the session's zone: the server's default (UTC here)
        on_local = db.read_dataset(conn, local)
        on_utc = db.read_dataset(conn, utc)
        up_to = db.read_dataset(conn, local, as_of=parse_as_of("2020-06-01T00:00+02:00", "Europe/Berlin"))
    engine.dispose()
    assert on_local["ts"].tolist() == list(months)
    assert validate(on_local, local, input_window=12, as_of=None).problems == []
    assert on_utc["ts"].iloc[0] == pd.Timestamp("2018-12-31 23:00")  # CET, +01:00
    assert on_utc["ts"].iloc[5] == pd.Timestamp("2019-05-31 22:00")  # CEST, +02:00
    assert up_to["ts"].max() == pd.Timestamp("2020-06-01")


# past sqlparse's 10,000 tokens, which it refuses to strip of comments: the CLI's source check
# failed on such a query (a long IN list) with a traceback
LONG_IN_LIST = " AND turnover NOT IN (" + ", ".join(str(-n) for n in range(1, 6000)) + ")"


@pytest.mark.parametrize("long", [False, True], ids=["short", "past-10000-tokens"])
@pytest.mark.parametrize("ending", ["", ";", "  -- the demo table", "; -- the demo table", "\n/* note */ ;\n"])
def test_a_query_source_is_checked_and_its_times_read_whatever_its_ending(small_sales: sa.Engine, ending: str,
                                                                          long: bool) -> None:
    """check_source and read_times wrap source.query as a subquery: a final ';' or comment,
    which a query run as written may have, broke them."""
    by_query = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, turnover FROM sales WHERE series_id = 'a' "
                                "AND industry <> 'x -- y'" + (LONG_IN_LIST if long else "") + ending})})
    with small_sales.connect() as conn:
        for config in (SALES, by_query):
            db.check_source(conn, config)
            times = db.read_times(conn, config, until=datetime(2020, 4, 15))
            assert list(times) == list(pd.date_range("2020-01-01", periods=4, freq="MS"))
        assert len(db.read_dataset(conn, by_query)) == 6


def test_times_of_a_table_made_by_create_table_as_select(small_sales: sa.Engine) -> None:
    """SQLite declares the columns of CREATE TABLE ... AS SELECT by affinity: `month NUM`.
    read_times read the column through that type (a decimal conversion of '2020-01-01') and
    every backfill on such a table failed with "must be real number, not str"."""
    with small_sales.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE sales_copy AS SELECT * FROM sales")
    copy = SALES.model_copy(update={"source": SALES.source.model_copy(update={"table": "sales_copy"})})
    with small_sales.connect() as conn:
        times = db.read_times(conn, copy, until=datetime(2020, 4, 15))
        assert list(times) == list(pd.date_range("2020-01-01", periods=4, freq="MS"))
        assert len(db.read_dataset(conn, copy)) == 12


def test_times_of_a_text_target_leave_out_null_as_the_load_does(engine: sa.Engine) -> None:
    """read_dataset parses a VARCHAR target; read_times compared it with a float (NaN) on
    PostgreSQL, an error there, so every backfill of such a source failed."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE readings (sid VARCHAR(8), day DATE, y VARCHAR(16))")
        conn.exec_driver_sql("INSERT INTO readings VALUES ('a', '2020-01-01', '1.5'), ('a', '2020-01-02', NULL), "
                             "('a', '2020-01-05', '2.5')")
    config = DatasetConfig.from_mapping({"name": "readings", "freq": "D", "horizon": 2, "season_length": 7,
                                         "source": {"table": "readings", "id_column": "sid", "time_column": "day",
                                                    "target_column": "y"}})
    with engine.connect() as conn:
        times = db.read_times(conn, config, until=datetime(2020, 2, 1))
        loaded = db.read_dataset(conn, config)
    assert list(times) == [pd.Timestamp("2020-01-01"), pd.Timestamp("2020-01-05")]
    assert list(loaded.loc[loaded["value"].notna(), "ts"]) == list(times)


def test_days_counted_in_another_zone_than_source_timezone_are_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """Tokyo's midnights (timestamptz) read on UTC's clock are 15:00 the day before: a daily grid
    validation accepts, so every day was labelled, and every forecast dated, a day early."""
    from tests.flow_fixtures import tiny_config

    tokyo_days = pd.Series(pd.date_range("2021-03-01", periods=3, freq="D", tz="Asia/Tokyo"))
    source = {"table": "weather", "time_column": "day", "target_column": "t"}
    with caplog.at_level("WARNING", logger="forecasting.db"):
        times = db._source_times(tokyo_days, tiny_config(freq="D", season_length=7, source=source))
    assert times.iloc[0] == pd.Timestamp("2021-02-28 15:00")  # what it reads (not refused: 15:00 readings exist)
    assert "3 of them not at midnight on the clock of `source.timezone` ('UTC'), e.g. 2021-02-28 15:00:00" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="forecasting.db"):
        times = db._source_times(tokyo_days, tiny_config(freq="D", season_length=7,
                                                         source={**source, "timezone": "Asia/Tokyo"}))
        db._source_times(tokyo_days.dt.tz_localize(None), tiny_config(freq="D", season_length=7, source=source))
    assert times.iloc[0] == pd.Timestamp("2021-03-01") and not caplog.text  # its zone, or naive times: silent


def test_text_times_in_several_iso_forms_are_read() -> None:
    """SQLite text written by two tools: pandas took the first value's format for all, and the
    dataset was refused as "not timestamps". A value in no ISO form is still refused."""
    times = db.naive_times(pd.Series(["2018-06-01", "2018-07-01 00:00:00", "2018-08-01T00:00:00"]), "UTC")
    assert list(times) == list(pd.date_range("2018-06-01", periods=3, freq="MS"))
    with pytest.raises(ValueError):
        db.naive_times(pd.Series(["2018-06-01", "June 2018"]), "UTC")


def test_times_of_rows_without_a_target_are_no_backfill_nights(small_sales: sa.Engine) -> None:
    """Future rows (covariates known ahead, no target yet) made their dates backfill nights,
    which then read up to the last observation and ran its night again."""
    with small_sales.begin() as conn:  # July NULL; August NaN where the column can hold one (PostgreSQL)
        db.upsert(conn, db.reflect_table(conn, "sales"), [{"series_id": sid, "state": "S", "industry": "I",
                  "month": date(2020, month, 1), "turnover": None} for sid in ("a", "b")
                  for month in (7, 8)], key=("series_id", "month"))
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("UPDATE sales SET turnover = 'NaN' WHERE month = '2020-08-01'")
    by_query = SALES.model_copy(update={"source": SALES.source.model_copy(update={
        "table": None, "query": "SELECT series_id, month, turnover FROM sales"})})
    with small_sales.connect() as conn:
        for config in (SALES, by_query):
            times = db.read_times(conn, config, until=datetime(2020, 12, 1))
            assert list(times) == list(pd.date_range("2020-01-01", periods=6, freq="MS"))


def test_a_backfill_dates_effective_as_of_is_the_last_data_time_at_or_before_it() -> None:
    """Daily data stamped 06:00 and a backfill from midnight: each night stores its forecast
    under the data's time before it, which is what production's nights are compared with."""
    from forecasting.pipeline import effective_as_ofs

    times = pd.date_range("2019-04-28 06:00", periods=6, freq="D")
    nights = list(pd.date_range("2019-05-01", periods=3, freq="D"))
    assert effective_as_ofs(nights, times) == list(pd.date_range("2019-04-30 06:00", periods=3, freq="D"))


def test_backfill_nights_skip_dates_without_data_of_their_own() -> None:
    from forecasting.pipeline import backfill_nights

    times = pd.DatetimeIndex(["2020-02-01", "2020-03-01", "2020-05-01"])  # April missing: a gap
    dates = pd.date_range("2020-01-01", "2020-07-01", freq="MS")
    run, skipped = backfill_nights(dates, times, "MS")
    assert [d.strftime("%m") for d in run] == ["02", "03", "05"]
    assert [d.strftime("%m") for d in skipped] == ["01", "04", "06", "07"]
    # a range that starts after the data's end, or in a gap: its first date too
    assert backfill_nights(pd.date_range("2020-06-01", "2020-07-01", freq="MS"), times, "MS") == (
        [], list(pd.date_range("2020-06-01", "2020-07-01", freq="MS")))
    assert backfill_nights(pd.date_range("2020-04-01", "2020-05-01", freq="MS"), times, "MS")[0] == [
        pd.Timestamp("2020-05-01")]
    # daily data, weekly nights: a week with any day of data runs
    days = pd.DatetimeIndex(["2020-01-01", "2020-01-02", "2020-01-10"])
    weeks = pd.date_range("2020-01-05", "2020-01-26", freq="W-SUN")
    assert backfill_nights(weeks, days, "W-SUN")[0] == [pd.Timestamp("2020-01-05"), pd.Timestamp("2020-01-12")]


def test_invalid_identifier_is_refused(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="not a valid SQL identifier"):
            db.reflect_table(conn, 'x"; DROP TABLE t;--')


def forecast_rows(value: float, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({
        "series_id": ["a"] * n,
        "ts": pd.date_range("2021-01-01", periods=n, freq="MS"),
        "step": range(1, n + 1),
        "value": [value] * n,
        "lower": [value - 1] * n,
        "upper": [value + 1] * n,
        "model": "lstm", "model_version": "1", "mlflow_run_id": "r1",
    })


def score_rows(mase: float) -> pd.DataFrame:
    return pd.DataFrame({
        "model": ["lstm", "lstm"], "series_id": ["a", None], "mae": [1.0, 1.0], "rmse": [1.0, 1.0],
        "smape": [1.0, 1.0], "mase": [mase, mase], "is_champion": [True, True], "mlflow_run_id": ["r1", "r1"],
    })


def test_upsert_twice_keeps_one_row_per_key_with_newer_value(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    as_of = datetime(2020, 12, 1)
    for value in (1.0, 2.0):
        with engine.begin() as conn:
            written = db.write_run(conn, dataset="sales", as_of=as_of,
                                   forecasts=forecast_rows(value), scores=score_rows(value))
        assert written == (3, 2)
    with engine.connect() as conn:
        rows = db.read_forecasts(conn, dataset="sales", as_of=as_of)
        scores = pd.read_sql("SELECT * FROM model_scores", conn)
    assert len(rows) == 3 and rows["value"].tolist() == [2.0, 2.0, 2.0]
    assert pd.to_datetime(rows["as_of"]).eq(pd.Timestamp(as_of)).all()
    assert len(scores) == 2 and scores["mase"].tolist() == [2.0, 2.0]
    assert scores["series_id"].isna().sum() == 1  # the aggregate row


def test_forecasts_replaced_without_scores_flag_the_model_that_made_them(engine: sa.Engine) -> None:
    """`forecasting predict` replaces an as_of's forecasts, not its scores: is_champion used to
    keep marking the night's model after another (the alias moved by hand) made the forecast."""
    with engine.begin() as conn:
        db.init_db(conn)
    as_of = datetime(2020, 12, 1)
    night = pd.concat([score_rows(1.0), score_rows(2.0).assign(model="gru", is_champion=False, mlflow_run_id="r2")])

    def flagged() -> list[tuple[str, object]]:
        with engine.connect() as conn:
            rows = pd.read_sql("SELECT model, series_key FROM model_scores WHERE is_champion ORDER BY model, series_key", conn)
        return list(rows.itertuples(index=False, name=None))

    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=as_of, forecasts=forecast_rows(1.0), scores=night)
    assert flagged() == [("lstm", ""), ("lstm", "a")]
    with engine.begin() as conn:  # the same champion again: the same flags
        db.write_run(conn, dataset="sales", as_of=as_of, forecasts=forecast_rows(1.0), scores=None)
    assert flagged() == [("lstm", ""), ("lstm", "a")]
    with engine.begin() as conn:  # tonight's gru, promoted by hand, forecasts
        db.write_run(conn, dataset="sales", as_of=as_of, scores=None,
                     forecasts=forecast_rows(2.0).assign(model="gru", model_version="2", mlflow_run_id="r2"))
    assert flagged() == [("gru", ""), ("gru", "a")]
    with engine.begin() as conn:  # an older version, which no score row of this as_of describes
        db.write_run(conn, dataset="sales", as_of=as_of, scores=None,
                     forecasts=forecast_rows(3.0).assign(model="rnn", model_version="0", mlflow_run_id="r0"))
    assert flagged() == []


def test_upsert_refuses_a_column_the_table_has_not(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
        table = db.reflect_table(conn, "actuals")
        bad = pd.DataFrame({"dataset": ["d"], "series_id": ["s"], "ts": [datetime(2020, 1, 1)],
                            "value": [1.0], 'value") FROM actuals; --': [2.0]})
        with pytest.raises(ValueError, match=r"upsert into 'actuals'.*'value\"\) FROM actuals; --'"):
            db.upsert(conn, table, bad, key=("dataset", "series_id", "ts"))
        with pytest.raises(ValueError, match="columns the table has not"):
            db.upsert(conn, table, [{"dataset": "d", "series_id": "s", "ts": datetime(2020, 1, 1), "nope": 1}],
                      key=("dataset", "series_id", "ts"))
        assert conn.execute(sa.text("SELECT COUNT(*) FROM actuals")).scalar_one() == 0


def test_upsert_by_itself_updates_in_place(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.apply_sql(conn, db.SQL_DIR / "demo.sql")
        table = db.reflect_table(conn, "weather")
        for wind in (1.0, 5.0):
            db.upsert(conn, table, [{"date": datetime(2020, 1, 1).date(), "temp_max": 1.0,
                                     "temp_min": 0.0, "precipitation": 0.0, "wind": wind}], key=("date",))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*), MAX(wind) FROM weather")).one() == (1, 5.0)


def test_rewrite_with_fewer_series_removes_stale_rows(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    as_of = datetime(2020, 12, 1)
    two_series = pd.concat([forecast_rows(1.0), forecast_rows(1.0).assign(series_id="b")])
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=as_of, forecasts=two_series, scores=score_rows(1.0))
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=as_of, forecasts=forecast_rows(3.0), scores=score_rows(3.0))
    with engine.connect() as conn:
        rows = db.read_forecasts(conn, dataset="sales")
    assert set(rows["series_id"]) == {"a"} and len(rows) == 3


def first_night(engine: sa.Engine) -> None:
    """A new database holding one forecast: sales, as_of 2020-12-01, value 1.0."""
    with engine.begin() as conn:
        db.init_db(conn)
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=forecast_rows(1.0), scores=None)


def stored_runs(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql("SELECT run_key, dataset, as_of, model FROM forecast_runs ORDER BY dataset", conn)


def stored_steps(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql("SELECT run_key, series_id, value FROM forecast_steps ORDER BY run_key, series_id", conn)


def test_a_rerun_replaces_the_run_and_its_steps_under_a_new_key(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    as_of = datetime(2020, 12, 1)
    with engine.begin() as conn:
        db.write_run(conn, dataset="weather", as_of=as_of, forecasts=forecast_rows(7.0), scores=None)
        db.write_run(conn, dataset="sales", as_of=as_of, scores=None,
                     forecasts=pd.concat([forecast_rows(1.0), forecast_rows(1.0).assign(series_id="b")]))
    first = stored_runs(engine).set_index("dataset")["run_key"]
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=as_of, scores=None,
                     forecasts=forecast_rows(3.0).assign(model="gru", model_version="2", mlflow_run_id="r2"))
    runs = stored_runs(engine).set_index("dataset")
    assert list(runs.index) == ["sales", "weather"] and runs.loc["sales", "model"] == "gru"
    assert runs.loc["sales", "run_key"] != first["sales"] and runs.loc["weather", "run_key"] == first["weather"]
    steps = stored_steps(engine)  # the first run's steps went with it: none is left without a run
    assert set(steps["run_key"]) == {runs.loc["sales", "run_key"], first["weather"]}
    assert steps.groupby("run_key")["value"].apply(list).to_dict() == {
        runs.loc["sales", "run_key"]: [3.0] * 3, first["weather"]: [7.0] * 3}
    with engine.connect() as conn:
        view = db.read_forecasts(conn, dataset="sales", as_of=as_of)
    assert view[["series_id", "value", "model", "model_version", "mlflow_run_id"]].drop_duplicates().values.tolist() \
        == [["a", 3.0, "gru", "2", "r2"]]


def test_the_database_holds_one_forecast_per_dataset_series_as_of_and_ts(engine: sa.Engine) -> None:
    """The view has no key of its own: the tables' keys give it one, whoever writes them."""
    first_night(engine)
    run_key = int(stored_runs(engine)["run_key"].iloc[0])
    second_run = ("INSERT INTO forecast_runs (run_key, dataset, as_of, model) "
                  "VALUES (1, 'sales', '2020-12-01 00:00:00', 'gru')")
    second_step = (f"INSERT INTO forecast_steps (run_key, series_id, ts, step, value) "
                   f"VALUES ({run_key}, 'a', '2021-01-01 00:00:00', 1, 5.0)")
    for statement in (second_run, second_step):
        with pytest.raises(sa.exc.IntegrityError, match=r"UNIQUE constraint failed|duplicate key value"):
            with engine.begin() as conn:
                conn.exec_driver_sql(statement)
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales")["value"].tolist() == [1.0] * 3


def test_rows_of_two_models_in_one_write_are_refused_naming_them(engine: sa.Engine) -> None:
    first_night(engine)
    mixed = pd.concat([forecast_rows(2.0), forecast_rows(2.0).assign(series_id="b", model="gru")])
    with pytest.raises(ValueError, match=r"dataset 'sales', as_of 2020-12-01 00:00:00: the forecast rows name 2 "
                                         r"models \(model='lstm'.*model='gru'.*one forecast is made by one model"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=mixed, scores=None)
    with pytest.raises(ValueError, match=r"the forecast rows hold column\(s\) \['dataset', 'vlaue'\]"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), scores=None,
                         forecasts=forecast_rows(2.0).assign(dataset="sales", vlaue=2.0))
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales")["value"].tolist() == [1.0] * 3


def test_a_series_forecast_twice_at_one_ts_is_refused_before_anything_is_written(engine: sa.Engine) -> None:
    """upsert kept the last of such rows; a new run's COPY failed on the second, half-way."""
    first_night(engine)
    twice = pd.concat([forecast_rows(2.0), forecast_rows(2.0).assign(series_id="b"), forecast_rows(3.0).iloc[[1]]])
    with pytest.raises(db.DataError, match=r"dataset 'sales', series 'a': 2 forecast rows share their \(series_id, "
                                           r"ts\), e.g. ts 2021-02-01 00:00:00: one row per series and step"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=twice, scores=None)
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales")["value"].tolist() == [1.0] * 3


def test_an_empty_forecast_replaces_the_as_ofs_with_none(engine: sa.Engine) -> None:
    first_night(engine)
    with engine.begin() as conn:
        assert db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), scores=None,
                            forecasts=forecast_rows(1.0).iloc[:0]) == (0, 0)
    assert stored_runs(engine).empty and stored_steps(engine).empty


def test_analysts_query_the_forecasts_view_by_as_of_text_on_both_databases(engine: sa.Engine) -> None:
    """README's query: `WHERE as_of = '2018-12-01 00:00:00'`, the timestamps as each database keeps them."""
    first_night(engine)
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT COUNT(*) FROM forecasts WHERE as_of = '2020-12-01 00:00:00'")).scalar_one()
        as_of, ts = conn.execute(sa.text("SELECT as_of, ts FROM forecasts WHERE step = 2")).one()
    assert count == 3
    if engine.dialect.name == "sqlite":  # text, as the TIMESTAMP type stores it
        assert (as_of, ts) == ("2020-12-01 00:00:00", "2021-02-01 00:00:00")
    else:
        assert (as_of, ts) == (datetime(2020, 12, 1), datetime(2021, 2, 1))


def older_database(engine: sa.Engine) -> pd.DataFrame:
    """The tables as migration 001 left them (the forecasts table, a view on it) and three
    stored forecasts; their rows."""
    rows = pd.concat([
        forecast_rows(1.0).assign(dataset="sales", as_of=datetime(2020, 11, 1), created_at=datetime(2020, 11, 2)),
        pd.concat([forecast_rows(2.0), forecast_rows(2.5).assign(series_id="b", lower=None, upper=None)]).assign(
            dataset="sales", as_of=datetime(2020, 12, 1), model="gru", model_version=None,
            created_at=datetime(2020, 12, 2, 3, 4, 5)),
        forecast_rows(9.0).assign(dataset="weather", as_of=datetime(2020, 12, 1), mlflow_run_id="w",
                                  created_at=datetime(2020, 12, 2)),
    ], ignore_index=True)
    with engine.begin() as conn:
        db.init_db(conn)
        old_schemas.forecasts_as_a_table(conn)
        conn.exec_driver_sql("CREATE VIEW current_forecasts AS SELECT * FROM forecasts")
        db.upsert(conn, db.reflect_table(conn, "forecasts"), rows, key=("dataset", "series_id", "as_of", "ts"))
    return old_forecasts(engine)


def old_forecasts(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql("SELECT * FROM forecasts ORDER BY dataset, as_of, series_id, ts", conn)


def test_init_db_moves_an_older_databases_forecasts_into_runs_and_steps(engine: sa.Engine) -> None:
    before = older_database(engine)
    with engine.begin() as conn:
        assert db.init_db(conn) == ["002_forecast_runs_and_steps.sql"]
    assert "forecasts" in sa.inspect(engine).get_view_names() and "forecasts" not in table_names(engine)
    pd.testing.assert_frame_equal(old_forecasts(engine), before)  # the same rows, columns and types
    runs = stored_runs(engine)
    assert len(runs) == 3 and len(stored_steps(engine)) == len(before)
    with engine.begin() as conn:  # the next night's rerun of a moved as_of, beside the moved keys
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=forecast_rows(4.0), scores=None)
        assert db.init_db(conn) == []
    after = old_forecasts(engine)

    def rerun_as_of(rows: pd.DataFrame) -> pd.Series:
        return (rows["dataset"] == "sales") & rows["as_of"].astype(str).str.startswith("2020-12-01")

    assert after.loc[rerun_as_of(after), "value"].tolist() == [4.0] * 3
    pd.testing.assert_frame_equal(after[~rerun_as_of(after)].reset_index(drop=True),
                                  before[~rerun_as_of(before)].reset_index(drop=True))


def test_init_db_keeps_views_built_on_ours_and_the_grants_of_the_old_table_on_postgresql(pg_url: str) -> None:
    """PostgreSQL binds views to the table itself: dropping our views over the old table failed on
    a view of an analyst's built on one of them, and dropping the table lost its GRANTs. Run by a
    superuser, init-db left the new tables to it, and the pipeline's role without access."""
    engine = db.make_engine(url=pg_url)
    older_database(engine)
    reader, pipeline_role = f"reader_{uuid.uuid4().hex[:8]}", f"pipeline_{uuid.uuid4().hex[:8]}"
    schema = schema_of(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW my_newest AS SELECT series_id, value FROM current_forecasts")
        for role in (reader, pipeline_role):
            conn.exec_driver_sql(f'CREATE ROLE "{role}"')
        conn.exec_driver_sql(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{pipeline_role}"')
        conn.exec_driver_sql(f'ALTER TABLE forecasts OWNER TO "{pipeline_role}"')
        conn.exec_driver_sql(f'GRANT SELECT ON forecasts TO "{reader}" WITH GRANT OPTION')
        conn.exec_driver_sql(f'GRANT INSERT, DELETE ON forecasts TO "{reader}"')
    try:
        with engine.begin() as conn:
            assert db.init_db(conn) == ["002_forecast_runs_and_steps.sql"]
            privileges = conn.execute(sa.text(
                "SELECT table_name, string_agg(privilege_type || is_grantable, ',' ORDER BY privilege_type) "
                "FROM information_schema.role_table_grants WHERE grantee = :role GROUP BY table_name ORDER BY 1"
            ), {"role": reader}).all()
            owners = conn.execute(sa.text(
                "SELECT relname, pg_get_userbyid(relowner) FROM pg_class WHERE relname IN "
                "('forecast_runs', 'forecast_steps', 'forecasts') AND relnamespace = CAST(:schema AS regnamespace) ORDER BY 1"
            ), {"schema": schema}).all()
            newest = pd.read_sql("SELECT * FROM my_newest ORDER BY series_id", conn)
            definition = conn.execute(sa.text("SELECT pg_get_viewdef('current_forecasts')")).scalar_one()
    finally:
        with engine.begin() as conn:
            for role in (reader, pipeline_role):  # the tables it now owns, and the views on them, go too
                conn.exec_driver_sql(f'DROP OWNED BY "{role}" CASCADE')
                conn.exec_driver_sql(f'DROP ROLE "{role}"')
    assert privileges == [("forecast_runs", "DELETENO,INSERTNO,SELECTYES"),
                          ("forecast_steps", "DELETENO,INSERTNO,SELECTYES"), ("forecasts", "SELECTYES")]
    assert owners == [(name, pipeline_role) for name in ("forecast_runs", "forecast_steps", "forecasts")]
    assert newest.values.tolist() == [["a", 2.0]] * 3 + [["a", 9.0]] * 3 + [["b", 2.5]] * 3
    assert "forecast_runs" in definition  # replaced in place by views.sql's, not left on the old table
    engine.dispose()


def test_init_db_carries_column_privileges_of_the_old_table_to_the_columns_that_hold_them_on_postgresql(
        pg_url: str) -> None:
    """A role allowed some columns of the old table (GRANT SELECT (series_id, value) ...) lost
    them: only table-wide privileges were carried to the two tables and the view."""
    engine = db.make_engine(url=pg_url)
    older_database(engine)
    analyst = f"analyst_{uuid.uuid4().hex[:8]}"
    schema = schema_of(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{analyst}"')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{analyst}"')
        conn.exec_driver_sql(f'GRANT SELECT (series_id, value, as_of) ON forecasts TO "{analyst}" WITH GRANT OPTION')
        conn.exec_driver_sql(f'GRANT UPDATE (value) ON forecasts TO "{analyst}"')
    try:
        with engine.begin() as conn:
            assert db.init_db(conn) == ["002_forecast_runs_and_steps.sql"]
            privileges = conn.execute(sa.text(
                "SELECT table_name, privilege_type, string_agg(column_name || is_grantable, ',' ORDER BY column_name) "
                "FROM information_schema.column_privileges WHERE grantee = :role "
                "GROUP BY table_name, privilege_type ORDER BY 1, 2"), {"role": analyst}).all()
            conn.exec_driver_sql(f'SET LOCAL ROLE "{analyst}"')
            seen = conn.exec_driver_sql("SELECT series_id, value FROM forecasts WHERE as_of = '2020-12-01' "
                                        "ORDER BY series_id, value").all()
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), conn.begin_nested():
                conn.exec_driver_sql("SELECT model FROM forecasts")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{analyst}" CASCADE')
            conn.exec_driver_sql(f'DROP ROLE "{analyst}"')
        engine.dispose()
    assert privileges == [
        ("forecast_runs", "SELECT", "as_ofYES"),
        ("forecast_steps", "SELECT", "series_idYES,valueYES"),
        ("forecast_steps", "UPDATE", "valueNO"),
        ("forecasts", "SELECT", "as_ofYES,series_idYES,valueYES"),
    ]
    assert seen == [("a", 2.0)] * 3 + [("a", 9.0)] * 3 + [("b", 2.5)] * 3


def test_init_db_by_a_role_that_does_not_own_the_old_table_is_told_whom_to_run_it_as_on_postgresql(
        pg_url: str) -> None:
    """It was told to GRANT CREATE ON SCHEMA, which it had."""
    engine = db.make_engine(url=pg_url)
    before = older_database(engine)
    role = f"other_{uuid.uuid4().hex[:8]}"
    url = sa.make_url(pg_url)
    schema = schema_of(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}"')
        conn.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    other = db.make_engine(url=url.set(username=role).render_as_string(hide_password=False))
    try:
        with pytest.raises(db.DatabaseError, match=r"cannot apply the migration 002_forecast_runs_and_steps.sql: "
                                                   r"must be owner of table forecasts\. Run init-db as the role that "
                                                   r"owns the pipeline's tables"):
            with other.begin() as conn:
                db.init_db(conn)
    finally:
        other.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
    pd.testing.assert_frame_equal(old_forecasts(engine), before)
    engine.dispose()


def test_init_db_names_a_view_of_analysts_on_the_old_forecasts_table_on_postgresql(pg_url: str) -> None:
    engine = db.make_engine(url=pg_url)
    before = older_database(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW my_monthly_report AS SELECT series_id, value FROM forecasts")
    with pytest.raises(db.DatabaseError, match=r"migration 002_forecast_runs_and_steps.sql.*depend on it "
                                               r"\(view my_monthly_report depends on table forecasts_before_002"):
        with engine.begin() as conn:
            db.init_db(conn)
    assert "forecasts" in table_names(engine) and "forecast_runs" not in table_names(engine)
    pd.testing.assert_frame_equal(old_forecasts(engine), before)
    engine.dispose()


def test_init_db_refuses_an_as_of_that_several_models_forecast_naming_it(engine: sa.Engine) -> None:
    """Taken apart, MIN(model), MIN(model_version) and MIN(mlflow_run_id) of such an as_of named one
    run that never existed."""
    before = older_database(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE forecasts SET model = 'rnn' WHERE series_id = 'b'")
    with pytest.raises(db.DatabaseError, match=r"cannot apply the migration 002_forecast_runs_and_steps.sql: the "
                                               r"stored rows break a constraint \(.*(forecast_runs.dataset, "
                                               r"forecast_runs.as_of|\(dataset, as_of\)=\(sales, 2020-12-01).*"
                                               r"Nothing was changed"):
        with engine.begin() as conn:
            db.init_db(conn)
    assert "forecast_runs" not in table_names(engine)
    assert len(old_forecasts(engine)) == len(before)
    engine.dispose()


def test_write_failure_leaves_nothing_and_the_previous_run_stays(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    bad = forecast_rows(1.0)
    bad.loc[2, "step"] = 0  # violates CHECK (step >= 1) after two good rows
    with pytest.raises(sa.exc.IntegrityError, match=r"CHECK constraint failed|violates check constraint"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=bad, scores=score_rows(1.0))
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales").empty
        assert conn.execute(sa.text("SELECT COUNT(*) FROM model_scores")).scalar_one() == 0
    # The same failure over a committed run: its DELETE goes back with the rest.
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=forecast_rows(2.0),
                     scores=score_rows(2.0))
    with pytest.raises(sa.exc.IntegrityError, match=r"CHECK constraint failed|violates check constraint"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=datetime(2020, 12, 1), forecasts=bad, scores=score_rows(1.0))
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales")["value"].tolist() == forecast_rows(2.0)["value"].tolist()
        assert conn.execute(sa.text("SELECT COUNT(*) FROM model_scores")).scalar_one() == len(score_rows(2.0))


@pytest.mark.parametrize(("column", "bad"), [("value", float("nan")), ("value", float("inf")),
                                            ("upper", float("inf")), ("lower", float("-inf"))])
def test_non_finite_forecast_is_refused_and_the_previous_run_stays(engine: sa.Engine, column: str, bad: float) -> None:
    """Both databases would store an infinity without complaint; nothing of the run is written."""
    with engine.begin() as conn:
        db.init_db(conn)
    as_of = datetime(2020, 12, 1)
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=as_of, forecasts=forecast_rows(1.0), scores=score_rows(1.0))
    broken = forecast_rows(2.0)
    broken.loc[1, column] = bad
    with pytest.raises(db.DataError, match=rf"dataset 'sales', series 'a': forecast column '{column}' is "
                                           rf"{re.escape(str(bad))} at ts 2021-02-01 00:00:00 \(1 such row\(s\)\); nothing was written"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=as_of, forecasts=broken, scores=score_rows(2.0))
    with engine.connect() as conn:
        kept = db.read_forecasts(conn, dataset="sales")
    assert kept["value"].tolist() == [1.0] * 3


def test_write_refuses_an_as_of_with_a_zone(engine: sa.Engine) -> None:
    """A zone-aware as_of would be compared with the tables' naive timestamps in the session's
    zone by the DELETE, but written as its wall clock: the previous run's rows could survive."""
    with engine.begin() as conn:
        db.init_db(conn)
    aware = pd.Timestamp("2020-12-01", tz="Europe/Berlin").to_pydatetime()
    with pytest.raises(ValueError, match=r"dataset 'sales': `as_of` \(.*\) must be naive"):
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=aware, forecasts=forecast_rows(1.0), scores=score_rows(1.0))
    with engine.connect() as conn:
        assert db.read_forecasts(conn, dataset="sales").empty


def test_unreachable_database_error_hides_password() -> None:
    url = "postgresql+psycopg://app:s3cr3t-SENTINEL@127.0.0.1:1/prod"
    engine = db.make_engine(Settings(forecasting_database_url=url))
    with pytest.raises(sa.exc.OperationalError) as caught:
        with engine.connect():
            pass
    error = db.connect_error(engine, caught.value)
    assert "s3cr3t-SENTINEL" not in str(error)
    assert "127.0.0.1:1/prod" in str(error)


def test_init_db_stopped_half_way_leaves_nothing_and_runs_again(engine: sa.Engine,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite the tables used to stay, without their schema_migrations rows, and every later
    init-db re-ran a migration's ALTER TABLE and failed ("duplicate column name")."""
    def broken(conn: sa.Connection) -> None:
        raise RuntimeError("stopped while creating the views")

    monkeypatch.setattr(db, "apply_views", broken)
    with pytest.raises(RuntimeError, match="stopped"):
        with engine.begin() as conn:
            db.init_db(conn)
    assert table_names(engine) == set()
    monkeypatch.undo()
    with engine.begin() as conn:
        assert db.init_db(conn) == []
    with engine.begin() as conn:
        assert db.init_db(conn) == []
    assert {"forecast_runs", "forecast_steps", "model_scores", "actuals", "schema_migrations"} <= table_names(engine)


def test_sql_files_split_by_dialect_and_phase_and_keep_dollar_quoted_bodies_whole(tmp_path) -> None:
    sql = tmp_path / "m.sql"
    sql.write_text("CREATE TABLE a (x INTEGER);\n-- only on sqlite\nDROP TABLE a;\n"
                   "-- only on postgresql\n-- after the views\nDO $$\nBEGIN\n    PERFORM 1;\nEND\n$$;\n")
    assert db.sql_statements(sql, dialect="sqlite") == ["CREATE TABLE a (x INTEGER)", "DROP TABLE a"]
    assert db.sql_statements(sql, dialect="postgresql") == ["CREATE TABLE a (x INTEGER)"]
    assert db.sql_statements(sql, dialect="postgresql", after_views=True) == ["DO $$\nBEGIN\n    PERFORM 1;\nEND\n$$"]
    sql.write_text("-- only on postgres\nDROP TABLE a;\n")
    with pytest.raises(ValueError, match=r"m.sql: `-- only on postgres`: the dialects are sqlite and postgresql"):
        db.sql_statements(sql, dialect="postgresql")


# A function whose body is quoted with a tag holds $$ and lines ending in ';': one statement.
TAGGED_FUNCTION = """CREATE FUNCTION pipeline_note(x INTEGER) RETURNS TEXT AS $fn$
BEGIN
    -- a $$ inside this body quotes nothing
    RETURN 'costs $$' || x::text;
END
$fn$ LANGUAGE plpgsql"""


def test_sql_files_keep_tagged_dollar_quoted_bodies_whole_and_ignore_quotes_in_comments(tmp_path) -> None:
    sql = tmp_path / "m.sql"
    sql.write_text(f"-- $$ in a comment opens nothing;\nCREATE TABLE a (x INTEGER);\n{TAGGED_FUNCTION};\n"
                   "COMMENT ON TABLE a IS 'costs $$, it''s -- not a comment';\n"
                   "SELECT '--' AS a, $é$ a body;\n-- only on sqlite\n$é$ AS b;\n")
    assert db.sql_statements(sql) == [
        "CREATE TABLE a (x INTEGER)",
        TAGGED_FUNCTION,  # whole: its comment line too (only comments outside a body are dropped)
        "COMMENT ON TABLE a IS 'costs $$, it''s -- not a comment'",
        "SELECT '--' AS a, $é$ a body;\n-- only on sqlite\n$é$ AS b",  # a tag line inside a body is the body's
    ]
    assert len(db.sql_statements(sql, dialect="postgresql")) == 4
    sql.write_text("CREATE TABLE a (x INTEGER);\nDO $body$\nBEGIN\n    PERFORM 1;\nEND\n$$;\nDROP TABLE a;\n")
    with pytest.raises(ValueError, match=r"m.sql: the dollar-quoted body opened by \$body\$ is never closed"):
        db.sql_statements(sql)


def test_a_tagged_dollar_quoted_function_is_created_and_runs_on_postgresql(pg_url: str, tmp_path) -> None:
    sql = tmp_path / "m.sql"
    sql.write_text(f"{TAGGED_FUNCTION};\nCREATE VIEW noted AS SELECT pipeline_note(2) AS note;\n")
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            assert db.apply_sql(conn, sql) == 2
            assert conn.exec_driver_sql("SELECT note FROM noted").scalar_one() == "costs $$2"
    finally:
        engine.dispose()

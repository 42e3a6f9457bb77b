"""db.upsert's bulk path (COPY + one INSERT ... ON CONFLICT on PostgreSQL, executemany on SQLite).

The rows go into `bulk_rows`, a table of the test's own with the columns and natural key of a
forecast row (as the `forecasts` view shows it). The last test is of insert_new, by which
write_run writes a new run's steps.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from forecasting import db

KEY = ("dataset", "series_id", "as_of", "ts")
AS_OF = datetime(2020, 12, 1)
COLUMNS = ["dataset", "series_id", "as_of", "ts", "step", "value", "lower", "upper", "model",
           "model_version", "mlflow_run_id", "created_at"]


BULK_ROWS = """CREATE TABLE bulk_rows (
    dataset        VARCHAR(64)      NOT NULL,
    series_id      VARCHAR(255)     NOT NULL,
    as_of          TIMESTAMP        NOT NULL,
    ts             TIMESTAMP        NOT NULL,
    step           INTEGER          NOT NULL CHECK (step >= 1),
    value          DOUBLE PRECISION NOT NULL,
    lower          DOUBLE PRECISION,
    upper          DOUBLE PRECISION,
    model          VARCHAR(64)      NOT NULL,
    model_version  VARCHAR(32),
    mlflow_run_id  VARCHAR(64),
    created_at     TIMESTAMP        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT bulk_rows_key UNIQUE (dataset, series_id, as_of, ts)
)"""


@pytest.fixture
def forecasts(engine: sa.Engine) -> sa.Table:
    with engine.begin() as conn:
        conn.exec_driver_sql(BULK_ROWS)
        table = db.reflect_table(conn, "bulk_rows")
    for column in ("as_of", "ts", "created_at"):  # as reflect_table reads the forecasts view's
        table.c[column].type = db.TIMESTAMP
    return table


def frame(n_series: int = 3, horizon: int = 4, value: float = 1.0) -> pd.DataFrame:
    ts = pd.date_range("2021-01-01", periods=horizon, freq="MS")
    rows = pd.DataFrame({
        "dataset": "sales",
        "series_id": np.repeat([f"s{i}" for i in range(n_series)], horizon),
        "as_of": pd.Timestamp(AS_OF),
        "ts": np.tile(ts.to_numpy(), n_series),
        "step": np.tile(np.arange(1, horizon + 1), n_series),
        "value": value + np.arange(n_series * horizon, dtype=float),
        "model": "gru", "model_version": "3", "mlflow_run_id": "run",
        "created_at": pd.Timestamp("2020-12-02 03:04:05"),
    })
    rows["lower"], rows["upper"] = rows["value"] - 1, rows["value"] + 1
    return rows


def stored(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(sa.text(
            f"SELECT {', '.join(COLUMNS)} FROM bulk_rows ORDER BY dataset, series_id, ts"))
        return pd.DataFrame(result.fetchall(), columns=COLUMNS)


def test_frame_and_records_store_the_same_rows_nulls_and_timestamps(
    engine: sa.Engine, forecasts: sa.Table
) -> None:
    rows = frame()
    rows.loc[1, ["lower", "upper"]] = np.nan  # NaN becomes NULL
    rows["model_version"] = rows["model_version"].where(rows.index != 2, None)
    rows.loc[5, "mlflow_run_id"] = None
    with engine.begin() as conn:
        assert db.upsert(conn, forecasts, rows, key=KEY) == len(rows)
        assert db.upsert(conn, forecasts, db.to_records(rows.assign(dataset="other")), key=KEY) == len(rows)
    table = stored(engine)
    by_frame = table[table["dataset"] == "sales"].reset_index(drop=True)
    by_records = table[table["dataset"] == "other"].reset_index(drop=True)
    pd.testing.assert_frame_equal(by_frame.drop(columns="dataset"), by_records.drop(columns="dataset"))
    assert by_frame["value"].tolist() == rows["value"].tolist()
    assert by_frame["step"].tolist() == rows["step"].tolist()
    assert by_frame.loc[0, "lower"] == rows.loc[0, "lower"] and by_frame.loc[3, "model_version"] == "3"
    assert pd.to_datetime(by_frame["ts"]).tolist() == rows["ts"].tolist()
    assert pd.to_datetime(by_frame["as_of"]).eq(pd.Timestamp(AS_OF)).all()
    assert pd.to_datetime(by_frame["created_at"]).eq(pd.Timestamp("2020-12-02 03:04:05")).all()
    with engine.connect() as conn:
        nulls = conn.execute(sa.text(
            "SELECT series_id, step, lower IS NULL, upper IS NULL, model_version IS NULL, "
            "mlflow_run_id IS NULL FROM bulk_rows WHERE lower IS NULL OR upper IS NULL "
            "OR model_version IS NULL OR mlflow_run_id IS NULL ORDER BY dataset, series_id, step"
        )).all()
        as_of, ts = conn.execute(sa.text(
            "SELECT as_of, ts FROM bulk_rows WHERE dataset = 'sales' AND series_id = 's0' AND step = 2"
        )).one()
    one_each = [("s0", 2, True, True, False, False), ("s0", 3, False, False, True, False),
                ("s1", 2, False, False, False, True)]  # rows 1, 2 and 5 of the frame
    assert [tuple(row) for row in nulls] == one_each * 2
    if engine.dialect.name == "sqlite":  # text, as the TIMESTAMP type stores it
        assert (as_of, ts) == ("2020-12-01 00:00:00", "2021-02-01 00:00:00")
    else:
        assert (as_of, ts) == (AS_OF, datetime(2021, 2, 1))


@pytest.mark.parametrize("existing", [slice(0, 8), slice(4, 12)], ids=["old-keys-first", "new-keys-first"])
def test_upsert_updates_existing_keys_and_adds_new_ones(
    engine: sa.Engine, forecasts: sa.Table, existing: slice
) -> None:
    with engine.begin() as conn:
        db.upsert(conn, forecasts, frame(n_series=3, value=1.0).iloc[existing], key=KEY)
    rerun = frame(n_series=3, value=100.0).assign(model="lstm")  # 2 series again, 1 new
    with engine.begin() as conn:
        db.upsert(conn, forecasts, rerun, key=KEY)
    table = stored(engine)
    assert len(table) == len(rerun)
    assert table["value"].tolist() == rerun["value"].tolist()
    assert set(table["model"]) == {"lstm"}


def test_a_table_without_a_unique_key_is_refused_as_before(engine: sa.Engine, forecasts: sa.Table) -> None:
    with pytest.raises(sa.exc.DBAPIError, match=r"does not match any PRIMARY KEY or UNIQUE constraint"
                       r"|no unique or exclusion constraint matching the ON CONFLICT"):
        with engine.begin() as conn:
            db.upsert(conn, forecasts, frame(), key=("dataset", "series_id"))
    assert stored(engine).empty


@pytest.mark.parametrize("as_records", [False, True], ids=["frame", "records"])
def test_a_key_repeated_in_one_batch_keeps_its_last_row(
    engine: sa.Engine, forecasts: sa.Table, as_records: bool
) -> None:
    first, second = frame(value=1.0), frame(value=50.0)
    rows = pd.concat([first, second.iloc[:5], first.iloc[5:], second.iloc[5:7]], ignore_index=True)
    with engine.begin() as conn:
        db.upsert(conn, forecasts, db.to_records(rows) if as_records else rows, key=KEY)
    table = stored(engine)
    expected = pd.concat([second.iloc[:7], first.iloc[7:]])["value"].tolist()
    assert len(table) == len(first)
    assert table["value"].tolist() == expected


def test_several_upserts_of_one_table_in_one_transaction(engine: sa.Engine, forecasts: sa.Table) -> None:
    with engine.begin() as conn:
        db.upsert(conn, forecasts, frame(n_series=2, value=1.0), key=KEY)
        db.upsert(conn, forecasts, frame(n_series=3, value=10.0).iloc[4:], key=KEY)  # s1 again, s2
        db.upsert(conn, forecasts, frame(n_series=1, value=7.0).assign(dataset="other"), key=KEY)
        if engine.dialect.name == "postgresql":  # each staging table went with its upsert
            assert conn.execute(sa.text(
                "SELECT COUNT(*) FROM pg_class WHERE relpersistence = 't' AND relname LIKE 'upsert%'"
            )).scalar_one() == 0
    table = stored(engine)
    sales = table[table["dataset"] == "sales"]
    assert len(table) == 4 + 3 * 4
    assert sales["value"].tolist() == [1.0, 2.0, 3.0, 4.0] + [10.0 + i for i in range(4, 12)]


def test_an_error_mid_write_leaves_nothing_behind(engine: sa.Engine, forecasts: sa.Table) -> None:
    bad = frame(n_series=200, horizon=50)  # 10,000 rows
    bad.loc[6000, "value"] = np.nan  # NOT NULL, well inside the batch
    with pytest.raises(sa.exc.IntegrityError, match=r"NOT NULL constraint failed: bulk_rows\.value"
                       r'|null value in column "value" of relation "bulk_rows"'):
        with engine.begin() as conn:
            db.upsert(conn, forecasts, frame(n_series=2).assign(dataset="first"), key=KEY)
            db.upsert(conn, forecasts, bad, key=KEY)
    assert stored(engine).empty
    with engine.begin() as conn:  # the connection and the table take the next write as usual
        db.upsert(conn, forecasts, frame(), key=KEY)
    assert len(stored(engine)) == 12


def test_values_of_another_python_type_are_converted_like_an_insert(
    engine: sa.Engine, forecasts: sa.Table
) -> None:
    rows = frame(n_series=2, horizon=2)
    rows["series_id"] = [7, 7, 8, 8]  # int into VARCHAR: COPY falls back to text
    rows["step"] = rows["step"].astype(float)  # integral floats into INTEGER
    with engine.begin() as conn:
        db.upsert(conn, forecasts, rows, key=KEY)
    table = stored(engine)
    assert table["series_id"].tolist() == ["7", "7", "8", "8"]
    assert table["step"].tolist() == [1, 2, 1, 2]


def test_autocommit_connection_still_writes_all_or_nothing(pg_url: str) -> None:
    engine = db.make_engine(url=pg_url).execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(BULK_ROWS)
        forecasts = db.reflect_table(conn, "bulk_rows")
        db.upsert(conn, forecasts, frame(), key=KEY)
        bad = frame(value=5.0)
        bad.loc[8, "step"] = 0  # CHECK (step >= 1)
        with pytest.raises(sa.exc.IntegrityError, match="violates check constraint"):
            db.upsert(conn, forecasts, bad, key=KEY)
    assert stored(engine)["value"].tolist() == frame()["value"].tolist()
    engine.dispose()


def test_insert_new_writes_rows_whose_keys_are_new_and_refuses_a_key_met_twice(
    engine: sa.Engine, forecasts: sa.Table
) -> None:
    """write_run's path for a new run's steps: COPY straight into the table on PostgreSQL."""
    rows = frame()
    rows.loc[1, ["lower", "upper"]] = np.nan
    with engine.begin() as conn:
        assert db.insert_new(conn, forecasts, rows) == len(rows)
        assert db.insert_new(conn, forecasts, rows.iloc[:0]) == 0
    table = stored(engine)
    assert table["value"].tolist() == rows["value"].tolist() and table["lower"].isna().tolist() == [
        i == 1 for i in range(len(rows))]
    again = frame(value=50.0).assign(dataset="other")
    for twice in (pd.concat([again, again.iloc[[3]]]), frame(value=50.0)):  # in the frame; in the table
        with pytest.raises(sa.exc.IntegrityError, match=r"UNIQUE constraint failed|duplicate key value"):
            with engine.begin() as conn:
                db.insert_new(conn, forecasts, twice)
    pd.testing.assert_frame_equal(stored(engine), table)
    with pytest.raises(ValueError, match=r"insert into 'bulk_rows': `frame` holds columns the table has not: \['nope'\]"):
        with engine.begin() as conn:
            db.insert_new(conn, forecasts, rows.assign(nope=1))

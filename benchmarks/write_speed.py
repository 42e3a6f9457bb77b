"""Write speed: 1,000,000 forecast rows written by db.write_run against a plain COPY of the same rows.

    .venv/bin/python benchmarks/write_speed.py [--url URL] [--series 10000] [--steps 100]

A forecast is stored as one forecast_runs row and its forecast_steps rows (sql/schema.sql); a
row of the `forecasts` view is one step. In one run, on a PostgreSQL database that the script
creates and drops, `--repeats` times on a fresh schema each: (a) the floor of a first write: one
forecast_runs row inserted and a plain binary COPY of the steps into the empty forecast_steps,
(b) `db.write_run` of the same frame (a night's first write: its run row, then one COPY of the
steps straight into forecast_steps, db.insert_new: keys under a new run_key cannot exist), (c) a rerun of that (dataset, as_of) through `db.write_run`,
onto the committed first write (it deletes the run and its steps, then writes the new values
under a new run_key), (d) `db.upsert` of the steps once more over the same keys (every row
conflicts and is updated: a path write_run does not take), (e) the floor under any rerun: the
run and its steps deleted, then (a) with the new values, onto a committed first write as (c)
meets it. Prints medians and the ratios to (a) (target <= 2x), and (c) against (e): what
write_run adds to what the database itself must do to replace the rows; appends them to
RESULTS.md. Once, for before/after: `db.upsert` of `db.to_records(steps)` (dicts, as write_run
passed them before frames), the executemany path that upsert replaced on `--old-rows` rows
(scaled linearly), and SQLite (in-process executemany, new and old) on `--sqlite-rows` rows.
The rows are synthetic (random walks), which is fine here: only their number and types matter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import append_section  # noqa: E402

from forecasting import db  # noqa: E402

KEY = ("run_key", "series_id", "ts")  # forecast_steps' primary key
DATASET, AS_OF = "bench", datetime(2024, 5, 31, 23)
DEFAULT_URL = os.environ.get("FORECASTING_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres")


def forecast_frame(
    n_series: int, steps: int, *, seed: int = 0, created_at: str = "2024-06-01 02:00:00"
) -> pd.DataFrame:
    """n_series x steps forecast rows, as write_run takes them (and created_at, for the floor's run row)."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-06-01", periods=steps, freq="h")
    value = 100 + rng.normal(0, 1, (n_series, steps)).cumsum(axis=1).ravel()
    width = rng.uniform(1, 5, n_series * steps)
    return pd.DataFrame({
        "series_id": np.repeat([f"series-{i:06d}" for i in range(n_series)], steps),
        "ts": np.tile(ts.to_numpy(), n_series),
        "step": np.tile(np.arange(1, steps + 1), n_series),
        "value": value, "lower": value - width, "upper": value + width,
        "model": "gru", "model_version": "7", "mlflow_run_id": "0123456789abcdef0123456789abcdef",
        "created_at": pd.Timestamp(created_at),
    })


def steps_of(frame: pd.DataFrame, run_key: int) -> pd.DataFrame:
    """The forecast_steps rows of `frame` under `run_key`."""
    return frame[list(db.STEP_COLUMNS)].assign(run_key=run_key)


def plain_copy(conn: sa.Connection, frame: pd.DataFrame, *, run_key: int = 1) -> None:
    """The floor of a write: its forecast_runs row, then a binary COPY of its steps straight into
    forecast_steps, no staging, no conflicts."""
    conn.execute(sa.text("INSERT INTO forecast_runs (run_key, dataset, as_of, model, model_version, mlflow_run_id, "
                         "created_at) VALUES (:run_key, :dataset, :as_of, :model, :model_version, :run_id, :created)"),
                 {"run_key": run_key, "dataset": DATASET, "as_of": AS_OF, "model": frame["model"].iloc[0],
                  "model_version": frame["model_version"].iloc[0], "run_id": frame["mlflow_run_id"].iloc[0],
                  "created": frame["created_at"].iloc[0].to_pydatetime()})
    frame = steps_of(frame, run_key)
    driver = conn.connection.driver_connection
    columns = list(frame.columns)
    types = {"run_key": "int8", "step": "int4", "value": "float8", "lower": "float8", "upper": "float8",
             "ts": "timestamp"}
    with driver.cursor() as cursor, cursor.copy(
        f"COPY forecast_steps ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        copy.set_types([types.get(c, "varchar") for c in columns])
        for start in range(0, len(frame), 50_000):
            chunk = frame.iloc[start : start + 50_000]
            values = [s.to_numpy().astype("datetime64[us]").tolist() if s.dtype.kind == "M"
                      else s.to_numpy(dtype=object).tolist() if s.dtype.kind == "O"
                      else s.to_numpy().tolist() for _, s in chunk.items()]
            for row in zip(*values):
                copy.write_row(row)


# The write path before this change (git: forecasting/db.py upsert and to_records), kept here
# only to measure it: one INSERT ... ON CONFLICT per row through the driver's executemany.
def old_to_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    def plain(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, pd.Timestamp):
            return value.to_pydatetime()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and np.isnan(value):
            return None
        return value

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def old_upsert(
    conn: sa.Connection, table: sa.Table, rows: Sequence[dict[str, Any]], *, key: Sequence[str]
) -> int:
    stmt: Any = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)
    updates = {c: stmt.excluded[c] for c in rows[0].keys() if c not in key}
    conn.execute(stmt.on_conflict_do_update(index_elements=list(key), set_=updates), list(rows))
    return len(rows)


def timed(engine: sa.Engine, write: Callable[[sa.Connection], Any], *, checkpoint: bool = False) -> float:
    """Seconds for one write in its own transaction, commit included."""
    if checkpoint:  # start each PostgreSQL measurement without a pending checkpoint
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql("CHECKPOINT")
            except sa.exc.DBAPIError:  # not a superuser: measure as is
                pass
    start = time.perf_counter()
    with engine.begin() as conn:
        write(conn)
    return time.perf_counter() - start


def write_run(conn: sa.Connection, frame: pd.DataFrame) -> None:
    """The frame as a night writes it: write_run, a first write or a rerun of the (dataset, as_of)
    (which deletes its run and steps, then writes the new ones, in one transaction)."""
    db.write_run(conn, dataset=DATASET, as_of=AS_OF, forecasts=frame.drop(columns=["created_at"]), scores=None)


def delete_and_copy(conn: sa.Connection, frame: pd.DataFrame) -> None:
    """What no rerun can go below: the as_of's run and steps deleted, then the new ones written
    as plainly as plain_copy does, under a new run_key."""
    old = conn.execute(sa.text("SELECT run_key FROM forecast_runs WHERE dataset = :dataset AND as_of = :as_of"),
                       {"dataset": DATASET, "as_of": AS_OF}).scalar_one()
    conn.execute(sa.text("DELETE FROM forecast_steps WHERE run_key = :old"), {"old": old})
    conn.execute(sa.text("DELETE FROM forecast_runs WHERE run_key = :old"), {"old": old})
    plain_copy(conn, frame, run_key=old + 1)


def models(engine: sa.Engine) -> dict[str, int]:
    """Rows per model in the forecasts view: which write's values the tables hold."""
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT model, COUNT(*) FROM forecasts GROUP BY model").all())


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT COUNT(*) FROM forecast_steps").scalar_one()


def emptied(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE forecast_runs, forecast_steps")


def bench_engine(url: sa.URL) -> sa.Engine:
    """The product's engine on the schema `bench` of the bench database."""
    url = url.update_query_dict({"options": "-csearch_path=bench"})
    return db.make_engine(url=url.render_as_string(hide_password=False))


def fresh_schema(admin_of_bench: sa.Engine, name: str) -> None:
    with admin_of_bench.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')


def postgres_runs(
    url: sa.URL, frame: pd.DataFrame, rerun: pd.DataFrame, repeats: int
) -> dict[str, list[float]]:
    base = sa.create_engine(url)
    engine = bench_engine(url)
    times: dict[str, list[float]] = {"copy": [], "upsert": [], "write_run_rerun": [], "upsert_rerun": [],
                                     "copy_rerun": []}
    try:
        for i in range(repeats):
            fresh_schema(base, "bench")
            with engine.begin() as conn:
                db.init_db(conn)
                table = db.reflect_table(conn, db.FORECAST_STEPS)
            times["copy"].append(timed(engine, lambda conn: plain_copy(conn, frame), checkpoint=True))
            assert count(engine) == len(frame)
            emptied(engine)
            times["upsert"].append(timed(engine, lambda conn: write_run(conn, frame), checkpoint=True))
            assert models(engine) == {"gru": len(frame)}
            # The rerun meets the tables as a night leaves them: the first write committed, no
            # dead rows yet.
            times["write_run_rerun"].append(timed(engine, lambda conn: write_run(conn, rerun), checkpoint=True))
            assert models(engine) == {"lstm": len(frame)}, "the rerun did not replace every row"
            assert count(engine) == len(frame), "the rerun left steps of the first write"
            with engine.connect() as conn:
                run_key = conn.exec_driver_sql("SELECT run_key FROM forecast_runs").scalar_one()
            steps = steps_of(frame, run_key)
            times["upsert_rerun"].append(
                timed(engine, lambda conn: db.upsert(conn, table, steps, key=KEY), checkpoint=True))
            with engine.connect() as conn:
                total = conn.exec_driver_sql("SELECT SUM(value) FROM forecast_steps").scalar_one()
            assert np.isclose(total, frame["value"].sum(), rtol=1e-9), "the all-conflict upsert did not update every row"
            assert count(engine) == len(frame)
            emptied(engine)  # (e) meets what (c) met: a committed first write, no dead rows
            with engine.begin() as conn:
                plain_copy(conn, frame)
            assert count(engine) == len(frame)  # as before (c): the scan sets the rows' hint bits
            times["copy_rerun"].append(timed(engine, lambda conn: delete_and_copy(conn, rerun), checkpoint=True))
            assert models(engine) == {"lstm": len(frame)}, "DELETE + COPY did not replace every row"
            done = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
            print(f"  repeat {i + 1}: {done}", flush=True)
    finally:
        engine.dispose()
        base.dispose()
    return times


def once_postgres(url: sa.URL, frame: pd.DataFrame, old_rows: int) -> dict[str, float]:
    """The list-of-dicts path (to_records, as write_run called it before it passed frames) and the old executemany."""
    base = sa.create_engine(url)
    engine = bench_engine(url)
    out = {}
    try:
        fresh_schema(base, "bench")
        with engine.begin() as conn:
            db.init_db(conn)
            table = db.reflect_table(conn, db.FORECAST_STEPS)
        steps = steps_of(frame, 1)
        out["records"] = timed(engine, lambda conn: db.upsert(conn, table, db.to_records(steps), key=KEY),
                               checkpoint=True)
        assert count(engine) == len(frame)
        emptied(engine)
        if old_rows:
            small = steps.iloc[:old_rows]
            out["old"] = timed(engine, lambda conn: old_upsert(conn, table, old_to_records(small), key=KEY),
                               checkpoint=True)
            assert count(engine) == len(small)
    finally:
        engine.dispose()
        base.dispose()
    return out


def sqlite_runs(frame: pd.DataFrame, rerun: pd.DataFrame) -> dict[str, float]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, upsert, rows in [("new", db.upsert, steps_of(frame, 1)), ("new_rerun", db.upsert, steps_of(rerun, 1))]:
            engine = db.make_engine(url=f"sqlite:///{tmp}/new.db")
            with engine.begin() as conn:
                db.init_db(conn)
                table = db.reflect_table(conn, db.FORECAST_STEPS)
            out[label] = timed(engine, lambda conn: upsert(conn, table, rows, key=KEY))
            engine.dispose()
        engine = db.make_engine(url=f"sqlite:///{tmp}/old.db")
        with engine.begin() as conn:
            db.init_db(conn)
            table = db.reflect_table(conn, db.FORECAST_STEPS)
        out["old"] = timed(engine, lambda conn: old_upsert(conn, table, old_to_records(steps_of(frame, 1)), key=KEY))
        assert count(engine) == len(frame)
        engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="PostgreSQL server (any database there; the script creates its own)")
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-rows", type=int, default=100_000,
                        help="rows for the old executemany path (0: skip)")
    parser.add_argument("--sqlite-rows", type=int, default=100_000, help="rows for SQLite (0: skip)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    frame = forecast_frame(args.series, args.steps)
    rerun = forecast_frame(args.series, args.steps, seed=1, created_at="2024-06-02 02:00:00")
    rerun = rerun.assign(model="lstm")  # new values in every row
    n = len(frame)
    admin = sa.create_engine(sa.make_url(args.url), isolation_level="AUTOCOMMIT")
    name = f"forecasting_write_speed_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        version = conn.exec_driver_sql("SHOW server_version").scalar_one()
    url = sa.make_url(args.url).set(database=name)
    print(f"{n:,} rows ({args.series:,} series x {args.steps} steps), PostgreSQL {version}, "
          f"{args.repeats} repeats on a fresh schema", flush=True)
    try:
        times = postgres_runs(url, frame, rerun, args.repeats)
        extra = once_postgres(url, frame, args.old_rows)
        print("  once: " + ", ".join(f"{k} {v:.2f} s" for k, v in extra.items()), flush=True)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    copy = statistics.median(times["copy"])
    rows = []
    for label, key in [("plain COPY (binary) of the steps into empty forecast_steps (+ the run row)", "copy"),
                       ("db.write_run, first write (run row + db.insert_new: one COPY of the steps)", "upsert"),
                       ("db.write_run rerun of the as_of: DELETE its run and steps + first write", "write_run_rerun"),
                       ("db.upsert(steps) again, all keys conflict (not a path write_run takes)", "upsert_rerun"),
                       ("floor of a rerun: DELETE the run and steps + plain COPY (binary) of the new ones",
                        "copy_rerun")]:
        ratios = [t / c for t, c in zip(times[key], times["copy"])]
        rows.append({"PostgreSQL, 1 row = 1 forecast step": label, "rows": n,
                     "median s": statistics.median(times[key]),
                     "runs s": " / ".join(f"{t:.2f}" for t in times[key]),
                     "x COPY (ratio of medians)": statistics.median(times[key]) / copy,
                     "x COPY (per run)": " / ".join(f"{r:.2f}" for r in ratios)})
    rows.append({"PostgreSQL, 1 row = 1 forecast step": "db.upsert(db.to_records(steps)), dicts as write_run "
                 "passed them before frames, into empty forecast_steps", "rows": n, "median s": extra["records"],
                 "runs s": f"{extra['records']:.2f} (1 run)",
                 "x COPY (ratio of medians)": extra["records"] / copy,
                 "x COPY (per run)": "-"})
    if args.old_rows:
        scale = n / args.old_rows
        rows.append({"PostgreSQL, 1 row = 1 forecast step": "before: old to_records + executemany INSERT ON "
                     f"CONFLICT, into empty forecast_steps, scaled from {args.old_rows:,} rows", "rows": n,
                     "median s": extra["old"] * scale, "runs s": f"{extra['old']:.2f} x {scale:g} (1 run)",
                     "x COPY (ratio of medians)": extra["old"] * scale / copy, "x COPY (per run)": "-"})
    table = pd.DataFrame(rows).set_index("PostgreSQL, 1 row = 1 forecast step")
    print()
    print(table.to_markdown(floatfmt=".2f"))

    sqlite_table = None
    if args.sqlite_rows:
        part, part_rerun = frame.iloc[: args.sqlite_rows], rerun.iloc[: args.sqlite_rows]
        lite = sqlite_runs(part, part_rerun)
        sqlite_table = pd.DataFrame([
            {"SQLite (file, WAL), executemany": "db.upsert(steps) into empty forecast_steps", "s": lite["new"]},
            {"SQLite (file, WAL), executemany": "db.upsert(steps) again, all keys conflict",
             "s": lite["new_rerun"]},
            {"SQLite (file, WAL), executemany": "old: to_records + executemany (before)", "s": lite["old"]},
        ]).set_index("SQLite (file, WAL), executemany")
        sqlite_table["rows/s"] = (len(part) / sqlite_table["s"]).map("{:,.0f}".format)
        sqlite_table["rows"] = f"{len(part):,}"  # as text: an all-number table prints them as floats
        print()
        print(sqlite_table.to_markdown(floatfmt=".2f"))

    # One verdict per case: a night's first write (empty as_of), its rerun as write_run does it
    # (the as_of's run and steps deleted, then written anew), and an upsert onto rows that all
    # exist, which write_run never does (it deletes first) but the ON CONFLICT path must still carry.
    cases = [("first write, empty tables", "upsert"), ("rerun through write_run, DELETE + write", "write_run_rerun"),
             ("every key conflicting, ON CONFLICT DO UPDATE (not a path write_run takes)", "upsert_rerun")]
    verdicts = []
    for label, key in cases:
        ratio = statistics.median(times[key]) / copy
        verdicts.append(f"{label}: {ratio:.2f}x ({'met' if ratio <= 2 else 'NOT met'})")
    verdict = "; ".join(verdicts)
    print(f"\ntarget: a night's write of 1,000,000 forecast rows <= 2x COPY (medians): {verdict}")
    floor = statistics.median(times["copy_rerun"])
    per_run = " / ".join(f"{r / f:.2f}" for r, f in zip(times["write_run_rerun"], times["copy_rerun"]))
    rerun_note = (f"write_run's rerun against the floor of any rerun (DELETE the run and steps + plain COPY "
                  f"under a new run_key): {statistics.median(times['write_run_rerun']) / floor:.2f}x "
                  f"(per run {per_run}); that floor itself is {floor / copy:.2f}x COPY into an empty table")
    print(rerun_note)
    if not args.no_record:
        body = table.to_markdown(floatfmt=".2f")
        if sqlite_table is not None:
            body += "\n\n" + sqlite_table.to_markdown(floatfmt=".2f")
        append_section(
            f"write speed: write_run vs COPY, {n:,} forecast rows, forecast_runs + forecast_steps "
            f"(PostgreSQL {version})", body,
            notes=[f"target: a night's write of 1,000,000 forecast rows <= 2x COPY (medians): {verdict}", rerun_note,
                   "COPY, write_run and upsert start from the same DataFrame; times include the conversion "
                   "to Python values and the commit; a CHECKPOINT precedes each PostgreSQL step",
                   "write_run = DELETE the as_of's run and steps (none on a first write), INSERT the new "
                   "run row, then db.insert_new of its steps: one binary COPY straight into forecast_steps "
                   "(its keys, under a new run_key, cannot exist yet). db.upsert, which write_run no longer "
                   "uses for forecasts: binary COPY into a TEMP staging table, then INSERT ... SELECT ... ON "
                   "CONFLICT DO UPDATE, which the all-conflict case runs, writing new values into every row",
                   f"synthetic rows (random walks), generated {datetime.now():%Y-%m-%d}; "
                   "the machine is shared, so the ratios within one run are the figures to quote"])


if __name__ == "__main__":
    main()

"""A night's write of `actuals`: only the new and restated values, against the whole tail again.

    .venv/bin/python benchmarks/actuals_write.py [--url URL] [--series 1000] [--days 365] [--repeats 3]

Each night reads the observations since the dataset's oldest forecast, a tail that grows with
the forecasts' history. `db.write_actuals` compares them with what `actuals` holds and writes
only the new and restated ones (and deletes what the source withdrew); it used to upsert the
whole tail every night. In one run, on a PostgreSQL database that the script creates and drops:
`--series` daily series whose `--days` observations since the oldest forecast are all recorded,
then, `--repeats` times each, (a) the whole tail upserted again, as before, and (b)
`db.write_actuals` of the same unchanged panel (nothing new: it writes nothing). Prints medians
and the ratio, and appends them to RESULTS.md. Synthetic series (scale only: their number and
types are what matter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results import append_section  # noqa: E402

from forecasting import db  # noqa: E402

KEY = ("dataset", "series_id", "ts")
DEFAULT_URL = os.environ.get("FORECASTING_BENCH_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres")


def daily_panel(n_series: int, days: int) -> pd.DataFrame:
    """n_series x (days + 1) observations: the first day is the oldest forecast's as_of."""
    ts = pd.date_range("2024-01-01", periods=days + 1, freq="D")
    return pd.DataFrame({"series_id": np.repeat([f"series-{i:06d}" for i in range(n_series)], days + 1),
                         "ts": np.tile(ts.to_numpy(), n_series),
                         "value": np.random.default_rng(0).normal(100, 10, n_series * (days + 1))})


def recorded(engine: sa.Engine, panel: pd.DataFrame) -> None:
    """One forecast at the first day (so the tail starts after it) and every later value recorded."""
    first = pd.Timestamp(panel["ts"].min())
    forecast = pd.DataFrame({"series_id": [panel["series_id"].iloc[0]], "ts": [first + pd.Timedelta(days=1)],
                             "step": [1], "value": [1.0], "model": ["gru"]})
    with engine.begin() as conn:
        db.init_db(conn)
        db.write_run(conn, dataset="bench", as_of=first.to_pydatetime(), forecasts=forecast, scores=None)
        tail = panel[panel["ts"] > first].assign(dataset="bench", loaded_at=datetime(2025, 1, 1))
        db.upsert(conn, db.reflect_table(conn, db.ACTUALS), tail, key=KEY)
        conn.exec_driver_sql("ANALYZE actuals")


def timed(engine: sa.Engine, write) -> tuple[float, int]:
    start = time.perf_counter()
    with engine.begin() as conn:
        written = write(conn)
    return time.perf_counter() - start, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="PostgreSQL server (any database there; the script creates its own)")
    parser.add_argument("--series", type=int, default=1_000)
    parser.add_argument("--days", type=int, default=365, help="observations per series since the oldest forecast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    panel = daily_panel(args.series, args.days)
    tail = panel[panel["ts"] > panel["ts"].min()]
    admin = sa.create_engine(sa.make_url(args.url), isolation_level="AUTOCOMMIT")
    name = f"forecasting_actuals_write_{os.getpid()}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        version = conn.exec_driver_sql("SHOW server_version").scalar_one()
    engine = db.make_engine(url=sa.make_url(args.url).set(database=name).render_as_string(hide_password=False))
    times: dict[str, list[float]] = {"whole": [], "changed": []}
    try:
        recorded(engine, panel)
        for i in range(args.repeats):
            seconds, _ = timed(engine, lambda conn: db.upsert(
                conn, db.reflect_table(conn, db.ACTUALS), tail.assign(dataset="bench", loaded_at=datetime(2025, 1, 2)),
                key=KEY))
            times["whole"].append(seconds)
            seconds, written = timed(engine, lambda conn: db.write_actuals(
                conn, dataset="bench", panel=panel, created_at=datetime(2025, 1, 3)))
            assert written == 0, f"an unchanged panel wrote {written} actuals"
            times["changed"].append(seconds)
            print(f"  repeat {i + 1}: whole tail {times['whole'][-1]:.2f} s, "
                  f"db.write_actuals {times['changed'][-1]:.2f} s", flush=True)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    whole, changed = statistics.median(times["whole"]), statistics.median(times["changed"])
    table = pd.DataFrame([
        {"PostgreSQL, a night's actuals": "before: the whole tail upserted again (every key conflicts)",
         "median s": whole, "runs s": " / ".join(f"{t:.2f}" for t in times["whole"])},
        {"PostgreSQL, a night's actuals": "db.write_actuals: compared with what is stored, new and restated only",
         "median s": changed, "runs s": " / ".join(f"{t:.2f}" for t in times["changed"])},
    ]).set_index("PostgreSQL, a night's actuals")
    print()
    print(table.to_markdown(floatfmt=".2f"))
    verdict = f"db.write_actuals {whole / changed:.1f}x faster than the whole tail again (ratio of medians)"
    print(f"\n{verdict}")
    if not args.no_record:
        append_section(
            f"actuals write: {len(tail):,} recorded observations ({args.series:,} daily series x {args.days} days, "
            f"PostgreSQL {version})", table.to_markdown(floatfmt=".2f"),
            notes=[verdict, "an unchanged panel: every observation already recorded with the same value; each "
                   "time includes the commit", "synthetic series; the machine is shared, so the ratio within one "
                   "run is the figure to quote"])


if __name__ == "__main__":
    main()

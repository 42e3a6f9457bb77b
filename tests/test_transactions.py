"""All rows of one (dataset, as_of) are visible together or not at all, on both databases: a
replacement of a committed run shows the old rows or the new, never none or a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from forecasting import db

AS_OF = datetime(2020, 12, 1)
N_SERIES, HORIZON = 20000, 6  # 120,000 rows: even the bulk COPY path takes well over 0.1 s


def big_forecast(value: float = 1.0) -> pd.DataFrame:
    ts = pd.date_range("2021-01-01", periods=HORIZON, freq="MS")
    ids = [f"s{i:05d}" for i in range(N_SERIES)]
    return pd.DataFrame({
        "series_id": [sid for sid in ids for _ in ts], "ts": list(ts) * N_SERIES,
        "step": list(range(1, HORIZON + 1)) * N_SERIES, "value": value, "lower": value - 1, "upper": value + 1,
        "model": "gru", "model_version": "1", "mlflow_run_id": "run",
    })


def snapshot(engine: sa.Engine) -> tuple[int, float]:
    """(rows, sum of values) of the as_of: which run a reader sees, whole or mixed."""
    with engine.connect() as conn:
        n, total = conn.execute(sa.text("SELECT COUNT(*), SUM(value) FROM forecasts WHERE dataset = 'sales'")).one()
    return int(n), float(total or 0.0)


ROWS = N_SERIES * HORIZON
OLD, NEW = (ROWS, ROWS * 1.0), (ROWS, ROWS * 2.0)  # the committed run (values 1) and its replacement (2)


def write_previous_run(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    with engine.begin() as conn:
        db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=big_forecast(1.0), scores=None)
    assert snapshot(engine) == OLD


def test_a_reader_polling_during_a_replacement_sees_the_old_run_or_the_new(engine: sa.Engine) -> None:
    write_previous_run(engine)
    rows = big_forecast(2.0)
    seen: list[tuple[int, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(snapshot(engine))
            time.sleep(0.01)  # leave the writer (same process, same GIL) room to write

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=rows, scores=None)
    finally:
        done.set()
        reader.join()
    seen.append(snapshot(engine))
    assert len(seen) > 2, "the reader never ran while the write was in progress"
    assert set(seen) <= {OLD, NEW}, sorted(set(seen) - {OLD, NEW})[:3]
    assert seen[-1] == NEW


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.test_transactions import AS_OF, big_forecast
    from forecasting import db
    engine = db.make_engine(url=sys.argv[1])
    rows = big_forecast(2.0)
    with engine.begin() as conn:
        Path(sys.argv[2]).write_text("writing")
        db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=rows, scores=None)
        Path(sys.argv[2]).write_text("committing")
""")


def test_a_writer_killed_mid_replacement_leaves_the_old_run_or_the_new(engine: sa.Engine, database_url: str,
                                                                       tmp_path: Path) -> None:
    write_previous_run(engine)
    marker = tmp_path / "marker"
    root = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen([sys.executable, "-c", WRITER, database_url, str(marker)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 120
    while not marker.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), f"the writer never started writing (exit {writer.poll()})"
    time.sleep(0.1)  # well inside the write of 120,000 rows (about a second or more)
    state = marker.read_text()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert state == "writing", "the write finished before the kill: make it bigger"
    assert snapshot(engine) in (OLD, NEW)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
    with engine.begin() as conn:  # and the database takes the next write as usual
        db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=big_forecast(3.0), scores=None)
    assert snapshot(engine) == (ROWS, ROWS * 3.0)

"""All rows of one (dataset, as_of) are visible together or not at all, on both databases."""

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


def big_forecast() -> pd.DataFrame:
    ts = pd.date_range("2021-01-01", periods=HORIZON, freq="MS")
    ids = [f"s{i:05d}" for i in range(N_SERIES)]
    return pd.DataFrame({
        "series_id": [sid for sid in ids for _ in ts], "ts": list(ts) * N_SERIES,
        "step": list(range(1, HORIZON + 1)) * N_SERIES, "value": 1.0, "lower": 0.0, "upper": 2.0,
        "model": "gru", "model_version": "1", "mlflow_run_id": "run",
    })


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT COUNT(*) FROM forecasts WHERE dataset = 'sales'")).scalar_one()


def test_a_reader_polling_during_a_write_sees_none_or_all(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
    rows = big_forecast()
    seen: list[int] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(count(engine))
            time.sleep(0.01)  # leave the writer (same process, same GIL) room to write

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        with engine.begin() as conn:
            db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=rows, scores=None)
    finally:
        done.set()
        reader.join()
    seen.append(count(engine))
    assert len(seen) > 2, "the reader never ran while the write was in progress"
    assert set(seen) <= {0, len(rows)}
    assert seen[-1] == len(rows)


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.test_transactions import AS_OF, big_forecast
    from forecasting import db
    engine = db.make_engine(url=sys.argv[1])
    rows = big_forecast()
    with engine.begin() as conn:
        Path(sys.argv[2]).write_text("writing")
        db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=rows, scores=None)
        Path(sys.argv[2]).write_text("committing")
""")


def test_a_writer_killed_mid_write_leaves_none_or_all(engine: sa.Engine, database_url: str, tmp_path: Path) -> None:
    with engine.begin() as conn:
        db.init_db(conn)
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
    assert count(engine) in (0, N_SERIES * HORIZON)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
    with engine.begin() as conn:  # and the database takes the next write as usual
        db.write_run(conn, dataset="sales", as_of=AS_OF, forecasts=big_forecast(), scores=None)
    assert count(engine) == N_SERIES * HORIZON

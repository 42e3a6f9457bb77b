"""A small known dataset in a real database, and a config with a tiny training budget."""

from __future__ import annotations

import numpy as np
import pandas as pd
import sqlalchemy as sa

from forecasting import db
from forecasting.config import DatasetConfig

SERIES = ("s1", "s2", "s3")
START, PERIODS = "2015-01-01", 60  # monthly, 2015-01 .. 2019-12


def synthetic_sales(periods: int = PERIODS) -> pd.DataFrame:
    """Seasonal series with trend and noise, one level per series (positive, like turnover)."""
    rng = np.random.default_rng(0)
    months = pd.date_range(START, periods=periods, freq="MS")
    frames = []
    for i, series_id in enumerate(SERIES):
        t = np.arange(periods)
        value = 100 * (i + 1) + 0.5 * t + 10 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 1, periods)
        frames.append(pd.DataFrame({"series_id": series_id, "state": "S", "industry": f"I{i}",
                                    "month": months.date, "turnover": value}))
    return pd.concat(frames, ignore_index=True)


def load_sales(engine: sa.Engine, frame: pd.DataFrame | None = None) -> None:
    frame = synthetic_sales() if frame is None else frame
    with engine.begin() as conn:
        db.init_db(conn)
        db.apply_sql(conn, db.SQL_DIR / "demo.sql")
        db.upsert(conn, db.reflect_table(conn, "sales"), frame, key=("series_id", "month"))


def tiny_config(**changes: object) -> DatasetConfig:
    raw = {
        "name": "sales",
        "source": {"table": "sales", "id_column": "series_id", "time_column": "month", "target_column": "turnover"},
        "freq": "MS", "horizon": 6, "season_length": 12,
        "training": {"max_epochs": 2, "hidden_size": 8, "batch_size": 32, "ensemble": 1},
    }
    raw.update(changes)
    return DatasetConfig.from_mapping(raw)


class Failed:
    """A task's final state whose result is `error`, as Prefect hands it to a retry condition."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self) -> None:
        raise self.error

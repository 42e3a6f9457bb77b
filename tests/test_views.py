"""Analyst views on SQLite and PostgreSQL: two runs, actuals arriving in between."""

from __future__ import annotations

from datetime import datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from forecasting import db


def forecast(series_id: str, as_of: str, values: list[float]) -> pd.DataFrame:
    ts = pd.date_range(as_of, periods=len(values) + 1, freq="MS")[1:]
    return pd.DataFrame({"series_id": series_id, "ts": ts, "step": range(1, len(values) + 1),
                         "value": values, "lower": [v - 5 for v in values], "upper": [v + 5 for v in values],
                         "model": "lstm", "model_version": "1", "mlflow_run_id": "run"})


def scores(champion: str, mase: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([{"model": m, "series_id": None, "mae": 1.0, "rmse": 1.0, "smape": 1.0, "mase": v,
                          "is_champion": m == champion, "mlflow_run_id": "run"} for m, v in mase.items()])


def actuals(until: str, extra: dict[str, float] | None = None) -> pd.DataFrame:
    ts = pd.date_range("2019-01-01", until, freq="MS")
    frame = pd.DataFrame({"series_id": "a", "ts": ts, "value": 1.0})
    for when, value in (extra or {}).items():
        frame.loc[frame["ts"] == pd.Timestamp(when), "value"] = value
    return frame


@pytest.fixture
def two_runs(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        db.init_db(conn)
        db.init_db(conn)  # views too are idempotent
    with engine.begin() as conn:  # night 1: as_of 2020-03, series a and b
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 3, 1),
                     forecasts=pd.concat([forecast("a", "2020-03-01", [10.0, 20.0]),
                                          forecast("b", "2020-03-01", [7.0, 8.0])]),
                     scores=scores("lstm", {"lstm": 0.9, "naive": 1.2}), actuals=actuals("2020-03-01"))
    with engine.begin() as conn:  # night 2: the 2020-04 actual of a (12) has landed; b is gone
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 4, 1),
                     forecasts=forecast("a", "2020-04-01", [21.0, 31.0]),
                     scores=scores("naive", {"lstm": 1.0, "naive": 0.8}),
                     actuals=actuals("2020-04-01", {"2020-04-01": 12.0}))
    return engine


def query(engine: sa.Engine, sql: str) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(sa.text(sql), conn)


def test_latest_forecasts_has_the_newest_as_of_per_series(two_runs: sa.Engine) -> None:
    latest = query(two_runs, "SELECT series_id, as_of, ts, value FROM latest_forecasts ORDER BY series_id, ts")
    assert latest["series_id"].tolist() == ["a", "a", "b", "b"]
    assert pd.to_datetime(latest["as_of"]).dt.strftime("%Y-%m").tolist() == ["2020-04", "2020-04", "2020-03", "2020-03"]
    assert latest["value"].tolist() == [21.0, 31.0, 7.0, 8.0]


def test_current_forecasts_hold_the_newest_run_alone(two_runs: sa.Engine) -> None:
    """latest_forecasts keeps b's forecast from the older run, which b's absence from the newest
    run made stale (a series dropped by validation, or gone from the source, stayed there for
    good); current_forecasts is what the newest run forecast."""
    current = query(two_runs, "SELECT series_id, as_of, ts, value FROM current_forecasts ORDER BY series_id, ts")
    assert current["series_id"].tolist() == ["a", "a"]
    assert pd.to_datetime(current["as_of"]).dt.strftime("%Y-%m").tolist() == ["2020-04", "2020-04"]
    assert current["value"].tolist() == [21.0, 31.0]


def test_forecast_accuracy_joins_landed_actuals_only(two_runs: sa.Engine) -> None:
    accuracy = query(two_runs, "SELECT * FROM forecast_accuracy")
    assert len(accuracy) == 1  # only a's 2020-04 forecast (step 1 of night 1) has an actual
    row = accuracy.iloc[0]
    assert (row["series_id"], int(row["step"]), row["model"]) == ("a", 1, "lstm")
    assert pd.Timestamp(row["as_of"]) == pd.Timestamp("2020-03-01")
    assert (row["forecast"], row["actual"], row["error"]) == (10.0, 12.0, 2.0)
    assert row["absolute_percentage_error"] == pytest.approx(100 * 2 / 12)  # percent, as model_scores.smape
    assert int(row["inside_interval"]) == 1
    with two_runs.connect() as conn:
        coverage = conn.exec_driver_sql("SELECT AVG(inside_interval) FROM forecast_accuracy").scalar_one()
    # a float on both databases: AVG of an integer was `numeric` on PostgreSQL, a Decimal in
    # Python (pandas.read_sql hides it; a plain driver query or a BI tool does not)
    assert type(coverage) is float and coverage == 1.0


def test_model_leaderboard_counts_runs_and_wins(two_runs: sa.Engine) -> None:
    board = query(two_runs, "SELECT * FROM model_leaderboard ORDER BY model").set_index("model")
    assert board.loc["lstm", "runs"] == 2 and board.loc["naive", "runs"] == 2
    assert board.loc["lstm", "mean_mase"] == pytest.approx(0.95)
    assert board.loc["naive", "mean_mase"] == pytest.approx(1.0)
    assert board.loc["lstm", "times_champion"] == 1 and board.loc["naive", "times_champion"] == 1
    assert pd.Timestamp(board.loc["lstm", "last_as_of"]) == pd.Timestamp("2020-04-01")
    assert board.loc["lstm", "scored_runs"] == 2 and board.loc["lstm", "failed_runs"] == 0


def test_model_leaderboard_shows_the_runs_a_model_failed(two_runs: sa.Engine) -> None:
    """A model whose backtest forecast a non-finite value has a `failed` aggregate row without
    MASE: counted in `runs` but not in mean_mase, it topped the board on its one scored night."""
    with two_runs.begin() as conn:
        failed = scores("naive", {"lstm": float("nan"), "naive": 0.9}).assign(
            mase=lambda f: f["mase"].astype(object).where(f["model"] != "lstm", None),
            status=lambda f: f["model"].map({"lstm": "failed", "naive": "scored"}))
        db.write_run(conn, dataset="sales", as_of=datetime(2020, 5, 1), forecasts=forecast("a", "2020-05-01", [1.0]),
                     scores=failed, actuals=actuals("2020-05-01"))
    board = query(two_runs, "SELECT * FROM model_leaderboard ORDER BY model").set_index("model")
    assert board.loc["lstm", "runs"] == 3 and board.loc["lstm", "scored_runs"] == 2
    assert board.loc["lstm", "failed_runs"] == 1 and board.loc["naive", "failed_runs"] == 0


def test_a_forecast_without_interval_is_not_counted_as_a_miss(two_runs: sa.Engine) -> None:
    with two_runs.begin() as conn:
        conn.exec_driver_sql("UPDATE forecast_steps SET lower = NULL, upper = NULL WHERE series_id = 'a'")
    accuracy = query(two_runs, "SELECT inside_interval FROM forecast_accuracy")
    assert len(accuracy) == 1 and accuracy["inside_interval"].isna().all()
    coverage = query(two_runs, "SELECT AVG(inside_interval) AS coverage FROM forecast_accuracy")
    assert coverage["coverage"].isna().all()  # unknown, not 0%


def test_views_that_analysts_build_on_ours_survive_init_db(two_runs: sa.Engine) -> None:
    """PostgreSQL refused to DROP a view another depends on, so init-db failed; SQLite, which
    tracks no dependencies, never did (its case checks only that init-db leaves it working)."""
    with two_runs.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW my_latest AS SELECT series_id, value FROM latest_forecasts")
    with two_runs.begin() as conn:
        db.init_db(conn)
    assert len(query(two_runs, "SELECT * FROM my_latest")) == 4


def test_a_changed_view_with_dependants_is_refused_by_name_on_postgresql(two_runs: sa.Engine) -> None:
    """A release that changes a view's columns must drop it; PostgreSQL refuses while another
    view depends on it, and init-db says which, leaving everything as it was."""
    with two_runs.begin() as conn:  # an older release's latest_forecasts, with other columns
        conn.exec_driver_sql("DROP VIEW latest_forecasts")
        conn.exec_driver_sql("CREATE VIEW latest_forecasts AS SELECT series_id AS old_name FROM forecasts")
        conn.exec_driver_sql("CREATE VIEW my_latest AS SELECT old_name FROM latest_forecasts")
    if two_runs.dialect.name == "sqlite":  # which tracks no dependencies: the view is replaced
        with two_runs.begin() as conn:
            db.init_db(conn)
        assert "value" in query(two_runs, "SELECT * FROM latest_forecasts").columns
        return
    with pytest.raises(db.DatabaseError, match=r"view 'latest_forecasts'.*my_latest"):
        with two_runs.begin() as conn:
            db.init_db(conn)
    assert list(query(two_runs, "SELECT * FROM my_latest").columns) == ["old_name"]


def stored_actuals(engine: sa.Engine) -> list[tuple[str, str, float]]:
    frame = query(engine, "SELECT series_id, ts, value FROM actuals ORDER BY series_id, ts")
    return [(s, f"{pd.Timestamp(t):%Y-%m}", v) for s, t, v in frame.itertuples(index=False)]


def scored_at(engine: sa.Engine, month: str) -> int:
    """Rows of forecast_accuracy at `month` (compared in pandas: SQLite stores TIMESTAMP as text)."""
    accuracy = query(engine, "SELECT ts FROM forecast_accuracy")
    return int((pd.to_datetime(accuracy["ts"]) == pd.Timestamp(month)).sum())


def observed(series_id: str, until: str, values: dict[str, float] | None = None) -> pd.DataFrame:
    return actuals(until, values).assign(series_id=series_id)


@pytest.mark.parametrize("withdrawal", ["row deleted", "value set to NULL"])
def test_an_actual_the_source_withdrew_is_deleted_and_scores_no_forecast_any_more(
        two_runs: sa.Engine, withdrawal: str) -> None:
    """The source corrected a's 2020-04 value away. actuals kept it, so forecast_accuracy went on
    scoring night 1's forecast against a value that no longer exists anywhere."""
    with two_runs.begin() as conn:  # a night reads a and c through 2020-05
        db.write_actuals(conn, dataset="sales", created_at=datetime(2020, 6, 2),
                         panel=pd.concat([observed("a", "2020-05-01", {"2020-04-01": 12.0, "2020-05-01": 13.0}),
                                          observed("c", "2020-05-01", {"2020-05-01": 3.0})]))
    assert stored_actuals(two_runs) == [("a", "2020-04", 12.0), ("a", "2020-05", 13.0),
                                        ("c", "2020-04", 1.0), ("c", "2020-05", 3.0)]
    assert scored_at(two_runs, "2020-04-01") == 1

    panel = observed("a", "2020-05-01", {"2020-05-01": 13.0})
    if withdrawal == "row deleted":
        panel = panel[panel["ts"] != pd.Timestamp("2020-04-01")]
    else:
        panel.loc[panel["ts"] == pd.Timestamp("2020-04-01"), "value"] = float("nan")
    with two_runs.begin() as conn:  # the next night reads a alone: c has gone from the source
        db.write_actuals(conn, dataset="sales", panel=panel, created_at=datetime(2020, 6, 3))

    # a's withdrawn value is gone; c, which the night did not read, keeps what it had.
    assert stored_actuals(two_runs) == [("a", "2020-05", 13.0), ("c", "2020-04", 1.0), ("c", "2020-05", 3.0)]
    assert scored_at(two_runs, "2020-04-01") == 0


def test_a_past_as_of_never_deletes_the_actuals_after_it(two_runs: sa.Engine) -> None:
    """A backfill night reads the source up to its as_of: the later actuals are not its to judge."""
    with two_runs.begin() as conn:
        db.write_actuals(conn, dataset="sales", created_at=datetime(2020, 6, 2),
                         panel=observed("a", "2020-05-01", {"2020-04-01": 12.0, "2020-05-01": 13.0}))
    with two_runs.begin() as conn:  # as_of 2020-04: the rows through it, as read_dataset gives them
        db.write_actuals(conn, dataset="sales", created_at=datetime(2020, 6, 3),
                         panel=observed("a", "2020-04-01", {"2020-04-01": 12.0}))
    assert stored_actuals(two_runs) == [("a", "2020-04", 12.0), ("a", "2020-05", 13.0)]


def test_a_source_that_keeps_only_recent_history_leaves_the_older_actuals(two_runs: sa.Engine) -> None:
    """A retention policy, or a source.query over the last months: the night never read a's 2020-04,
    so it cannot tell whether it was withdrawn (judged from the oldest forecast's as_of instead of
    each series' first row read, every night would delete the older history)."""
    with two_runs.begin() as conn:
        db.write_actuals(conn, dataset="sales", created_at=datetime(2020, 6, 2),
                         panel=observed("a", "2020-05-01", {"2020-04-01": 12.0, "2020-05-01": 13.0}))
    with two_runs.begin() as conn:
        db.write_actuals(conn, dataset="sales", created_at=datetime(2020, 6, 3),
                         panel=pd.DataFrame({"series_id": "a", "ts": [pd.Timestamp("2020-05-01")], "value": 13.0}))
    assert stored_actuals(two_runs) == [("a", "2020-04", 12.0), ("a", "2020-05", 13.0)]


def test_a_night_writes_only_the_actuals_that_are_new_or_restated(two_runs: sa.Engine) -> None:
    """Each night reads the tail since the oldest forecast, which grows with the forecasts'
    history; writing it all again every night made the nightly upsert grow with it."""
    def write(panel: pd.DataFrame, day: int) -> int:
        with two_runs.begin() as conn:
            return db.write_actuals(conn, dataset="sales", panel=panel, created_at=datetime(2020, 6, day))

    panel = observed("a", "2020-05-01", {"2020-04-01": 12.0, "2020-05-01": 13.0})
    assert write(panel, 2) == 1  # 2020-05 is new; 2020-04 (12) was recorded by night 2
    assert write(panel, 3) == 0  # the same source again: nothing to write
    panel.loc[panel["ts"] == pd.Timestamp("2020-04-01"), "value"] = 12.5  # restated at the source
    assert write(pd.concat([panel, observed("a", "2020-06-01").tail(1)]), 4) == 2  # the restated one and 2020-06

    assert stored_actuals(two_runs) == [("a", "2020-04", 12.5), ("a", "2020-05", 13.0), ("a", "2020-06", 1.0)]
    loaded = query(two_runs, "SELECT ts, loaded_at FROM actuals ORDER BY ts")
    assert [pd.Timestamp(t).day for t in loaded["loaded_at"]] == [4, 2, 4]  # when each value was recorded

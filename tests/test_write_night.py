"""A night's rows and its alias move are one step (pipeline.write_night), on both databases.

The alias here is an in-memory stand-in for MLflow's (tests/test_flow.py runs the real one):
what is tested is which rows the database keeps and where the alias ends, when runs of one
dataset meet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pandas as pd
import pytest
import sqlalchemy as sa

from forecasting import db, pipeline
from tests.flow_fixtures import tiny_config

AS_OF = pd.Timestamp("2020-12-01")
CONFIG = tiny_config()


class FakeAlias:
    """`champion`: moves only from the version a caller read, as tracking.set_champion does."""

    def __init__(self, version: str | None, *, move_takes: float = 0.0) -> None:
        self.version, self.move_takes, self.reads = version, move_takes, 0

    def alias(self) -> pipeline.Alias:
        return pipeline.Alias(read=self.read, move=self.move, restore=self.restore)

    def read(self) -> str | None:
        self.reads += 1
        return self.version

    def move(self, version: str, replaces: str | None) -> str | None:
        time.sleep(self.move_takes)  # MLflow's round trip: the window a second run could use
        if self.version in (replaces, version):
            self.version = version
        return self.version

    def restore(self, version: str | None, from_version: str) -> None:
        if self.version == from_version:
            self.version = version


def rows(version: str) -> pd.DataFrame:
    ts = pd.date_range("2021-01-01", periods=3, freq="MS")
    return pd.DataFrame({"series_id": "a", "ts": ts, "step": [1, 2, 3], "value": float(version),
                         "lower": 0.0, "upper": 99.0, "model": "gru", "model_version": version,
                         "mlflow_run_id": f"run-{version}"})


def scores(version: str) -> pd.DataFrame:
    return pd.DataFrame({"model": ["gru"], "series_id": [None], "mae": [1.0], "rmse": [1.0], "smape": [1.0],
                         "mase": [1.0], "is_champion": [True], "mlflow_run_id": [f"run-{version}"]})


def promotion(new: str, *, replaces: str | None, decision: str = "promoted") -> pipeline.Promotion:
    kept = decision == "kept"
    return pipeline.Promotion(forecaster=None, version=replaces if kept else new, run_id=f"run-{new}",  # type: ignore[arg-type]
                              quantiles=[], new_version=new, promoted=decision in ("promoted", "refreshed"),
                              decision=decision, reason="test", new_mase=1.0, current_mase=None, replaces=replaces)


def write(engine: sa.Engine, alias: FakeAlias, night: pipeline.Promotion) -> tuple[int, int, pipeline.Promotion]:
    return pipeline.write_night(engine, config=CONFIG, as_of=AS_OF, forecasts=rows(night.version),
                                scores=scores(night.version), actuals=None, promotion=night, alias=alias.alias())


def versions(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(db.read_forecasts(conn, dataset=CONFIG.name)["model_version"])


@pytest.fixture
def tables(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        db.init_db(conn)
    return engine


def test_a_promoting_night_writes_and_moves_the_alias(tables: sa.Engine) -> None:
    alias = FakeAlias("3")
    n_forecasts, n_scores, night = write(tables, alias, promotion("4", replaces="3"))
    assert (n_forecasts, n_scores, night.decision, alias.version) == (3, 1, "promoted", "4")
    assert versions(tables) == {"4"}


def test_two_runs_of_one_night_leave_the_rows_of_the_model_the_alias_points_at(tables: sa.Engine) -> None:
    """Two runs read the alias at v3, registered v4 and v5 and reach the write together. The
    first to take the dataset's lock writes and moves the alias (slowly: the other waits for
    the lock all that time); the second then finds the alias moved, writes nothing and is
    superseded. Before, each wrote, the write and the move were apart, and the rows of the run
    the alias did not follow (v4) were left under the alias of the other (v5)."""
    alias = FakeAlias("3", move_takes=0.5)
    entered = threading.Event()
    read = alias.read

    def read_and_say_so() -> str | None:
        entered.set()
        return read()

    alias.read = read_and_say_so  # type: ignore[method-assign]
    results: dict[str, tuple[int, int, pipeline.Promotion]] = {}
    first = threading.Thread(target=lambda: results.update(v5=write(tables, alias, promotion("5", replaces="3"))))
    first.start()
    assert entered.wait(30)
    results["v4"] = write(tables, alias, promotion("4", replaces="3"))
    first.join()
    assert results["v5"][2].decision == "promoted" and results["v5"][:2] == (3, 1)
    assert results["v4"][2].decision == "superseded" and results["v4"][:2] == (0, 0)
    assert "moved from v3 to v5" in results["v4"][2].reason
    assert alias.version == "5" and versions(tables) == {"5"}


def test_a_kept_night_writes_nothing_once_the_alias_left_its_champion(tables: sa.Engine) -> None:
    alias = FakeAlias("3")
    write(tables, alias, promotion("3", replaces="2"))  # v3's rows
    alias.version = "7"  # another run promoted v7 (for another as_of) meanwhile
    n_forecasts, n_scores, night = write(tables, alias, promotion("4", replaces="3", decision="kept"))
    assert (n_forecasts, n_scores, night.decision) == (0, 0, "superseded")
    assert versions(tables) == {"3"} and alias.version == "7"


def test_a_backfill_night_leaves_a_night_the_champion_wrote_meanwhile(tables: sa.Engine) -> None:
    """The backfill started before production wrote this as_of (its guard read no such night);
    at its write the as_of holds the champion's forecast, which it leaves."""
    alias = FakeAlias("3")
    write(tables, alias, promotion("3", replaces=None))  # production's night, by the champion
    n_forecasts, _, night = write(tables, alias, promotion("9", replaces="3", decision="backfill"))
    assert (n_forecasts, night.decision) == (0, "superseded") and "production's night" in night.reason
    assert versions(tables) == {"3"} and alias.version == "3"
    alias.version = "5"  # a later champion: v3's night is no longer production's
    n_forecasts, _, night = write(tables, alias, promotion("9", replaces="5", decision="backfill"))
    assert (n_forecasts, night.decision) == (3, "backfill") and versions(tables) == {"9"}
    assert alias.version == "5"


def test_a_commit_that_fails_after_the_alias_moved_moves_it_back(tables: sa.Engine,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    alias = FakeAlias("3")
    write(tables, alias, promotion("3", replaces=None))
    @contextmanager
    def commit_fails(engine: sa.Engine, config: object) -> Iterator[sa.Connection]:
        with engine.connect() as conn:
            transaction = conn.begin()
            yield conn
            transaction.rollback()  # what a failed COMMIT leaves
            raise sa.exc.OperationalError("COMMIT", None, Exception("the server went away"))

    monkeypatch.setattr(pipeline, "_writing", commit_fails)
    with pytest.raises(sa.exc.OperationalError):
        write(tables, alias, promotion("4", replaces="3"))
    assert alias.version == "3" and versions(tables) == {"3"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_mlflow_store_in_the_same_sqlite_file_can_move_the_alias(tables: sa.Engine) -> None:
    """MLflow's sqlite store in the forecasts' own file: moving the alias writes to that file.
    With the alias moved inside our write transaction (BEGIN IMMEDIATE: the whole file's write
    lock), every promoting night failed with "database is locked"."""
    path = tables.url.database

    class SameFile(FakeAlias):
        def move(self, version: str, replaces: str | None) -> str | None:
            import sqlite3

            store = sqlite3.connect(path, timeout=1)  # what MLflow's engine would do, briefly
            try:
                store.execute("BEGIN IMMEDIATE")
                store.execute("CREATE TABLE IF NOT EXISTS registered_model_aliases (alias TEXT, version TEXT)")
                store.execute("INSERT INTO registered_model_aliases VALUES ('champion', ?)", (version,))
                store.commit()
            finally:
                store.close()
            return super().move(version, replaces)

    alias = SameFile("3")
    n_forecasts, _, night = write(tables, alias, promotion("4", replaces="3"))
    assert (n_forecasts, night.decision, alias.version) == (3, "promoted", "4")
    assert versions(tables) == {"4"}


def test_a_move_that_fails_after_mlflow_made_it_is_undone(tables: sa.Engine) -> None:
    """An HTTP timeout after the server moved the alias: the night fails, and the alias must
    not stay at a version whose rows were never written."""
    class MovedThenTimedOut(FakeAlias):
        def move(self, version: str, replaces: str | None) -> str | None:
            super().move(version, replaces)
            raise TimeoutError("the tracking server did not answer in time")

    alias = MovedThenTimedOut("3")
    write(tables, FakeAlias("3"), promotion("3", replaces=None))
    with pytest.raises(TimeoutError):
        write(tables, alias, promotion("4", replaces="3"))
    assert alias.version == "3" and versions(tables) == {"3"}


def test_a_retry_after_an_attempt_that_wrote_leaves_its_alias(tables: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 1 moved the alias to v4 and committed v4's rows, then failed (a lost commit
    answer). A retry that fails in turn must not move the alias back to v3 under v4's rows."""
    alias = FakeAlias("3")
    write(tables, alias, promotion("4", replaces="3"))
    assert alias.version == "4" and versions(tables) == {"4"}

    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the write failed")

    monkeypatch.setattr(db, "write_run", fails)
    with pytest.raises(RuntimeError, match="the write failed"):
        write(tables, alias, promotion("4", replaces="3"))
    assert alias.version == "4" and versions(tables) == {"4"}


def test_the_sqlite_lock_is_one_per_database_file_whatever_its_name(tmp_path) -> None:
    """A `file:` URI got a lock of this process only; a symlink another lock file."""
    real = tmp_path / "data" / "f.db"
    real.parent.mkdir()
    real.touch()
    (tmp_path / "link.db").symlink_to(real)
    names = [f"sqlite:///{real}", f"sqlite:///file:{real}?uri=true", f"sqlite:///{tmp_path / 'link.db'}"]
    assert {db._sqlite_file(db.make_engine(url=url)) for url in names} == {str(real)}
    assert db._sqlite_file(db.make_engine(url="sqlite://")) is None
    in_memory = sa.create_engine("sqlite:///file:mem?mode=memory&uri=true", poolclass=sa.pool.StaticPool)
    assert db._sqlite_file(in_memory) is None


def test_the_sqlite_lock_file_takes_the_databases_permissions(tmp_path) -> None:
    """Left by one user's night with 0644, it refused the next night of another user who may
    write the database (0666), with a bare PermissionError after training."""
    path = tmp_path / "shared.db"
    path.touch()
    path.chmod(0o666)
    with db.sqlite_dataset_lock(db.make_engine(url=f"sqlite:///{path}"), dataset="sales"):
        (lock,) = tmp_path.glob("shared.db.*.lock")
        assert lock.stat().st_mode & 0o777 == 0o666


def test_predict_refuses_to_write_a_champion_the_alias_has_left(tables: sa.Engine) -> None:
    alias = FakeAlias("3")
    write(tables, alias, promotion("3", replaces=None))
    alias.version = "4"  # a night promoted v4 while predict forecast with v3
    with pytest.raises(pipeline.ChampionMoved, match=r"'sales': the champion alias moved from v3 to v4 while "
                                                     r"predict ran; nothing was written"):
        pipeline.write_with_champion(tables, config=CONFIG, as_of=AS_OF, forecasts=rows("3").assign(value=-1.0),
                                     actuals=None, version="3", alias=alias.alias())
    with tables.connect() as conn:
        assert db.read_forecasts(conn, dataset=CONFIG.name)["value"].eq(3.0).all()
    alias.version = "3"
    assert pipeline.write_with_champion(tables, config=CONFIG, as_of=AS_OF, forecasts=rows("3"), actuals=None,
                                        version="3", alias=alias.alias()) == 3


def test_nights_of_one_dataset_write_one_at_a_time_whatever_their_as_of(tables: sa.Engine) -> None:
    """The dataset lock serialises writes of other as_ofs too: the alias is the dataset's."""
    order: list[str] = []
    inside = threading.Event()

    class Slow(FakeAlias):
        def read(self) -> str | None:
            order.append("slow in")
            inside.set()
            time.sleep(0.5)
            order.append("slow out")
            return super().read()

    slow = threading.Thread(target=lambda: write(tables, Slow("3"), promotion("4", replaces="3")))
    slow.start()
    assert inside.wait(30)

    class Other(FakeAlias):
        def read(self) -> str | None:
            order.append("other in")
            return super().read()

    pipeline.write_night(tables, config=CONFIG, as_of=datetime(2020, 11, 1), forecasts=rows("4"), scores=scores("4"),
                         actuals=None, promotion=promotion("4", replaces="3"), alias=Other("3").alias())
    slow.join()
    assert order == ["slow in", "slow out", "other in"]


def test_a_write_waiting_too_long_for_its_nights_lock_is_a_retried_error(pg_url: str) -> None:
    """`predict` writes under the (dataset, as_of) lock alone: behind a session that hung holding
    it, it waited without end on PostgreSQL (SQLite's busy_timeout ends the wait there)."""
    tables = db.make_engine(url=pg_url)
    night = datetime(2020, 11, 1)
    with tables.connect() as conn:
        configured = conn.exec_driver_sql("SHOW lock_timeout").scalar_one()
    with tables.begin() as holder:
        db.lock_run(holder, dataset="sales", as_of=night)
        with pytest.raises(db.DatabaseError, match=r"dataset 'sales': another write of as_of 2020-11-01 00:00:00 "
                                                   r"has held its lock for 1 s"):
            with tables.begin() as waiter:
                db.lock_run(waiter, dataset="sales", as_of=night, wait_seconds=1)
        with tables.begin() as other:  # another night is not held up, and the session's timeout is back
            db.lock_run(other, dataset="sales", as_of=datetime(2020, 12, 1), wait_seconds=1)
            assert other.exec_driver_sql("SHOW lock_timeout").scalar_one() == configured
    tables.dispose()


def test_a_write_waiting_too_long_for_the_datasets_lock_is_a_retried_error(tables: sa.Engine) -> None:
    """A holder that hangs (an MLflow call that never returns) queued every later writer for
    good; SQLite's busy_timeout used to end that wait."""
    if tables.dialect.name == "postgresql":
        with tables.begin() as holder:
            db.lock_dataset(holder, dataset="sales")
            with pytest.raises(db.DatabaseError, match="another night's write of it has held the dataset's lock"):
                with tables.begin() as waiter:
                    db.lock_dataset(waiter, dataset="sales", wait_seconds=1)
            with tables.begin() as other:  # another dataset is not held up
                db.lock_dataset(other, dataset="weather", wait_seconds=1)
        return
    with db.sqlite_dataset_lock(tables, dataset="sales"):
        with pytest.raises(db.DatabaseError, match="another night's write of it has held"):
            with db.sqlite_dataset_lock(tables, dataset="sales", wait_seconds=1):
                pass
        with db.sqlite_dataset_lock(tables, dataset="weather", wait_seconds=1):
            pass

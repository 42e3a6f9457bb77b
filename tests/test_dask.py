"""Scale-out on Dask: the same forecasts and scores as a run in one process, for the same seed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import distributed
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import torch
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.nightly import nightly, on_dask, task_runner
from forecasting import db, pipeline, shards, stopping, train
from forecasting.cli import build_parser, on_cluster
from forecasting.config import BASELINES, Settings
from tests.flow_fixtures import SERIES, load_sales, synthetic_sales, tiny_config

METRICS = ["mae", "rmse", "smape", "mase", "interval_coverage"]


def panel() -> pd.DataFrame:
    frame = synthetic_sales().rename(columns={"month": "ts", "turnover": "value"})
    return frame.assign(ts=pd.to_datetime(frame["ts"]))[["series_id", "ts", "value"]]


@pytest.mark.parametrize("name", BASELINES)
def test_shards_joined_equal_one_backtest(name: str) -> None:
    config = tiny_config(backtest={"windows": 2})  # two origins: the join must restore their order
    whole = pipeline.backtest_candidate(config, panel(), name)
    parts = shards.split(panel(), 2)
    assert [list(p["series_id"].unique()) for p in parts] == [list(SERIES[:2]), list(SERIES[2:])]
    joined = shards.join_backtests(config, panel(), [pipeline.backtest_candidate(config, p, name) for p in parts])
    pd.testing.assert_frame_equal(joined.backtest.predictions, whole.backtest.predictions, check_exact=True)
    pd.testing.assert_frame_equal(joined.backtest.scores, whole.backtest.scores, check_exact=True)
    assert joined.coverage == whole.coverage


@pytest.mark.parametrize("name", BASELINES)
def test_a_shard_of_constant_series_joins_like_the_rest(name: str) -> None:
    """A shard whose series all have an undefined MASE (constant history) raised NoDefinedMase
    in its own backtest, failing a --dask night that one process runs: with a few series on
    many threads, one constant series is a shard of its own."""
    config = tiny_config()
    flat = panel().assign(value=lambda f: f["value"].where(f["series_id"] != SERIES[-1], 5.0))
    whole = pipeline.backtest_candidate(config, flat, name)
    parts = shards.split(flat, len(SERIES))
    joined = shards.join_backtests(config, flat, [pipeline.backtest_candidate(config, p, name) for p in parts])
    pd.testing.assert_frame_equal(joined.backtest.scores, whole.backtest.scores, check_exact=True)
    assert np.isnan(joined.backtest.scores.set_index("series_id").loc[SERIES[-1], "mase"])


def test_split_keeps_whole_series_in_order() -> None:
    assert len(shards.split(panel(), 10)) == len(SERIES)  # never an empty shard
    pd.testing.assert_frame_equal(pd.concat(shards.split(panel(), 2), ignore_index=True), panel())
    with pytest.raises(ValueError, match=r"`n` \(0\) must be >= 1"):
        shards.split(panel(), 0)


def test_dask_option_parses_and_picks_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    for command in (["run"], ["backfill", "--start", "2019-01-01", "--end", "2019-02-01"]):
        args = [*command, "--config", "x.yaml"]
        assert parser.parse_args(args).dask is None
        assert parser.parse_args([*args, "--dask"]).dask == "local"
        assert parser.parse_args([*args, "--dask", "tcp://scheduler:8786"]).dask == "tcp://scheduler:8786"
        assert parser.parse_args([*command[:1], "--dask", "--config", "x.yaml", *command[1:]]).dask == "local"

    assert on_cluster(nightly, parser.parse_args(["run", "--config", "x.yaml"])) is nightly
    remote = on_cluster(nightly, parser.parse_args(["run", "--config", "x.yaml", "--dask", "tcp://scheduler:8786"]))
    assert type(remote.task_runner).__name__ == "DaskTaskRunner"
    assert remote.task_runner.address == "tcp://scheduler:8786"
    local = on_dask(nightly).task_runner
    assert local.address is None and local.cluster_kwargs == {"threads_per_worker": 1, "processes": True}
    assert task_runner(None) is None and task_runner("") is None
    assert type(nightly.task_runner).__name__ == "ThreadPoolTaskRunner"  # no option: as before

    assert Settings().forecasting_dask_address is None
    monkeypatch.setenv("FORECASTING_DASK_ADDRESS", "tcp://scheduler:8786")
    assert Settings().forecasting_dask_address == "tcp://scheduler:8786"


def test_a_bad_or_silent_dask_address_is_refused_before_the_flow_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """`FORECASTING_DASK_ADDRESS=Local` failed after Prefect's start-up (16 s) as an error of the
    config file, naming neither the setting nor its value; a scheduler that does not answer,
    after 30 s more, with a traceback."""
    import socket
    import time

    from forecasting.cli import main

    monkeypatch.setenv("FORECASTING_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        silent = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "sales.yaml")
    cases = [
        ({"FORECASTING_DASK_ADDRESS": "Local"}, ["run", "--config", config],
         "error: FORECASTING_DASK_ADDRESS ('Local') is neither 'local' nor a Dask scheduler address such as "
         "tcp://host:8786: missing port number in address 'Local'"),
        # the variable is read by every Settings(), so it is checked with --dask given too
        ({"FORECASTING_DASK_ADDRESS": "Local"}, ["run", "--config", config, "--dask", "local"],
         "error: FORECASTING_DASK_ADDRESS ('Local') is neither"),
        ({}, ["run", "--config", config, "--dask", "tcp://scheduler"],
         "error: --dask ('tcp://scheduler') is neither 'local' nor a Dask scheduler address"),
        ({}, ["backfill", "--config", config, "--start", "2019-01-01", "--end", "2019-02-01", "--dask", silent],
         f"error: --dask ('{silent}'): no Dask scheduler answers there:"),
        ({"FORECASTING_DASK_ADDRESS": silent}, ["run", "--config", config],
         f"error: FORECASTING_DASK_ADDRESS ('{silent}'): no Dask scheduler answers there:"),
    ]
    for environment, argv, message in cases:
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        started = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - started < 10
        assert message in " ".join(capsys.readouterr().out.split())
        for key in environment:
            monkeypatch.delenv(key)
    with pytest.raises(ValueError, match=r"the Dask address \('tcp://h'\) is neither"):
        task_runner("tcp://h")
    # Where Settings() validates it (importing the flows, say), pydantic wraps the error; the CLI
    # prints the error itself, not "<config>: 1 validation error for Settings ...".
    from pydantic import ValidationError

    from forecasting.cli import _setting_error_in
    from forecasting.config import SettingError

    monkeypatch.setenv("FORECASTING_DASK_ADDRESS", "Local")
    with pytest.raises(ValidationError) as wrapped:
        Settings()
    assert isinstance(_setting_error_in(wrapped.value), SettingError)
    assert str(_setting_error_in(wrapped.value)).startswith("FORECASTING_DASK_ADDRESS ('Local') is neither")
    assert _setting_error_in(ValueError("other")) is None


def test_per_series_fits_on_a_dask_worker_start_no_processes_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker started without a nanny (`dask worker --no-nanny`) is no daemon, so ETS fitted
    its shard in as many processes as the machine has cores: every worker times the cores."""
    import os

    from forecasting import baselines

    monkeypatch.delenv(baselines.WORKERS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        assert client.submit(baselines.workers, pure=False).result() == 1
        monkeypatch.setenv(baselines.WORKERS_ENV, "3")  # said explicitly: as said
        assert client.submit(baselines.workers, pure=False).result() == 3
    monkeypatch.delenv(baselines.WORKERS_ENV)
    assert baselines.workers() == cores


@pytest.fixture
def cluster() -> Iterator[distributed.LocalCluster]:
    """Two single-threaded worker processes: separate interpreters, as on separate machines."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local:
        yield local


def outputs(engine: sa.Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    with engine.connect() as conn:
        rows = db.read_forecasts(conn, dataset="sales")
        scores = pd.read_sql(sa.text("SELECT * FROM model_scores WHERE dataset = 'sales'"), conn)
    rows = rows.sort_values(["series_id", "ts"]).reset_index(drop=True)
    scores = scores.assign(series_id=scores["series_id"].fillna("<all>"))
    return rows, scores.sort_values(["model", "series_id"]).reset_index(drop=True)


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cluster_run_equals_local_run(engine: sa.Engine, env: dict[str, str],
                                      cluster: distributed.LocalCluster) -> None:
    """The nightly flow on a 2-worker LocalCluster writes the forecasts and scores of a local run.

    SQLite only: the database and MLflow are touched by the flow's own process alone (only
    training, backtests and forecast shards go to the workers), and test_flow covers both
    backends. Processes, not threads: each worker is its own interpreter with its own torch
    settings, as on other machines. Tolerance (rtol 1e-6): a worker trains with 1 torch thread,
    this process with up to one per core, so float reductions may differ in the last bits (seen: the
    networks' scores by ~3e-8 absolute; the forecasts were identical); the per-series baselines
    are split and joined exactly (test_shards_joined_equal_one_backtest).
    """
    load_sales(engine)
    config = tiny_config()
    local = nightly(config=config)
    local_rows, local_scores = outputs(engine)

    with distributed.Client(cluster) as client, distributed.get_task_stream(client=client) as stream:
        remote = on_dask(nightly, cluster.scheduler_address)(config=config)
        threads = client.run(torch.get_num_threads)
    remote_rows, remote_scores = outputs(engine)  # the same as_of: the run replaced the rows
    # ... with its own: another registered version and other MLflow runs than the local run's
    # (rows the local run left in place would pass every comparison below).
    assert remote["model_version"] != local["model_version"]
    assert set(remote_rows["model_version"]) == {remote["model_version"]}
    assert not set(remote_scores["mlflow_run_id"]) & set(local_scores["mlflow_run_id"])

    ran = pd.DataFrame({"task": [t["key"].rsplit("-", 1)[0] for t in stream.data],
                        "worker": [t["worker"] for t in stream.data]})
    n_baseline_tasks = len(BASELINES) * 2  # one per shard of series
    assert ran["task"].value_counts().to_dict() == {
        "backtest": n_baseline_tasks + len(config.models), "fit_champion": 1, "forecast": 2}
    assert ran["worker"].nunique() == 2
    assert set(threads.values()) == {1}  # torch set once per worker process, no oversubscription

    assert remote["champion"] == local["champion"] and remote["mase"].keys() == local["mase"].keys()
    np.testing.assert_allclose(list(remote["mase"].values()), list(local["mase"].values()), rtol=1e-6)
    assert len(remote_rows) == len(SERIES) * config.horizon
    same = ["series_id", "ts", "step", "model"]
    pd.testing.assert_frame_equal(remote_rows[same], local_rows[same])
    for column in ("value", "lower", "upper"):
        np.testing.assert_allclose(remote_rows[column], local_rows[column], rtol=1e-6, err_msg=column)
    keys = ["model", "series_id", "status", "is_champion"]
    pd.testing.assert_frame_equal(remote_scores[keys], local_scores[keys])
    for column in METRICS:
        np.testing.assert_allclose(remote_scores[column].astype(float), local_scores[column].astype(float),
                                   rtol=1e-6, err_msg=column)


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failed_candidate_cancels_the_backtests_not_yet_started(engine: sa.Engine, env: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster that outlives the flow (passed by address: the task runner does not close it)
    and one single-threaded worker, so that the candidates queue. The first fails at once; the
    others would train for a while each. Before, they went on starting, one after another, for
    the seconds the failed night took to end (its MLflow jobs): here all six before the flow
    raised (with 3 s each, the fourth ran on after it). Now the night cancels those not yet
    started as soon as the first fails: only the one the worker had already begun runs (Dask
    cannot stop a running task), and nothing after it.

    The worker is a thread of this process, so that the scripted candidates reach it; over tcp,
    because the flows refuse an inproc:// address.
    """
    load_sales(engine)
    config = tiny_config()
    first, started = config.candidates[0], []

    def scripted(config, panel, name, **kwargs):
        started.append(name)
        if name == first:
            raise ValueError(f"{name}: broken")
        time.sleep(1.0)  # a candidate takes a while to train
        return SimpleNamespace(name=name, aggregate={"mase": 1.0}, fit_seconds=1.0)

    monkeypatch.setattr(pipeline, "backtest_candidate", scripted)
    monkeypatch.setattr("flows.nightly._torch_threads_on_worker", lambda: None)  # this process's torch
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        with pytest.raises(ValueError, match=f"{first}: broken"):
            on_dask(nightly, local.scheduler_address)(config=config)
        time.sleep(2.0)  # longer than a candidate: the one running has ended, a next one would have begun
        assert not any(client.processing().values())
    assert started[0] == first and len(started) <= 2, started


# The loop's record: module globals, since a task's closure reaches the worker as a copy.
LOOP_CHECKS: list[float] = []
LOOP_ENDS: list[str] = []


def long_loop() -> str:
    """100 s of work that looks for a release every 0.05 s."""
    try:
        for _ in range(2000):
            LOOP_CHECKS.append(time.monotonic())
            stopping.raise_if_released()
            time.sleep(0.05)
    except stopping.TaskReleased as exc:
        LOOP_ENDS.append(str(exc))
        raise
    LOOP_ENDS.append("ran to its end")
    return "ran to its end"


def test_a_running_task_that_its_cluster_released_stops_at_its_next_check() -> None:
    """Dask cannot stop a running task: cancelling its future only marks it released on the
    worker. The task sees that at its next stopping.raise_if_released(); outside a worker's task
    the check does nothing."""
    checks, ended = LOOP_CHECKS, LOOP_ENDS
    checks.clear(), ended.clear()
    stopping.raise_if_released()  # here: not a worker's task
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        future = client.submit(long_loop, pure=False)
        deadline = time.monotonic() + 30
        while len(checks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(checks) >= 3, "the task never started"
        cancelled_at = time.monotonic()
        client.cancel([future])
        while not ended and time.monotonic() < deadline:
            time.sleep(0.02)
        stopped_after = time.monotonic() - cancelled_at
    assert len(ended) == 1 and "the cluster released task" in ended[0], ended
    assert stopped_after < 2.0, stopped_after  # one 0.05 s step and the scheduler's message, not 100 s


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_failed_candidate_stops_a_network_training_beside_it_and_its_task_run_is_cancelled(
        engine: sa.Engine, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The failing candidate (gru) comes after one that trains for minutes (lstm, an epoch budget
    it never reaches). Before, the flow waited for lstm's result before it looked at gru's, and
    lstm, once begun, trained to its end whatever the night's fate. Now gru's error fails the
    night as it happens, and lstm's real training loop stops at its next batch: its task run
    ends Cancelled.

    Two worker threads of this process, so that both networks train at once and the scripted
    candidate reaches them; over tcp, because the flows refuse an inproc:// address.
    """
    load_sales(engine)
    config = tiny_config(models=["lstm", "gru"],
                         training={"max_epochs": 100_000, "patience": 100_000, "hidden_size": 8, "batch_size": 32,
                                   "ensemble": 1})
    real_backtest = pipeline.backtest_candidate
    training, outcome = threading.Event(), {}

    def check_between_batches() -> None:  # training's own check, and a watchdog against a hang
        if not training.is_set():
            outcome["began"] = time.monotonic()
            training.set()
        if time.monotonic() - outcome["began"] > 60:
            raise RuntimeError("lstm trained on for 60 s after the night failed")
        stopping.raise_if_released()

    def scripted(config, panel, name, **kwargs):
        if name == "gru":
            assert training.wait(60), "lstm never began training"
            time.sleep(0.5)  # a few batches into lstm's training
            raise ValueError("gru: broken")
        try:
            return real_backtest(config, panel, name, **kwargs)
        except stopping.TaskReleased:
            outcome.setdefault("stopped", time.monotonic())
            raise
        finally:
            outcome.setdefault(f"{name} ended", True)

    monkeypatch.setattr(pipeline, "backtest_candidate", scripted)
    monkeypatch.setattr(train, "raise_if_released", check_between_batches)
    monkeypatch.setattr("flows.nightly._torch_threads_on_worker", lambda: None)  # this process's torch
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                                  dashboard_address=None) as local:
        state = on_dask(nightly, local.scheduler_address)(config=config, return_state=True)
        # Not client.processing(): the scheduler forgets a released task at once, while its
        # worker may run it on
        deadline = time.monotonic() + 30
        while "lstm ended" not in outcome and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "lstm ended" in outcome, "lstm's backtest still runs"
    assert state.is_failed() and "gru: broken" in str(state.message), state
    assert "stopped" in outcome, outcome  # lstm's training raised TaskReleased, it did not return
    with get_client(sync_client=True) as prefect_client:
        runs = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    ends = sorted((run.name.rsplit("-", 1)[0], run.state.name) for run in runs if run.name.startswith("backtest"))
    assert ("backtest", "Cancelled") in ends and ("backtest", "Failed") in ends, ends
    cancelled = [run for run in runs if run.state.name == "Cancelled"]  # lstm's (an ETS shard's too, if one began)
    assert all("the cluster released task" in run.state.message for run in cancelled), cancelled


def test_a_released_baseline_shard_stops_between_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ETS shard on a worker (fitted in the task's own thread) looks between series."""
    from forecasting import baselines

    fitted: list[str] = []

    def slow_fit(history, horizon, season_length, *, series_id):
        fitted.append(series_id)
        time.sleep(0.05)
        return np.zeros(horizon), False

    monkeypatch.setattr(baselines, "_ets", slow_fit)  # module state: the thread worker sees it
    jobs = [(np.arange(24.0), f"s{i}") for i in range(2000)]  # 100 s of fits unless stopped
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        future = client.submit(baselines._ets_chunk, jobs, 6, 12, pure=False)
        deadline = time.monotonic() + 30
        while len(fitted) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.cancel([future])
        seen = -1
        while seen != len(fitted) and time.monotonic() < deadline:  # until a second passes without a fit
            seen = len(fitted)
            time.sleep(1.0)
        assert future.cancelled()
    assert 3 <= len(fitted) < 100, len(fitted)  # stopped within a few series of the cancel


def test_a_running_task_stops_when_the_process_that_submitted_it_dies() -> None:
    """A flow process killed mid-night leaves no client wanting its tasks: the scheduler releases
    them, and the one running stops at its next check instead of running on for nobody."""
    LOOP_CHECKS.clear(), LOOP_ENDS.clear()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                  dashboard_address=None) as local:
        submitter = (f"import os, time, distributed, tests.test_dask as here\n"
                     f"client = distributed.Client({local.scheduler_address!r})\n"
                     "future = client.submit(here.long_loop, pure=False)\n"
                     "time.sleep(3)\n"
                     "os._exit(0)  # no goodbye to the scheduler, as a killed process\n")
        subprocess.run([sys.executable, "-c", submitter], cwd=Path(__file__).resolve().parent.parent, check=True,
                       timeout=120)
        died = time.monotonic()
        while not LOOP_ENDS and time.monotonic() - died < 30:
            time.sleep(0.05)
        stopped_after = time.monotonic() - died
    assert LOOP_CHECKS, "the task never started"
    assert len(LOOP_ENDS) == 1 and "the cluster released task" in LOOP_ENDS[0], LOOP_ENDS
    assert stopped_after < 5, stopped_after


def test_a_released_baseline_shard_ends_the_processes_it_fits_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker without a nanny and `FORECASTING_WORKERS` above 1 fits a shard's ETS in processes
    of its own, which cannot look whether the task was released: the task looks as it waits for
    them, and ends them. They ran every queued chunk to its end before, the task's thread waiting."""
    import psutil

    from forecasting import baselines

    monkeypatch.setenv(baselines.WORKERS_ENV, "2")
    monkeypatch.setattr(baselines, "_ETS_MEMO", OrderedDict())  # no forecast from an earlier test
    rng = np.random.default_rng(7)
    n_series = 8 * baselines.PARALLEL_MIN_SERIES  # about a minute of fits in two processes unless stopped
    season = np.tile(np.sin(np.arange(12) * np.pi / 6), 10)
    histories = [100 + np.cumsum(rng.normal(size=120)) + 5 * season for _ in range(n_series)]
    ours = psutil.Process()
    before = {child.pid for child in ours.children(recursive=True)}

    def fitting_processes() -> list[psutil.Process]:
        found = []
        for child in ours.children(recursive=True):
            try:
                if child.pid not in before and "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:  # ended meanwhile
                pass
        return found

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        future = client.submit(baselines.ets_many, histories, 12, 12, series_ids=[f"s{i}" for i in range(n_series)],
                               pure=False)
        deadline = time.monotonic() + 60
        while len(fitting_processes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        started = fitting_processes()
        assert len(started) == 2, "the shard did not fit in processes of its own"
        time.sleep(3)  # past their imports: fitting
        assert all(process.is_running() for process in started) and not future.done()
        client.cancel([future])
        cancelled = time.monotonic()
        gone, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, f"{len(alive)} fitting processes still run after the task was released"
        # The worker's one thread is free again: the task itself ended
        assert client.submit(sum, [1, 2], pure=False).result(timeout=10) == 3
        assert time.monotonic() - cancelled < 5
        assert future.cancelled()

"""The MLflow logging process: jobs run in another process, errors come back, a dead worker is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient

from forecasting import pipeline, tracking, tracking_process
from forecasting.config import Settings
from forecasting.tracking import TrackingError
from tests.flow_fixtures import tiny_config

CONFIG = tiny_config()


def process_id() -> int:
    return os.getpid()


def refuse(message: str) -> None:
    raise PermissionError(message)


def panel() -> pd.DataFrame:
    ts = pd.date_range("2015-01-01", periods=48, freq="MS")
    rng = np.random.default_rng(0)
    return pd.concat([pd.DataFrame({"series_id": sid, "ts": ts, "value": 100 + rng.normal(0, 5, 48).cumsum()})
                      for sid in ["a", "b", "c", "d", "e", "f"]], ignore_index=True)


def test_a_job_runs_in_one_other_process_kept_between_calls() -> None:
    first = tracking_process.call(process_id)
    assert first != os.getpid()
    assert tracking_process.call(process_id) == first


def test_a_jobs_error_is_raised_here_with_its_type_and_message() -> None:
    with pytest.raises(PermissionError, match="MLflow store refused the write"):
        tracking_process.call(refuse, "MLflow store refused the write")


class StorageClientError(Exception):
    """As some storage clients' errors: built from more than the message it keeps, so it does
    not rebuild from its pickle."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body}")


def fail_like_a_storage_client(status: int) -> None:
    raise StorageClientError(status, "bucket not found")


def test_an_error_that_cannot_be_rebuilt_here_comes_back_named_and_the_worker_stays() -> None:
    worker = tracking_process.call(process_id)
    with pytest.raises(tracking_process.TrackingRefused,
                       match=r"test_tracking_process.StorageClientError in fail_like_a_storage_client: 404: bucket not found"):
        tracking_process.call(fail_like_a_storage_client, 404)
    assert tracking_process.call(process_id) == worker  # not taken for a dead one


def test_a_killed_worker_fails_the_call_as_tracking_error_and_the_next_call_starts_a_new_one() -> None:
    worker = tracking_process.call(process_id)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(TrackingError, match="logging process stopped before it finished process_id"):
        tracking_process.call(process_id)
    replacement = tracking_process.call(process_id)
    assert replacement not in (worker, os.getpid())


def die_unless_in(pid: int) -> str:
    """A job that kills the worker running it (as the OOM killer would), but not the caller."""
    if os.getpid() != pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ran in the caller"


def test_a_replacement_worker_that_dies_too_fails_the_call_and_never_moves_logging_here() -> None:
    """Workers start here (one has finished a job): when the retried job kills the replacement
    as well, that is the job's doing, not a process where no worker can start."""
    tracking_process.call(process_id)
    with pytest.raises(TrackingError, match="stopped before it finished die_unless_in"):
        tracking_process.call(die_unless_in, os.getpid())
    with pytest.raises(TrackingError, match="stopped before it finished die_unless_in"):
        tracking_process.call(die_unless_in, os.getpid())  # the retry, in a new worker
    assert tracking_process.call(process_id) != os.getpid()


def leak(tracking_uri: str) -> None:
    """What MLflow's HTTP client raises when the server goes away after the first connection."""
    raise ConnectionError(f"API request to {tracking_uri}api/2.0/mlflow/runs/create failed with exception "
                          "HTTPConnectionPool: Max retries exceeded")


def refuse_upload(tracking_uri: str) -> None:
    """What requests raises when a proxy refuses a model upload: the URL holds the password."""
    raise requests.exceptions.HTTPError(
        f"413 Client Error: Request Entity Too Large for url: {tracking_uri}api/2.0/mlflow-artifacts/artifacts/m")


def test_an_error_that_names_the_tracking_uri_comes_back_without_its_password_and_as_retriable_as_before() -> None:
    uri = "http://forecaster:s3cr3t%2FSENTINEL@mlflow.internal:5000/"
    with pytest.raises(TrackingError) as caught:  # a connection failure: still retried
        tracking_process.call(leak, uri)
    message = str(caught.value)
    assert "mlflow.internal:5000" in message and "ConnectionError" in message
    assert "SENTINEL" not in message and caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(tracking_process.TrackingRefused) as refused:  # an answer: still not retried
        tracking_process.call(refuse_upload, uri)
    assert "413 Client Error" in str(refused.value) and "SENTINEL" not in str(refused.value)
    assert tracking_process.tracking_error_may_pass(caught.value)
    assert not tracking_process.tracking_error_may_pass(refused.value)
    with pytest.raises(PermissionError, match="no URI in it"):  # other errors keep their type
        tracking_process.call(refuse, "no URI in it")


def test_a_candidate_run_written_by_the_worker_is_the_one_this_process_would_write(
        mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = mlflow_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = tracking.connect(Settings())
    experiment = tracking.experiment_id(client, CONFIG.name)
    parent = tracking.start_run(client, experiment=experiment, name="parent", tags={})
    data = panel()
    result = pipeline.backtest_candidate(CONFIG, data, "seasonal_naive")
    entry = pipeline.candidate_log(experiment=experiment, parent_run_id=parent, config=CONFIG, result=result,
                                   panel=data, as_of=data["ts"].max())
    # The figure's data only: four of the six series.
    assert entry.actuals["series_id"].nunique() == 4 and len(entry.actuals) == 4 * 48

    there = tracking_process.call(tracking_process.write_candidate_run, uri, entry)
    here = tracking.write_candidate_log(client, entry)

    runs = {run_id: MlflowClient(uri).get_run(run_id) for run_id in (there, here)}
    assert there != here
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["role"] == "candidate"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["forecast_vs_actual.png"]
    assert runs[there].data.params == runs[here].data.params
    assert runs[there].data.metrics == runs[here].data.metrics
    assert runs[there].data.metrics["mase"] == pytest.approx(result.aggregate["mase"])


def test_where_no_worker_can_start_jobs_run_in_the_caller_after_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    class DaemonPool:  # what ProcessPoolExecutor.submit raises inside a daemon process
        def submit(self, *args: object) -> None:
            raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(tracking_process, "_in_this_process", False)  # restored after the test
    monkeypatch.setattr(tracking_process, "_executor", DaemonPool)
    with caplog.at_level("WARNING", logger="forecasting.tracking_process"):
        assert tracking_process.call(process_id) == os.getpid()
        assert tracking_process.call(process_id) == os.getpid()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "daemonic processes are not allowed" in warnings[0]


def test_a_script_that_runs_a_flow_at_import_runs_it_once_and_logs_here(tmp_path: Path) -> None:
    """A spawned worker imports the script that started its parent: without a main guard the
    script's flow would run again inside the worker. It stops there with a clear error instead,
    and the parent's jobs run in the parent after one warning."""
    script = tmp_path / "unguarded.py"
    script.write_text("import os\n"
                      "from forecasting import tracking_process\n"
                      "tracking_process.start()  # what every flow does first\n"
                      "print('ran here:', tracking_process.call(os.getpid) == os.getpid())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ran here:") == 1 and "ran here: True" in out.stdout
    assert "StartedWhileImported" in out.stderr and 'if __name__ == "__main__":' in out.stderr
    assert out.stderr.count("MLflow logging runs in this process's background thread") == 1


PARENT_THAT_IS_KILLED = textwrap.dedent("""
    import os, sys, time
    from forecasting import tracking_process
    tracking_process.call(os.getpid)  # the worker is up
    print(*tracking_process._pool._processes, flush=True)
    time.sleep(600)
""")


def test_the_logging_process_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A night killed with SIGKILL (the OOM killer, a timeout) left its logging process, ~0.5 GB,
    waiting for a next job for good, reparented to init."""
    root = Path(__file__).resolve().parent.parent
    parent = subprocess.Popen([sys.executable, "-c", PARENT_THAT_IS_KILLED], cwd=root, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(root)})
    worker = 0
    try:
        (worker,) = map(int, parent.stdout.readline().split())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), f"the logging process {worker} outlived its killed parent by 30 s"
    finally:
        parent.kill()
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as ended)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""MLflow: runs, metrics, artifacts, model logging, the registry and the `champion` alias.

The flows reach these through the jobs of `tracking_process`, which run them in the logging
process: the flows' own process never imports this module, nor mlflow.

Everything goes through an explicit MlflowClient and explicit run ids, because Prefect may run
tasks in other threads and `mlflow.active_run()` is thread-local. The one exception is model
logging (`mlflow.<flavor>.log_model` needs an active run): it opens and closes the run it logs
to within one call, in one thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from forecasting import intervals, pyfunc
from forecasting.config import Settings, redact_url, scrub
from forecasting.forecasters import Forecaster, load_forecaster
from forecasting.plots import forecast_vs_actual, forecast_with_intervals
from forecasting.tracking_process import (  # noqa: F401  (defined where the flows, which never import mlflow, see them)
    CHAMPION_ALIAS, NoChampion, RegisteredForecaster, TrackingError, TrackingRefused, UnusableChampion,
    mlflow_error_may_pass, registered_model_name)

if TYPE_CHECKING:
    from forecasting.pipeline import CandidateLog, NightLog

log = logging.getLogger(__name__)

FORECASTER_DIR_TAG = "forecaster_dir"  # where in the model's artifacts our own files lie
# On every version the `champion` alias has pointed at (set as it moves to or from one): the
# versions whose forecasts production served, which a backfill leaves alone. MLflow keeps no
# history of an alias; a version it left before this tag existed is known only while current.
SERVED_TAG = "served_as_champion"


def connect(settings: Settings | None = None) -> MlflowClient:
    """A client for the configured tracking URI, checked by one cheap call.

    An HTTP tracking server that is down would otherwise be retried by MLflow for minutes;
    bound that here and let the flow's own retries (with backoff) decide.
    """
    settings = settings or Settings()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = settings.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if uri.startswith("sqlite:///"):
            _prepare_sqlite_store(uri)
        _check_store_database(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # MlflowException, requests errors, sqlalchemy errors
        # An answer that refuses (wrong credentials, no permission, not MLflow) is not retried.
        refused = isinstance(exc, MlflowException) and not mlflow_error_may_pass(exc)
        error, what = (TrackingRefused, "refused") if refused else (TrackingError, "is not reachable")
        # `from None`: the original exception's text may hold the URL with its password.
        raise error(f"MLflow tracking at {redact_url(uri)} {what}: {scrub(_first_line(exc), uri)}") from None
    return client


def _check_store_database(uri: str) -> None:
    """A PostgreSQL or MySQL tracking store answers within 5 s, or this raises.

    MLflow retries creating its engine 10 times, sleeping 0.1 s to 51 s (101 s in all), inside
    each of the task's own attempts: an unreachable store failed a night after ~7 minutes, every
    candidate trained first, not after the 3 short retries the README promises."""
    backend = uri.split(":", 1)[0].split("+", 1)[0]
    if backend not in ("postgresql", "mysql"):
        return
    import sqlalchemy as sa

    url = sa.make_url(uri)
    # Each driver names its timeout its own way (pg8000: `timeout`); one not listed gets none.
    timeout = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pg8000": "timeout",
               "pymysql": "connect_timeout", "mysqldb": "connect_timeout"}.get(url.get_driver_name())
    engine = sa.create_engine(url, connect_args={timeout: 5} if timeout else {}, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def warm_model_logging() -> None:
    """Build, ahead of time, the module-to-distribution map MLflow needs to log a model.

    Its first `log_model` in a process scans every installed distribution's file list to check
    the pinned requirements (0.6 s of registration's 1.3 s on a sales night, seen with py-spy).
    The nightly flow runs this in its background thread while the candidates train, before
    any model is logged: MLflow fills that global without a lock. The function is MLflow's own
    (private) cache filler, so any failure here only means the first registration pays the
    scan as before; it never fails the night.
    """
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()
    except Exception as exc:  # a renamed helper, a broken dist-info: an optimisation lost
        log.debug("MLflow's package map was not built ahead of registration: %r", exc)


def _prepare_sqlite_store(uri: str) -> None:
    """Create a sqlite store's tables once, however many workers start at the same moment.

    MLflow creates and migrates its tables (alembic) in whichever process first opens the
    store; four flow runs starting together on a fresh `mlflow.db` race on that and fail
    ("Online migration expected to match one row", "database is locked"). An exclusive file
    lock beside the database lets the first process migrate while the others wait; it also
    switches the file to WAL, so that readers never block the runs that log to it.
    """
    path = sqlite_store_path(uri)
    if str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # persistent: once per file
            except sqlite3.OperationalError as exc:  # busy: another run holds it; stay as is
                log.info("MLflow store %s stays in its journal mode: %s", path, exc)


def sqlite_store_path(uri: str) -> Path:
    """The file of a sqlite:/// store URI, without its query (`?timeout=60`), as SQLAlchemy reads it."""
    import sqlalchemy as sa

    return Path(sa.make_url(uri).database or "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Opens the experiment in the UI's "Model training" view (runs, metrics, models), not GenAI's.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, dataset: str) -> str:
    experiment = client.get_experiment_by_name(dataset)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        # MLflow keeps a deleted experiment's name taken and refuses runs in it; every night
        # would fail on that. Restoring it, or purging it, is a person's call.
        eid = experiment.experiment_id
        raise TrackingRefused(
            f"dataset {dataset!r}: its MLflow experiment {dataset!r} (id {eid}) is deleted, and MLflow "
            f"takes no runs in it: restore it (MLflow UI, or `mlflow experiments restore --experiment-id "
            f"{eid}`) or delete it for good (`mlflow gc --experiment-ids {eid}`) so that the next night "
            "starts a new one")
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            dataset, artifact_location=_artifact_location(dataset), tags=EXPERIMENT_KIND
        )
    except MlflowException:  # created meanwhile by a concurrent run
        found = client.get_experiment_by_name(dataset)
        if found is None:
            raise
        return found.experiment_id


def _artifact_location(dataset: str) -> str | None:
    """Beside a sqlite tracking database, not in whatever directory the worker started in."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        db_path = sqlite_store_path(uri).resolve()
        return (db_path.parent / "mlartifacts" / dataset).as_uri()
    return None


def start_run(
    client: MlflowClient,
    *,
    experiment: str,
    name: str,
    tags: dict[str, str],
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id  # what the UI nests on
    run = client.create_run(experiment, run_name=name, tags=all_tags)
    with failed_if_unfinished(client, run.info.run_id):
        if params:
            client.log_batch(
                run.info.run_id, params=[Param(k, _param(v)) for k, v in sorted(params.items())]
            )
    return run.info.run_id


@contextlib.contextmanager
def failed_if_unfinished(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Mark `run_id` FAILED when what follows raises, then raise: a retry of the task makes a
    new run, and this one would otherwise stay RUNNING in the UI for good. Best effort: the
    store that just failed may refuse this too."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, status="FAILED")
        raise


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_metrics(
    client: MlflowClient, run_id: str, metrics: dict[str, float], *, step: int = 0
) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    timestamp = _now_ms()
    client.log_batch(run_id, metrics=[Metric(k, v, timestamp, step) for k, v in clean.items()])


def log_history(client: MlflowClient, run_id: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch train/validation loss with step=epoch, in batches of MLflow's limit; an
    ensemble's as one curve per member (`member_2/train_loss`), each from its epoch 1."""
    timestamp = _now_ms()
    members = {row.get("member", 1) for row in history}
    metrics = []
    for row in history:
        prefix = f"member_{row.get('member', 1)}/" if len(members) > 1 else ""
        for key in ("train_loss", "val_loss"):
            value = row.get(key)
            if value is not None and np.isfinite(value):
                metrics.append(Metric(prefix + key, float(value), timestamp, int(row["epoch"])))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(client: MlflowClient, run_id: str, *, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def _now_ms() -> int:
    """Milliseconds since the epoch, as MLflow stamps runs (not the naive local clock read as UTC)."""
    return int(time.time() * 1000)


def log_figure(client: MlflowClient, run_id: str, figure: Any, name: str) -> None:
    client.log_figure(run_id, figure, name)  # a pyplot-free Figure (forecasting.plots): nothing to close


def log_frame(client: MlflowClient, run_id: str, frame: pd.DataFrame, name: str) -> None:
    """A small table as a CSV artifact (and as an MLflow table the UI renders)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.to_csv(path, index=False)
        client.log_artifact(run_id, str(path))
    table = Path(name).with_suffix(".json").name
    # log_table appends to a table of that name already in the run: a task retried after this
    # line (finish-tracking, when the figure or the end of the run failed) would list every
    # model twice. The CSV above is simply overwritten; the table is written once.
    if table not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        client.log_table(run_id, data=frame, artifact_file=table)


def write_candidate_log(client: MlflowClient, entry: CandidateLog) -> str:
    """`entry` as a run nested under the night's parent run; its run id."""
    run_id = start_run(client, experiment=entry.experiment, name=entry.run_name, tags=entry.tags,
                       params=entry.params, parent_run_id=entry.parent_run_id)
    with failed_if_unfinished(client, run_id):
        log_history(client, run_id, entry.history)
        log_metrics(client, run_id, entry.metrics)
        figure = forecast_vs_actual(entry.actuals, entry.predictions, title=entry.figure_title)
        log_figure(client, run_id, figure, "forecast_vs_actual.png")
        # No loss-curve image: MLflow's UI charts train_loss/val_loss from the history logged above.
        end_run(client, run_id)
    return run_id


def write_night_log(client: MlflowClient, entry: NightLog) -> None:
    """The parent run's review - models x metrics, the forecast with intervals, the outcome -
    then the run ended."""
    log_frame(client, entry.parent_run_id, entry.comparison, "comparison.csv")
    figure = forecast_with_intervals(entry.actuals, entry.forecast, title=entry.figure_title)
    log_figure(client, entry.parent_run_id, figure, "forecast.png")
    log_metrics(client, entry.parent_run_id, entry.metrics)
    set_tags(client, entry.parent_run_id, entry.tags)
    end_run(client, entry.parent_run_id)


# ------------------------------------------------------------------------------ model registry


# Every version's pyfunc, logged as code: MLflow would otherwise cloudpickle an object (and
# warn, rightly, that loading it runs whatever it unpickles).
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
# Versions registered before hold a pickle that names the class here: MLflow's loader finds it.
ForecasterPyfunc = pyfunc.ForecasterPyfunc


INTERVAL_TAG = "interval_quantiles"
INTERVAL_LEVEL_TAG = "interval_level"
TRAINED_THROUGH_TAG = "trained_through"


def tag_version(
    client: MlflowClient, dataset: str, version: str, *, quantiles: list[float], level: float,
    trained_through: pd.Timestamp,
) -> None:
    """What a later night needs of a version: its interval quantiles and its data's end."""
    name = registered_model_name(dataset)
    client.set_model_version_tag(name, version, INTERVAL_TAG, json.dumps(quantiles))
    client.set_model_version_tag(name, version, INTERVAL_LEVEL_TAG, str(level))
    client.set_model_version_tag(name, version, "interval_method", intervals.METHOD)
    client.set_model_version_tag(name, version, TRAINED_THROUGH_TAG, str(trained_through))


def log_and_register(
    client: MlflowClient, forecaster: Forecaster, *, run_id: str, dataset: str, panel: pd.DataFrame,
    quantiles: list[float], level: float,
) -> str:
    """Log the fitted forecaster to `run_id` as a pyfunc (see forecasting.pyfunc), register it,
    return the new version number.

    Idempotent per run, so that a retry after a later failure registers no second version; the
    retry still tags the version it finds, since that failure may have come before the tags, and
    a version without FORECASTER_DIR_TAG could be promoted but never loaded.
    """
    name = registered_model_name(dataset)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
        # The candidate's run was FINISHED before its model was logged to it; a failure as that
        # logging closed the run may have left it RUNNING or FAILED.
        if client.get_run(run_id).info.status != "FINISHED":
            client.set_terminated(run_id)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / pyfunc.FORECASTER_ARTIFACT
            forecaster.save(files)
            calibration = pyfunc.write_calibration(Path(tmp) / pyfunc.CALIBRATION_FILE, dataset=dataset,
                                                   quantiles=quantiles, level=level)
            with mlflow.start_run(run_id=run_id), _imports_restored():
                info = _log_pyfunc(forecaster, files=files, calibration=calibration, panel=panel, name=name)
        version = str(info.registered_model_version)
    # Only where missing: a version this run registered before this release keeps its own
    # (a network's files were under extra_files)
    if FORECASTER_DIR_TAG not in client.get_model_version(name, version).tags:
        client.set_model_version_tag(name, version, FORECASTER_DIR_TAG, f"artifacts/{pyfunc.FORECASTER_ARTIFACT}")
    client.set_model_version_tag(name, version, "model", forecaster.name)
    return version


@contextlib.contextmanager
def _imports_restored() -> Iterator[None]:
    """sys.path and sys.modules as they were: MLflow loads the model it logs to check its input
    example, which put the model's (temporary) code directory on sys.path and its model file in
    sys.modules, once per version, for the life of the logging process."""
    import sys

    path, modules = set(sys.path), set(sys.modules)
    try:
        yield
    finally:
        # only what was added: the flow's threads may run this (no logging process) and change sys.path
        sys.path[:] = [entry for entry in sys.path if entry in path]
        for added in set(sys.modules) - modules:
            if added.startswith("code_model"):  # MLflow's name for a model file it ran
                del sys.modules[added]


def _requirements() -> list[str]:
    """Pinned from what is installed: MLflow would otherwise infer them by importing the model
    in a subprocess, several seconds per model logged. The model's code (this package) imports
    the ones after mlflow."""
    from importlib.metadata import version

    from packaging.version import Version

    # Without a local label ("2.13.0+cpu"), which no package index but the build's own serves;
    # MLflow's own inference drops it too.
    return [f"{package}=={Version(version(package)).public}"
            for package in ("torch", "numpy", "pandas", "statsmodels", "mlflow",
                            "pydantic", "pydantic-settings", "pyyaml", "sqlalchemy")]


def _log_pyfunc(forecaster: Forecaster, *, files: Path, calibration: Path, panel: pd.DataFrame, name: str) -> Any:
    example = forecaster.example_input(panel)
    # The signature needs the output's columns, not every series' forecast: predicting only
    # the example's series keeps registration constant-time (it was the final ETS forecast of
    # the whole panel, 365 s of 713 s at 1,000 series).
    model = pyfunc.ForecasterPyfunc.of(forecaster, json.loads(calibration.read_text()))
    output = model.predict(None, panel[panel["series_id"].isin(example["series_id"].unique())]).head(6)
    with warnings.catch_warnings():  # the output's `step` is an integer never missing: the hint does not apply
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        signature = infer_signature(example, output)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_MODEL_FILE),
        artifacts={pyfunc.FORECASTER_ARTIFACT: str(files), pyfunc.CALIBRATION_ARTIFACT: str(calibration)},
        # The model's code, so that it loads where this package is not installed
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
        registered_model_name=name,
        await_registration_for=60,
    )


def champion_version(client: MlflowClient, dataset: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(registered_model_name(dataset), CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def load_version(client: MlflowClient, dataset: str, version: str) -> RegisteredForecaster:
    """Load a registered version through our own files (weights_only), never by unpickling."""
    name = registered_model_name(dataset)
    model_version = client.get_model_version(name, version)
    subdir = model_version.tags.get(FORECASTER_DIR_TAG)
    if subdir is None:  # registered by hand, or by another tool: nothing here can load it
        raise UnusableChampion(str(version), (
            f"dataset {dataset!r}: version {version} of {name!r} has no {FORECASTER_DIR_TAG!r} tag, so it "
            "was not registered by this pipeline and cannot be loaded by it"))
    with tempfile.TemporaryDirectory() as tmp:
        # From the client's own store: "models:/name/N" would be resolved in MLflow's global
        # registry, which a caller's client need not be (another store's version N, or none).
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version), dst_path=tmp,
            tracking_uri=client.tracking_uri,
        )
        forecaster = load_forecaster(Path(local) / subdir)
    quantiles = json.loads(model_version.tags.get(INTERVAL_TAG, "[]"))
    if len(quantiles) != forecaster.horizon:  # registered before intervals: no interval
        quantiles = [float("nan")] * forecaster.horizon
    trained = model_version.tags.get(TRAINED_THROUGH_TAG)
    level = model_version.tags.get(INTERVAL_LEVEL_TAG)
    return RegisteredForecaster(forecaster, str(version), model_version.run_id, quantiles,
                                pd.Timestamp(trained) if trained else None,
                                float(level) if level else None)


def load_champion(client: MlflowClient, dataset: str) -> RegisteredForecaster | None:
    version = champion_version(client, dataset)
    if version is None:
        return None
    return load_version(client, dataset, version.version)


def set_champion(client: MlflowClient, dataset: str, version: str, *, replaces: str | None) -> str | None:
    """Move `champion` to `version` if it still points at `replaces` (None: no alias), as when
    the night read it; the version it points at afterwards (None: no alias).

    `version` when it moved, or already pointed there (a retry). Anything else is where another
    run (or a person, by hand) moved it during the night, and there it stays: this night was
    compared against `replaces`, not against that version. So a backfill night never moves the
    alias back past a newer night's model that finished first; in the other order the newer
    night is the one left out, until the next night compares against the backfill's model.
    MLflow has no compare-and-set: this narrows the race to milliseconds.
    """
    current = champion_version(client, dataset)
    found = str(current.version) if current is not None else None
    if found not in (replaces, version):
        return found
    # Tagged first: a retry after a failure between the two finds the alias moved and returns.
    for served in {version, found} - {None}:
        mark_served(client, dataset, served)
    client.set_registered_model_alias(registered_model_name(dataset), CHAMPION_ALIAS, version)
    return version


def mark_served(client: MlflowClient, dataset: str, version: str) -> None:
    """Tag `version` as one whose forecasts production served: as the alias moves to or from it,
    and when `predict` forecasts with it (the alias may have been moved there by hand, and its
    moving on later would leave no trace)."""
    client.set_model_version_tag(registered_model_name(dataset), version, SERVED_TAG, "true")


def served_versions(client: MlflowClient, dataset: str) -> list[str]:
    """The versions whose forecasts production served: every one tagged SERVED_TAG, and the one
    `champion` points at now (by hand too), in version order."""
    name = registered_model_name(dataset)
    served, token = set(), None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        served |= {str(v.version) for v in page if (v.tags or {}).get(SERVED_TAG) == "true"}
        token = page.token
        if not token:
            break
    current = champion_version(client, dataset)
    if current is not None:
        served.add(str(current.version))
    return sorted(served, key=int)


def restore_champion(client: MlflowClient, dataset: str, version: str | None, *, from_version: str) -> None:
    """Point `champion` back at `version` (None: take it off) if it points at `from_version`:
    a night's alias move undone when its rows could not be committed."""
    current = champion_version(client, dataset)
    if current is None or str(current.version) != from_version:
        return
    if version is None:
        client.delete_registered_model_alias(registered_model_name(dataset), CHAMPION_ALIAS)
    else:
        client.set_registered_model_alias(registered_model_name(dataset), CHAMPION_ALIAS, version)

"""`forecasting` commands. Thin: parse arguments, call the package or the flows, print."""

from __future__ import annotations

import argparse
import atexit
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forecasting.config import (ConfigError, DatasetConfig, Settings, SettingError, check_dask_address, load_config,
                                load_yaml, parse_as_of, redact_url)
from forecasting.tracking_process import NoChampion, UnusableChampion

# Prefect's temporary local API sends a telemetry heartbeat as it starts, which races its own
# fresh SQLite database ("database is locked" tracebacks in every first run) and cannot reach
# the internet from a closed network anyway. Off unless the user says otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

console = Console(soft_wrap=True)  # long commands stay copyable when not a TTY
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIGS = (PROJECT_ROOT / "configs" / "sales.yaml", PROJECT_ROOT / "configs" / "weather.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, ValueError, RuntimeError, NoChampion, UnusableChampion) as exc:
        exc = _setting_error_in(exc) or exc
        config = getattr(args, "config", None)
        where = f"{config}: " if config is not None and str(config) not in str(exc) and not isinstance(
            exc, SettingError) else ""
        console.print(f"[bold red]error:[/] {escape(f'{where}{exc}')}", highlight=False)
        return 2


def _setting_error_in(exc: Exception) -> SettingError | None:
    """The SettingError that pydantic wrapped when Settings() validated the environment (e.g. on
    importing the flows), so that it prints as itself: one line naming the variable."""
    errors = getattr(exc, "errors", None)
    if not callable(errors) or not isinstance(exc, ValueError):
        return None
    try:
        found = [e.get("ctx", {}).get("error") for e in errors()]
    except Exception:  # noqa: BLE001 - another ValueError with an errors attribute
        return None
    return next((e for e in found if isinstance(e, SettingError)), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forecasting",
        description="Nightly RNN/LSTM/GRU forecasting: SQL in, Prefect + MLflow, forecasts back to SQL. "
        "Database: $FORECASTING_DATABASE_URL (default sqlite:///forecasting.db); "
        "MLflow: $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db); "
        "Dask: $FORECASTING_DASK_ADDRESS (default: none, everything runs in this process).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("init-db", cmd_init_db, "Create the forecast and score tables and views (idempotent).")
    command("load-demo", cmd_load_demo, "Write the real demo data (aus_retail sales, Seattle weather) into the database.")
    for name, handler, help in (
        ("run", cmd_run, "One nightly flow run: backtest, compare, promote, forecast, write."),
        ("predict", cmd_predict, "Forecast with the registered champion (no training) and write the rows."),
    ):
        sub = command(name, handler, help)
        sub.add_argument("--config", required=True, type=Path, help="dataset config (YAML)")
        sub.add_argument("--as-of", default=None, help="use data up to this ISO date/date-time (default: the last timestamp)")
        if name == "run":
            add_dask_option(sub)
    sub = command("backfill", cmd_backfill, "Run the flow for every as_of from --start to --end at the dataset's freq, oldest first.")
    sub.add_argument("--config", required=True, type=Path, help="dataset config (YAML)")
    sub.add_argument("--start", required=True, help="first as_of (ISO date)")
    sub.add_argument("--end", required=True, help="last as_of (ISO date)")
    add_dask_option(sub)
    command("demo", cmd_demo, "init-db, load-demo, then run both demo configs (the main job on embedded defaults).")
    sub = command("serve", cmd_serve, "Serve the deployments of prefect.yaml on their schedules from one process.")
    sub.add_argument("--prefect-yaml", type=Path, default=PROJECT_ROOT / "prefect.yaml")
    return parser


def add_dask_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="train the candidates and run the per-series shards on a Dask cluster: the scheduler at "
        "ADDRESS (tcp://host:8786), or without ADDRESS a local cluster of one worker process per core "
        "(default: $FORECASTING_DASK_ADDRESS; unset, everything runs in this process)",
    )


def on_cluster(flow: Any, args: argparse.Namespace) -> Any:
    """The flow on the cluster that `--dask` names; without it, as the environment configured it."""
    if args.dask is None:
        return flow
    from flows.nightly import on_dask

    console.print(f"Dask: {'a local cluster' if args.dask == 'local' else args.dask}")
    return on_dask(flow, args.dask)


# ------------------------------------------------------------------------------------ handlers


def flow_module() -> ModuleType:
    """flows.nightly, imported while Prefect's temporary local API starts beside it.

    Without PREFECT_API_URL, a flow run starts a temporary Prefect API in a subprocess (several
    seconds) at its first call. Starting that subprocess first lets it boot while this process
    imports torch, MLflow and Prefect (3 s), instead of after; the flow then finds it running.
    """
    starting = _start_local_prefect_api()
    import flows.nightly

    if starting is not None:
        starting.join()  # running (or failed, and the flow will start it) before any flow call
    for name in ("prefect.task_runs", "prefect.flow_runs"):  # after Prefect configured its logging
        logging.getLogger(name).addFilter(_ExpectedErrorsWithoutTraceback())
    return flows.nightly


class _ExpectedErrorsWithoutTraceback(logging.Filter):
    """Prefect's task and flow loggers log a failure with its traceback: two tracebacks, 75 lines,
    above the CLI's one line for a duplicate timestamp. For the errors whose message says all
    (bad data or config, a refused write, no champion) the traceback is dropped; the log line,
    which names the error, stays. Any other exception, a bug, keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _expected_errors()):
            record.exc_info, record.exc_text = None, None
        return True


def _expected_errors() -> tuple[type[BaseException], ...]:
    from forecasting import db, pipeline
    from forecasting.backtest import NoDefinedMase
    from forecasting.tracking_process import TrackingRefused
    from forecasting.validate import ValidationFailed

    # Not db.DatabaseError: an unreachable database, but also SQLite's "no such column" from a bug
    return (ConfigError, SettingError, db.DataError, db.OutputNotWritable, ValidationFailed,
            NoDefinedMase, pipeline.ChampionMoved, pipeline.RequestRefused, NoChampion, UnusableChampion,
            TrackingRefused)


# How long the early start waits for Prefect's local API: a first start on a fresh PREFECT_HOME
# creates its database, about 30 s here, past Prefect's own default (20 s).
EARLY_START_TIMEOUT_S = 120


def _start_local_prefect_api() -> threading.Thread | None:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    def start() -> None:
        server = None
        try:
            from prefect.server.api.server import SubprocessASGIServer  # what the flow's client uses
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

            server = SubprocessASGIServer()
            server.start(timeout=max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), EARLY_START_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - the flow's own start reports what is wrong
            # A start that timed out leaves its process running; the flow's start would launch a
            # second, and Prefect stops only that one at exit: the first outlived the command
            # (holding its stdout, so `forecasting run | tee` never ended). Stopped here.
            if server is not None:
                server.stop()
            logging.getLogger(__name__).debug("early start of Prefect's local API failed: %s", exc)

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread


def cmd_init_db(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from forecasting import db

    settings = Settings()
    engine = db.make_engine(settings)
    try:
        with db.naming_connection_errors(engine), engine.begin() as conn:
            migrated = db.init_db(conn)
    except sa.exc.DBAPIError as exc:  # a role without CREATE: a raw "permission denied for schema" before
        reason = db.write_refusal(exc)
        if reason is None:
            raise
        if getattr(exc.orig, "sqlstate", None) == "42501":
            reason = (f"the role may not create the pipeline's tables ({str(exc.orig).strip().splitlines()[0]}); "
                      "GRANT CREATE ON SCHEMA to it, or run init-db as the schema's owner")
        raise db.DatabaseError(f"init-db on {settings.safe_database_url} was refused and created nothing: "
                               f"{reason}") from None
    finally:
        engine.dispose()
    console.print(f"schema applied to {settings.safe_database_url}")
    for name in migrated:
        console.print(f"migrated: {name}")
    return 0


def cmd_load_demo(args: argparse.Namespace) -> int:
    from forecasting import db, demo

    settings = Settings()
    engine = db.make_engine(settings)
    with db.naming_connection_errors(engine), engine.begin() as conn:
        written = demo.load_demo(conn)
    for table, rows in written.items():
        console.print(f"{table}: {rows} rows upserted into {settings.safe_database_url}")
    return 0


def check_config(args: argparse.Namespace) -> None:
    """Read and validate --config before anything slow.

    The check takes milliseconds, so a bad file fails as soon as the command starts (about 1 s
    here), not after the flows' imports (3-5 s) and the start of Prefect's local API (30 s on a
    fresh PREFECT_HOME), which would have been left running until this process exits. The
    flow reads it again (it takes a path, as a deployment's parameter does).
    """
    config = load_config(args.config)
    from forecasting.baselines import workers  # numpy only: its variable fails before, not at the ETS backtest

    workers()
    for option in ("as_of", "start", "end"):  # parse_as_of reads "" as none: --as-of "" meant the latest
        given = getattr(args, option, None)
        if given is not None and not given.strip():
            raise ValueError(f"`--{option.replace('_', '-')}` ({given!r}) is empty: give an ISO 8601 date, "
                             "e.g. 2017-12-01" + (", or leave the option out" if option == "as_of" else ""))
    dates = {option: parse_as_of(getattr(args, option, None), name="--" + option.replace("_", "-"))
             for option in ("as_of", "start", "end")}  # the dates, likewise
    if dates["start"] is not None and dates["end"] is not None and dates["start"] > dates["end"]:
        raise ValueError(f"backfill range --start ({args.start}) .. --end ({args.end}) is reversed")
    check_cluster(args)
    if hasattr(args, "dask"):  # the commands that train (predict forecasts on the CPU)
        check_device(config, args.config)
    check_source(config)


def check_device(config: DatasetConfig, path: str) -> None:
    """training.device 'cuda' on a machine without CUDA: it failed only when the first network
    trained, after the baselines' backtests, naming no dataset. Checked with --dask too: the
    current champion is re-scored, trained again, in this process (and a local cluster's
    workers are this machine)."""
    if config.training.device != "cuda":
        return
    from forecasting.train import check_training_device  # torch only for this case: milliseconds otherwise

    try:
        check_training_device(config.training.device, dataset=config.name)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_cluster(args: argparse.Namespace) -> None:
    """--dask, else $FORECASTING_DASK_ADDRESS: 'local' or a scheduler address; one that answers
    where the command runs on it (the commands with --dask). The flows' module reads the
    variable when imported, so every flow command checks its form."""
    from pydantic import ValidationError

    option = getattr(args, "dask", None)
    try:  # the variable's form, as every Settings() validates it, --dask or not
        environment = Settings().forecasting_dask_address
    except ValidationError as exc:
        raise _setting_error_in(exc) or exc from None
    if option:
        check_dask_address(option, name="--dask", reachable=True)
    elif environment and hasattr(args, "dask"):
        check_dask_address(environment, name="FORECASTING_DASK_ADDRESS", reachable=True)


def check_source(config: DatasetConfig) -> None:
    """The source table (or query) and its columns, checked without reading a row (tens of
    milliseconds): a typo fails here, not after Prefect's start-up with the flow's tracebacks.
    An unreachable database is left to the flow, whose load task retries it."""
    from forecasting import db

    engine = db.make_engine(Settings())
    try:
        with engine.connect() as conn:
            db.check_source(conn, config)
    except db.CONNECTION_ERRORS:
        pass
    finally:
        engine.dispose()


def cmd_run(args: argparse.Namespace) -> int:
    check_config(args)
    nightly = flow_module().nightly
    summary = on_cluster(nightly, args)(config=str(args.config), as_of=args.as_of)
    print_summary(summary)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    check_config(args)
    predict = flow_module().predict

    summary = predict(config=str(args.config), as_of=args.as_of)
    console.print(
        f"{summary['dataset']} as_of {summary['as_of']}: {summary['forecast_rows']} rows written by "
        f"champion {summary['model']} (version {summary['model_version']})"
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    check_config(args)
    backfill = flow_module().backfill

    summaries = on_cluster(backfill, args)(config=str(args.config), start=args.start, end=args.end)
    for summary in summaries:
        console.print(f"{summary['as_of']}: champion {summary['champion']}, {summary['forecast_rows']} rows")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    nightly = flow_module().nightly

    started = time.perf_counter()
    cmd_init_db(args)
    cmd_load_demo(args)
    for config in DEMO_CONFIGS:
        summary = nightly(config=str(config), as_of=None)
        print_summary(summary)
    settings = Settings()
    console.print(f"\ndemo finished in {time.perf_counter() - started:.0f}s\n")
    console.print("Look at the runs and the registry in the MLflow UI:")
    mlflow = Path(sys.executable).parent / "mlflow"  # this environment's, whether activated or not
    command = os.path.relpath(mlflow) if mlflow.exists() else "mlflow"
    console.print(f"  {command} ui --backend-store-uri {redact_url(settings.mlflow_tracking_uri)}   # then open http://127.0.0.1:5000")
    console.print("Query the forecasts:")
    url = settings.database_url
    if url.startswith("sqlite:///"):
        console.print("  (with the sqlite3 command-line tool, e.g. apt install sqlite3)")
        console.print(f"  sqlite3 {url.removeprefix('sqlite:///')} \"SELECT series_id, ts, value, model FROM forecasts WHERE dataset = 'sales' ORDER BY as_of DESC, series_id, ts LIMIT 24\"")
    else:
        console.print("  SELECT series_id, ts, value, model FROM forecasts WHERE dataset = 'sales' ORDER BY as_of DESC, series_id, ts LIMIT 24;")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    deployments = deployments_from_yaml(args.prefect_yaml)
    if not PREFECT_API_URL.value():
        # Prefect would serve them from a temporary API that exists only while this process
        # runs: the schedules, runs and UI would vanish with it (and its Ctrl+C ends in
        # connection tracebacks, as that API stops before the runner).
        raise ConfigError("`forecasting serve` needs a Prefect server: start one (`prefect server start`) "
                          "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    check_prefect_server(str(PREFECT_API_URL.value()))
    served = served_deployments(deployments, args.prefect_yaml)
    console.print(f"serving {', '.join(d['name'] for d in deployments)} (Ctrl+C to stop)")
    serve(*served)
    return 0


def check_prefect_server(api_url: str) -> None:
    """A server answers at `api_url`, asked by Prefect's own client (its TLS and auth settings:
    PREFECT_API_SSL_CERT_FILE, PREFECT_API_KEY...). An unreachable one ended serve in httpx's
    ConnectError traceback."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        failed = client.api_healthcheck()
    if failed is not None:
        raise ConfigError(f"PREFECT_API_URL ({redact_url(api_url)!r}): no Prefect server answers there "
                          f"({type(failed).__name__}: {failed}); start one (`prefect server start`) or correct the URL")


def served_deployments(deployments: list[dict[str, Any]], source: Path | None = None) -> list[Any]:
    """The nightly flow's RunnerDeployments, named by module path (`flows.nightly:nightly`).

    The runner starts each run as `python -m prefect.engine`, which loads the flow from its
    entrypoint. From a file path (`flows/nightly.py:nightly`, to_deployment's default) it is
    loaded as a module `nightly`, and the tasks Dask pickles for a remote cluster name that
    module, which no worker can import: every run on such a cluster failed.

    Each is checked as the server would take it, before anything is served, and refused in one
    line naming `source` (prefect.yaml) and the deployment: a parameter the flow does not take
    (every scheduled run failed on it) or a schedule option Prefect refuses (a timezone, say).
    """
    from prefect.deployments.runner import EntrypointType
    from pydantic import ValidationError

    from flows.nightly import nightly

    where = f"{source}: " if source is not None else ""
    accepted = list(inspect.signature(nightly.fn).parameters)
    served = []
    for d in deployments:
        given = [("parameters", d["parameters"])] + [(f"schedules[{i}].parameters", schedule.parameters)
                                                     for i, schedule in enumerate(d["schedules"])]
        for key, parameters in given:
            unknown = sorted(set(parameters or {}) - set(accepted))
            if unknown:
                raise ConfigError(f"{where}deployment {d['name']!r}: {key} names {unknown[0]!r}, which the nightly "
                                  f"flow does not take (it takes {', '.join(accepted)})")
        try:
            served.append(nightly.to_deployment(**d, entrypoint_type=EntrypointType.MODULE_PATH))
        except ValidationError as exc:
            raise ConfigError(f"{where}deployment {d['name']!r}: {_one_line(exc)}") from None
    return served


NIGHTLY_ENTRYPOINT = "flows.nightly:nightly"  # the one flow `forecasting serve` serves
# What `forecasting serve` reads of a prefect.yaml deployment; `work_pool` is `prefect deploy`'s.
_DEPLOYMENT_KEYS = {"name", "entrypoint", "description", "parameters", "tags", "schedules", "work_pool"}
_WORK_POOL_KEYS = {"name", "work_queue_name"}  # all of a work pool that serve can leave aside
_SCHEDULE_KEYS = {"timezone", "active", "parameters", "slug", "day_or", "anchor_date"}


def deployments_from_yaml(path: Path) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml as `Flow.to_deployment` keyword arguments.

    A key this does not carry over is refused, naming it, rather than dropped: a schedule's
    `active: false` or `parameters` silently lost would run what the file says not to.
    """
    try:
        spec = load_yaml(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--prefect-yaml {str(path)!r}: cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    listed = spec.get("deployments") if isinstance(spec, dict) else None
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{path}: `deployments` ({listed!r}) must be a list of deployments (mappings with a "
                          "name), and hold at least one")
    deployments, names = [], set()
    for index, item in enumerate(listed):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}: deployments[{index}] ({item!r}) is not a deployment: a mapping with a "
                              "`name` (text) and its keys")
        if name in names:  # the server keys a deployment by flow and name: the second replaced the first
            raise ConfigError(f"{path}: deployment {name!r} is named twice: each deployment needs its own name")
        names.add(name)
        unknown = sorted(set(item) - _DEPLOYMENT_KEYS)
        if unknown:
            raise ConfigError(f"{path}: deployment {name!r}: key {unknown[0]!r} is not read by "
                              "`forecasting serve`; use `prefect deploy` for it")
        _check_work_pool(path, name, item.get("work_pool"))
        entrypoint = item.get("entrypoint", NIGHTLY_ENTRYPOINT)
        if entrypoint != NIGHTLY_ENTRYPOINT:  # serve runs the nightly flow: another was run in its place
            raise ConfigError(f"{path}: deployment {name!r}: entrypoint {entrypoint!r} is not served by "
                              f"`forecasting serve`, which serves {NIGHTLY_ENTRYPOINT!r} only; use `prefect deploy` "
                              "for it")
        parameters = _with_checked_config(path, name, "parameters", item.get("parameters", {}))
        raw_schedules = item.get("schedules") or []  # `schedules:` with nothing under it: none
        if not isinstance(raw_schedules, list):
            raise ConfigError(f"{path}: deployment {name!r}: schedules ({raw_schedules!r}) must be a list of "
                              "schedules (mappings with cron, interval or rrule)")
        tags = item.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise ConfigError(f"{path}: deployment {name!r}: tags ({tags!r}) must be a list of texts")
        schedules = [_schedule(path, name, i, raw) for i, raw in enumerate(raw_schedules)]
        # The nightly flow has no default config: a scheduled run without one failed at night
        # ("config: Field required"). A schedule's own parameters override the deployment's. A
        # deployment with no schedules is left alone: its runs are started by hand, with theirs.
        if "config" not in parameters and any("config" not in s.parameters for s in schedules if s.active):
            raise ConfigError(f"{path}: deployment {name!r}: parameters.config is missing: the nightly flow "
                              "needs a dataset config (a YAML path, relative to this file's directory) for "
                              "its scheduled runs")
        deployments.append(dict(
            name=name,
            description=item.get("description"),
            parameters=parameters,
            tags=tags,
            schedules=schedules,
        ))
    return deployments


def _check_work_pool(path: Path, deployment: str, work_pool: Any) -> None:
    """A deployment's `work_pool` is `prefect deploy`'s: serve runs the flow in its own process,
    so only the pool's name may be there. Its `job_variables` (an `env` with the database URL,
    say) were dropped without a word: the served runs wrote to serve's own default database."""
    if work_pool is None:
        return
    if not isinstance(work_pool, dict):
        raise ConfigError(f"{path}: deployment {deployment!r}: work_pool ({work_pool!r}) must be a mapping "
                          "(name, work_queue_name)")
    # Prefect writes `job_variables: {}` into every deployment it generates: only a value is lost
    ignored = sorted(key for key in set(work_pool) - _WORK_POOL_KEYS if work_pool[key])
    if ignored:
        raise ConfigError(f"{path}: deployment {deployment!r}: work_pool.{ignored[0]} is not applied by "
                          "`forecasting serve`, whose runs start in its own process and environment: set "
                          "environment variables where serve runs, or use `prefect deploy`")


def _with_checked_config(path: Path, deployment: str, where: str, parameters: Any) -> dict[str, Any]:
    """`parameters` with its `config` (if any) checked as the served run will read it, and a
    relative path made absolute against prefect.yaml's directory.

    The runner starts each run as `python -m prefect.engine` in `forecasting serve`'s own working
    directory (a module-path entrypoint, no storage, no pull steps: prefect.yaml's
    set_working_directory is `prefect deploy`'s), so a relative path would have depended on
    where serve was started; an absolute one means the same in every run. A missing file, a
    directory or a config that does not load failed only at night, when the run started:
    it is refused here, before anything is served. A mapping is a config given inline (the
    flow's parameter is `DatasetConfig | str`, and the run validates a mapping into one).
    """
    if parameters is None:  # `parameters:` with nothing under it
        return {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"{path}: deployment {deployment!r}: {where} ({parameters!r}) is not a mapping of "
                          "parameter names to values")
    parameters = dict(parameters)
    if "config" not in parameters:
        return parameters
    value = parameters["config"]
    named = f"{path}: deployment {deployment!r}: {where}.config"
    if isinstance(value, dict):
        try:
            DatasetConfig.from_mapping(value, origin=f"{where}.config")  # what load_config does with a mapping
        except ConfigError as exc:
            raise ConfigError(f"{named} (a mapping) is not a dataset config: {_one_line(exc)}") from None
        return parameters
    if not isinstance(value, str):  # YAML gave a number, a list, a date, null...: the run's validation refuses it
        raise ConfigError(f"{named} ({value!r}) is neither a path to a dataset config (YAML) nor a mapping "
                          f"of one, but {type(value).__name__}")
    if not value.strip():  # else read as prefect.yaml's directory
        raise ConfigError(f"{named} ({value!r}) is empty: give the path of a dataset config (YAML)")
    # Absolute, not resolved: a config reached through a symlink is read through it every night,
    # so repointing the link changes the config, as it would for a path given to `run`.
    absolute = path.parent.absolute() / Path(value).expanduser()
    if not absolute.exists():
        relative = not Path(value).expanduser().is_absolute()
        looked = ("" if str(absolute) == value else f": looked for {str(absolute)!r}"
                  + (f" (relative to {path.name}'s directory)" if relative else ""))
        raise ConfigError(f"{named} ({value!r}) does not exist{looked}")
    if absolute.is_dir():
        raise ConfigError(f"{named} ({value!r}) is a directory, not a dataset config (YAML)")
    try:
        load_config(str(absolute))  # as the run reads it
    except ConfigError as exc:
        raise ConfigError(f"{named} ({value!r}) does not load as a dataset config: {_one_line(exc)}") from None
    parameters["config"] = str(absolute)
    return parameters


def _one_line(exc: Exception) -> str:
    """A config's validation error (one line per problem) on one line: serve refuses in one."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _schedule(path: Path, deployment: str, index: int, raw: dict[str, Any]) -> Any:
    """One schedule of prefect.yaml: cron, interval (seconds) or rrule, with its options; its own
    `parameters.config` checked and resolved as the deployment's is."""
    from prefect.schedules import Cron, Interval, RRule

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: deployment {deployment!r}: schedules[{index}] ({raw!r}) is not a schedule: a "
                          "mapping with one of cron, interval, rrule (and its options)")
    kinds = [k for k in ("cron", "interval", "rrule") if k in raw]
    unknown = sorted(set(raw) - _SCHEDULE_KEYS - {"cron", "interval", "rrule"})
    if len(kinds) != 1 or unknown:
        problem = f"key {unknown[0]!r} is not read" if unknown else "needs exactly one of cron, interval, rrule"
        raise ConfigError(f"{path}: deployment {deployment!r}: schedule {raw!r}: {problem}")
    kind = kinds[0]
    options = {k: v for k, v in raw.items() if k != kind}
    if "parameters" in options:
        options["parameters"] = _with_checked_config(path, deployment, f"schedules[{index}].parameters",
                                                     options["parameters"])
    try:
        return {"cron": Cron, "interval": Interval, "rrule": RRule}[kind](raw[kind], **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: deployment {deployment!r}: schedule {raw!r}: {exc}") from None


# --------------------------------------------------------------------------------------- output


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['dataset']} as of {summary['as_of']}", show_lines=False)
    table.add_column("model")
    table.add_column("backtest MASE", justify="right")
    table.add_column("vs seasonal naive", justify="right")
    table.add_column("")
    for model, mase in summary["mase"].items():
        ratio = summary["mase_vs_seasonal_naive"].get(model)
        mark = "champion of backtest" if model == min(summary["mase"], key=summary["mase"].get) else ""
        table.add_row(model, f"{mase:.4f}", "" if ratio is None or pd.isna(ratio) else f"{ratio:.3f}x", mark)
    console.print(table)
    decision = {"promoted": "promoted to champion", "refreshed": "champion refitted on tonight's data",
                "kept": "current champion kept", "backfill": "backfill: alias untouched",
                "superseded": "superseded, nothing written: the alias moved meanwhile, or a backfill night met "
                              "production's (the reason is the MLflow tag promotion.reason)"}[summary["decision"]]
    console.print(
        f"champion: [bold]{summary['champion']}[/] version {summary['model_version']} ({decision}); "
        f"rows written: {summary['forecast_rows']} forecasts, {summary['score_rows']} scores"
    )
    if summary.get("dropped_series"):
        console.print(f"[yellow]dropped series:[/] {', '.join(summary['dropped_series'])}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items())
    console.print(f"wall time per stage: {stages}")


def entry_point() -> None:
    """The `forecasting` command."""
    exit_quickly(main())


def exit_quickly(code: int) -> None:
    """End the process the way the interpreter would, less its module teardown.

    Freeing torch's, MLflow's and Prefect's modules one by one after a run took 1-2 s of
    nothing useful. What matters still runs, in the interpreter's order: the threading exit
    hooks and the join of non-daemon threads (Prefect stops its worker threads there), the
    atexit handlers (Prefect's log and event flushes, MLflow's, logging's), the flush of the
    standard streams.
    """
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first
    if shutdown is None:  # not CPython: exit as usual
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()

"""The `forecasting` console script: help for every command, init-db/load-demo, run's summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from forecasting import cli
from forecasting.cli import deployments_from_yaml, main, served_deployments
from forecasting.config import ConfigError
from tests.flow_fixtures import load_sales, tiny_config

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["init-db", "load-demo", "run", "predict", "backfill", "demo", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "usage: forecasting " + command in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "forecasting"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in result.stdout


def test_console_script_exits_with_the_commands_code_and_all_its_output(
        env: dict[str, str], tmp_path: Path) -> None:
    """The script skips the interpreter's teardown (cli.exit_quickly): the exit code, the output
    and the work must still all be there."""
    script = Path(sys.executable).parent / "forecasting"
    done = subprocess.run([str(script), "init-db"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith("schema applied to ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfreq: MS\n")
    failed = subprocess.run([str(script), "run", "--config", str(bad)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert failed.returncode == 2
    assert "bad.yaml" in failed.stdout and "source" in failed.stdout
    engine = sa.create_engine(env["FORECASTING_DATABASE_URL"])
    with engine.connect() as conn:  # init-db's transaction was committed before the quick exit
        assert "forecast_runs" in sa.inspect(conn).get_table_names()
    engine.dispose()


def test_init_db_twice_then_load_demo(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init-db"]) == 0
    assert main(["init-db"]) == 0
    assert main(["load-demo"]) == 0
    out = capsys.readouterr().out
    assert "sales: 64532 rows" in out and "weather: 1461 rows" in out
    engine = sa.create_engine(env["FORECASTING_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(DISTINCT series_id) FROM sales")).scalar_one() == 152
    engine.dispose()


@pytest.mark.parametrize("command", ["init-db", "load-demo"])
def test_an_unreachable_database_is_named_with_its_password_masked(
        command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECASTING_DATABASE_URL", "postgresql+psycopg://me:Secret-7@127.0.0.1:1/nowhere")
    assert main([command]) == 2
    out = capsys.readouterr().out
    assert "error: database postgresql+psycopg://me:***@127.0.0.1:1/nowhere is not usable" in out
    assert "Secret-7" not in out


def test_an_early_start_of_prefects_local_api_that_fails_leaves_no_server_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect's start leaves the process of a start that timed out running; the flow's own
    start then launched a second, and only that one was stopped at exit: the first outlived
    `forecasting run`, holding its stdout (a pipe to `tail` never closed)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    spawned = []

    def timed_out(self: SubprocessASGIServer, timeout: int | None = None) -> None:
        self.server_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        spawned.append((self.server_process, timeout))
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "_instances", {})  # none of this session's servers
    monkeypatch.setattr(SubprocessASGIServer, "start", timed_out)
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_ENABLED: True}, restore_defaults={PREFECT_API_URL}):
        thread = cli._start_local_prefect_api()
        assert thread is not None
        thread.join(60)
    [(process, timeout)] = spawned
    assert timeout >= cli.EARLY_START_TIMEOUT_S  # a fresh PREFECT_HOME takes ~30 s, past Prefect's 20
    assert process.wait(timeout=10) is not None  # stopped, not left running
    assert SubprocessASGIServer._instances == {}  # the flow's start makes a fresh one


@pytest.mark.parametrize("command", ["run", "predict", "backfill"])
def test_bad_config_is_a_clear_error_before_anything_starts(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the flows are imported or Prefect's local API is started (which would run,
    unused, until the process exits)."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nfreq: MS\n")

    def started(*args, **kwargs):
        raise AssertionError("the flows were loaded for a config that cannot run")

    monkeypatch.setattr(cli, "flow_module", started)
    dates = ["--start", "2019-01-01", "--end", "2019-02-01"] if command == "backfill" else []
    assert main([command, "--config", str(path), *dates]) == 2
    out = capsys.readouterr().out
    assert "bad.yaml" in out and "source" in out


@pytest.mark.parametrize(("command", "option", "value"), [("run", "--as-of", "now"), ("predict", "--as-of", "NaT"),
                                                     ("run", "--as-of", "01/02/2019"), ("backfill", "--end", "June 2019"),
                                                     ("run", "--as-of", ""), ("backfill", "--start", " ")])
def test_a_date_that_is_not_iso_8601_is_refused_before_anything_starts(
        command: str, option: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """pandas alone reads 'now' and 'NaT', and '01/02/2019' as 2 January."""
    def started(*args, **kwargs):
        raise AssertionError("the flows were loaded for a date that cannot be read")

    monkeypatch.setattr(cli, "flow_module", started)
    dates = {"--start": "2019-01-01", "--end": "2019-02-01"} if command == "backfill" else {}
    dates[option] = value
    args = [command, "--config", str(Path(__file__).resolve().parent.parent / "configs" / "sales.yaml"), *(x for pair in dates.items() for x in pair)]
    assert main(args) == 2
    # An empty date was read as none: --as-of "" ran on the latest data, --start " " failed in the flow
    problem = "is empty: give an ISO 8601 date" if not value.strip() else "is not an ISO 8601 date or date-time"
    assert f"`{option}` ('{value}') {problem}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "predict", "backfill"])
def test_a_source_mistake_is_refused_before_anything_starts(
        command: str, engine: sa.Engine, env: dict[str, str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A column typo, a bad query or a reversed backfill range used to fail inside the flow,
    after Prefect's start-up (12 s), under 90 lines of tracebacks."""
    load_sales(engine)

    def started(*args, **kwargs):
        raise AssertionError("the flows were loaded for a source that cannot be read")

    monkeypatch.setattr(cli, "flow_module", started)
    dates = ["--start", "2019-01-01", "--end", "2019-02-01"] if command == "backfill" else []
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(tiny_config(source={"table": "sales", "id_column": "series_id", "time_column": "month",
                                                       "target_column": "turnovr"}).model_dump(mode="json")))
    assert main([command, "--config", str(typo), *dates]) == 2
    assert "`source.target_column` ('turnovr') not found in sales" in capsys.readouterr().out
    query = tmp_path / "query.yaml"
    query.write_text(yaml.safe_dump(tiny_config(source={"query": "SELECT series_id, month, turnover FROM sales;",
                                                        "id_column": "series_id", "time_column": "month",
                                                        "target_column": "revenue"}).model_dump(mode="json")))
    assert main([command, "--config", str(query), *dates]) == 2
    assert "`source.target_column` ('revenue') not found in source.query" in capsys.readouterr().out
    if command == "backfill":
        good = sales_loaded_and_its_config(engine, tmp_path)
        assert main(["backfill", "--config", str(good), "--start", "2019-02-01", "--end", "2019-01-01"]) == 2
        assert "--start (2019-02-01) .. --end (2019-01-01) is reversed" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "backfill"])
def test_cuda_asked_for_where_there_is_none_is_refused_before_anything_starts(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It failed when the first network trained, after every baseline's backtest, naming no
    dataset. With --dask too: the current champion is re-scored in the flow's own process."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # whatever this machine has
    monkeypatch.delenv("FORECASTING_DASK_ADDRESS", raising=False)
    monkeypatch.setattr(cli, "check_source", lambda config: None)  # no database needed to get here
    monkeypatch.setattr(cli, "check_dask_address", lambda *args, **kwargs: None)

    def started(*args, **kwargs):
        raise AssertionError("the flows were loaded")

    monkeypatch.setattr(cli, "flow_module", started)
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(tiny_config(training={"device": "cuda"}).model_dump(mode="json")))
    dates = ["--start", "2019-01-01", "--end", "2019-02-01"] if command == "backfill" else []
    assert main([command, "--config", str(path), *dates]) == 2
    assert f"{path}: dataset 'sales': `training.device` is 'cuda', but torch" in capsys.readouterr().out
    assert main([command, "--config", str(path), "--dask", "tcp://10.0.0.1:8786", *dates]) == 2
    assert "`training.device` is 'cuda', but torch" in capsys.readouterr().out


def test_a_bad_forecasting_workers_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It failed at the ETS backtest, after load, validate and two baselines, printed after the
    config's path as if the file were wrong."""
    monkeypatch.setenv("FORECASTING_WORKERS", "two")
    monkeypatch.setattr(cli, "check_source", lambda config: None)

    def started(*args, **kwargs):
        raise AssertionError("the flows were loaded")

    monkeypatch.setattr(cli, "flow_module", started)
    path = tmp_path / "sales.yaml"
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    assert main(["run", "--config", str(path)]) == 2
    assert "error: `FORECASTING_WORKERS` ('two') must be an integer >= 1" in capsys.readouterr().out


def sales_loaded_and_its_config(engine: sa.Engine, tmp_path: Path) -> Path:
    """The test sales data in the database; the path of a tiny config file for it."""
    load_sales(engine)
    path = tmp_path / "sales.yaml"
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    return path


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # what it tests is the CLI's message
def test_a_refused_backfill_is_one_line_without_a_traceback(engine: sa.Engine, env: dict[str, str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A plain ValueError: Prefect's flow logger printed its 15-line traceback above the CLI's
    one line, as for a bug."""
    path = sales_loaded_and_its_config(engine, tmp_path)
    assert main(["backfill", "--config", str(path), "--start", "2018-12-02", "--end", "2018-12-20"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("error: ") and "no 'MS' timestamps between '2018-12-02' and '2018-12-20'" in captured.out
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.usefixtures("prefect")
def test_run_prints_champion_and_rows(engine: sa.Engine, env: dict[str, str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = sales_loaded_and_its_config(engine, tmp_path)
    assert main(["run", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "champion:" in out and "rows written: 18 forecasts" in out
    assert "seasonal_naive" in out and "wall time per stage" in out


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # what it tests is the CLI's message
def test_predict_before_any_champion_says_what_to_run_first(engine: sa.Engine, env: dict[str, str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = sales_loaded_and_its_config(engine, tmp_path)
    assert main(["predict", "--config", str(path)]) == 2
    out = capsys.readouterr().out
    assert "no version of 'sales-forecaster' has the alias 'champion' yet; run `forecasting run` first" in out


def test_serve_refuses_what_it_would_not_carry_over_and_reads_every_schedule_kind(tmp_path: Path) -> None:
    """A schedule's `active: false` or own parameters silently dropped would run what the file
    says not to; interval and rrule schedules raised KeyError."""
    def spec(**deployment: object) -> Path:
        path = tmp_path / "prefect.yaml"
        parameters = {"config": str(ROOT / "configs" / "sales.yaml")}  # scheduled runs need one
        path.write_text(yaml.safe_dump({"deployments": [{"name": "d", "parameters": parameters, **deployment}]}))
        return path

    [read] = deployments_from_yaml(spec(schedules=[
        {"cron": "0 2 * * *", "timezone": "UTC", "active": False, "parameters": {"as_of": "2020-01-01"}},
        {"interval": 3600}, {"rrule": "FREQ=DAILY;BYHOUR=2"}]))
    cron, interval, rrule = read["schedules"]
    assert cron.active is False and cron.parameters == {"as_of": "2020-01-01"}
    assert interval.interval.total_seconds() == 3600 and rrule.rrule == "FREQ=DAILY;BYHOUR=2"
    with pytest.raises(ConfigError, match=r"deployment 'd': key 'concurrency_limit' is not read by `forecasting serve`"):
        deployments_from_yaml(spec(concurrency_limit=1))
    with pytest.raises(ConfigError, match=r"schedule .*: key 'max_active_runs' is not read"):
        deployments_from_yaml(spec(schedules=[{"cron": "0 2 * * *", "max_active_runs": 1}]))
    with pytest.raises(ConfigError, match=r"schedule .*: needs exactly one of cron, interval, rrule"):
        deployments_from_yaml(spec(schedules=[{"timezone": "UTC"}]))
    # serve runs the nightly flow: a predict-only deployment was served as a full night
    assert deployments_from_yaml(spec(entrypoint="flows.nightly:nightly"))[0]["name"] == "d"
    with pytest.raises(ConfigError, match=r"deployment 'd': entrypoint 'flows.nightly:predict' is not served by "
                                          r"`forecasting serve`"):
        deployments_from_yaml(spec(entrypoint="flows.nightly:predict"))
    # A work pool's job variables (an env with the database URL) were dropped without a word:
    # the served runs wrote to serve's own default database. Its name is prefect deploy's alone.
    pool = {"name": "forecasting-process", "work_queue_name": "default"}
    assert deployments_from_yaml(spec(work_pool=pool))[0]["name"] == "d"
    env = {"env": {"FORECASTING_DATABASE_URL": "postgresql+psycopg://db/prod"}}
    with pytest.raises(ConfigError, match=r"deployment 'd': work_pool.job_variables is not applied by "
                                          r"`forecasting serve`, whose runs start in its own process"):
        deployments_from_yaml(spec(work_pool={**pool, "job_variables": env}))
    # what `prefect init` and `prefect deploy` write into every deployment: nothing to lose
    assert deployments_from_yaml(spec(work_pool={**pool, "job_variables": {}}))[0]["name"] == "d"
    with pytest.raises(ConfigError, match=r"work_pool \('forecasting-process'\) must be a mapping"):
        deployments_from_yaml(spec(work_pool="forecasting-process"))


@pytest.mark.parametrize(("text", "problem"), [
    ("", r"`deployments` \(None\) must be a list of deployments"),
    ("deployments:\n", r"`deployments` \(None\) must be a list of deployments"),
    ("deployments: {name: a}\n", r"`deployments` \(\{'name': 'a'\}\) must be a list"),
    ("deployments: [sales-nightly]\n", r"deployments\[0\] \('sales-nightly'\) is not a deployment"),
    ("deployments: [{name: a}, {name: a}]\n", r"deployment 'a' is named twice"),
    ("deployments: [{name: a, schedules: ['0 2 * * *']}]\n", r"deployment 'a': schedules\[0\] \('0 2 \* \* \*'\) "
                                                             r"is not a schedule"),
    ("deployments: [{name: a, schedules: {cron: '0 2 * * *'}}]\n", r"deployment 'a': schedules \(.*\) must be a list"),
    ("deployments: [{name: a, tags: sales}]\n", r"deployment 'a': tags \('sales'\) must be a list of texts"),
])
def test_serve_refuses_a_prefect_yaml_of_the_wrong_shape_in_one_line(tmp_path: Path, text: str, problem: str) -> None:
    """Tracebacks (TypeError, AttributeError) for an empty file or section, or an item that is
    not a mapping; two deployments of one name were merged by the server (the first's schedule
    lost); `tags: sales` was served as five one-letter tags."""
    path = tmp_path / "prefect.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as refused:
        deployments_from_yaml(path)
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)


def test_serve_refuses_what_the_flow_or_prefect_would_refuse_at_night(tmp_path: Path) -> None:
    """A misspelt parameter (every scheduled run failed: the flow takes config, as_of,
    backfill) and a schedule option Prefect refuses (printed as a multi-line pydantic error,
    naming neither the file nor the deployment, after "serving")."""
    config = {"config": str(a_config(tmp_path / "ok.yaml"))}
    for deployment, problem in (
            ({"parameters": {**config, "asof": "2017-01-01"}},
             r"deployment 'sales-nightly': parameters names 'asof', which the nightly flow does not take \(it takes "
             r"config, as_of, backfill\)"),
            ({"parameters": config, "schedules": [{"cron": "0 2 * * *", "parameters": {"back_fill": True}}]},
             r"deployment 'sales-nightly': schedules\[0\].parameters names 'back_fill'"),
            ({"parameters": config, "schedules": [{"cron": "0 2 * * *", "timezone": "Mars/Base"}]},
             r"deployment 'sales-nightly': .*Mars/Base")):
        path = serve_spec(tmp_path, deployment)
        with pytest.raises(ConfigError, match=problem) as refused:
            served_deployments(deployments_from_yaml(path), path)
        assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)


def serve_spec(directory: Path, *deployments: dict[str, object]) -> Path:
    """A prefect.yaml in `directory` with these deployments of the nightly flow, scheduled nightly
    unless they say otherwise."""
    path = directory / "prefect.yaml"
    path.write_text(yaml.safe_dump({"deployments": [
        {"name": "sales-nightly", "entrypoint": "flows.nightly:nightly",
         "schedules": [{"cron": "0 2 * * *", "timezone": "UTC"}], **d} for d in deployments]}))
    return path


def a_config(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    return path


@pytest.mark.parametrize(("config", "problem"), [
    ("configs/salse.yaml", r"\('configs/salse.yaml'\) does not exist: looked for '.*/configs/salse.yaml' "
                           r"\(relative to prefect.yaml's directory\)"),
    ("configs", r"\('configs'\) is a directory, not a dataset config"),
    ("configs/bad.yaml", r"\('configs/bad.yaml'\) does not load as a dataset config: .*bad.yaml: key `source`: "
                         r"Field required; "),
    ("", r"\(''\) is empty"),
    (5, r"\(5\) is neither a path to a dataset config \(YAML\) nor a mapping of one, but int"),
    ({"name": "sales", "freq": "MS"}, r"\(a mapping\) is not a dataset config: .*key `source`: Field required"),
])
def test_serve_refuses_a_config_parameter_that_would_fail_the_night(
        tmp_path: Path, config: object, problem: str) -> None:
    """A deployment's config was passed on unchecked: a typo, a directory or a config that does
    not load was served happily and failed only at night, when the scheduled run read it."""
    (tmp_path / "configs" / "bad.yaml").parent.mkdir()
    (tmp_path / "configs" / "bad.yaml").write_text("name: sales\nfreq: MS\n")
    good = {"name": "weather-nightly", "parameters": {"config": str(a_config(tmp_path / "ok.yaml"))}}
    spec = serve_spec(tmp_path, good, {"parameters": {"config": config}})  # the second one is named
    with pytest.raises(ConfigError, match=r"prefect.yaml: deployment 'sales-nightly': parameters.config " + problem) as refused:
        deployments_from_yaml(spec)
    assert "\n" not in str(refused.value)  # one line, however many problems the config has


def test_serve_refuses_a_bad_config_before_anything_else(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused at once, in one line naming the deployment, the parameter and its value: not after
    the check of the Prefect server, nor once serving."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = serve_spec(tmp_path, {"parameters": {"config": "configs/salse.yaml"}})
    with temporary_settings(updates={PREFECT_API_URL: None}):  # no server either: the config is named first
        assert main(["serve", "--prefect-yaml", str(spec)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "deployment 'sales-nightly': parameters.config ('configs/salse.yaml') does not exist" in out
    assert "Prefect server" not in out and "serving" not in out


def test_serve_reads_a_relative_config_from_prefect_yamls_directory_not_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner starts each run in serve's own working directory; serve passes it the path
    resolved against prefect.yaml's directory, so that is where the check looks too: a file
    that exists only relative to where serve was started is not the one the run reads. A
    schedule's own config is read the same way as the deployment's (it used to be passed on
    relative, and so to depend on where serve was started)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    a_config(project / "configs" / "sales.yaml")
    a_config(elsewhere / "configs" / "only-here.yaml")
    monkeypatch.chdir(elsewhere)
    [read] = deployments_from_yaml(serve_spec(project, {"parameters": {"config": "configs/sales.yaml"}, "schedules": [
        {"cron": "0 2 * * *", "parameters": {"config": "configs/sales.yaml"}}]}))
    resolved = str(project / "configs" / "sales.yaml")
    assert read["parameters"]["config"] == resolved and read["schedules"][0].parameters["config"] == resolved
    with pytest.raises(ConfigError, match=r"parameters.config \('configs/only-here.yaml'\) does not exist: "
                                          r"looked for '" + str(project) + "/configs/only-here.yaml'"):
        deployments_from_yaml(serve_spec(project, {"parameters": {"config": "configs/only-here.yaml"}}))
    with pytest.raises(ConfigError, match=r"deployment 'sales-nightly': schedules\[1\].parameters.config "
                                          r"\('configs/only-here.yaml'\) does not exist"):
        deployments_from_yaml(serve_spec(project, {"parameters": {"config": "configs/sales.yaml"}, "schedules": [
            {"cron": "0 2 * * *"}, {"cron": "0 3 * * *", "parameters": {"config": "configs/only-here.yaml"}}]}))


def test_serve_refuses_a_scheduled_deployment_without_a_config_and_reads_an_inline_one(tmp_path: Path) -> None:
    """The nightly flow has no default config: a scheduled run without one failed at night. It
    may come from every schedule's own parameters instead; a deployment with no schedule is run
    by hand, with its parameters then. A mapping is a config given inline (the flow's parameter
    is `DatasetConfig | str`): it made serve fail with a TypeError traceback."""
    config = str(a_config(tmp_path / "sales.yaml"))
    with pytest.raises(ConfigError, match=r"deployment 'sales-nightly': parameters.config is missing: the nightly "
                                          r"flow needs a dataset config"):
        deployments_from_yaml(serve_spec(tmp_path, {"parameters": {"as_of": "2020-01-01"}}))
    with pytest.raises(ConfigError, match=r"deployment 'sales-nightly': parameters.config is missing"):
        deployments_from_yaml(serve_spec(tmp_path, {"schedules": [
            {"cron": "0 2 * * *", "parameters": {"config": config}}, {"interval": 3600}]}))
    [by_schedule, by_hand] = deployments_from_yaml(serve_spec(
        tmp_path, {"schedules": [{"cron": "0 2 * * *", "parameters": {"config": config}}]},
        {"name": "by-hand", "schedules": []}))
    assert by_schedule["schedules"][0].parameters == {"config": config} and by_hand["parameters"] == {}
    inline = tiny_config().model_dump(mode="json")
    [read] = deployments_from_yaml(serve_spec(tmp_path, {"parameters": {"config": inline}}))
    assert read["parameters"]["config"] == inline
    served_deployments([read])  # the flow takes it as its parameter


def test_serve_passes_a_symlinked_config_on_as_the_link_and_leaves_an_inactive_schedule_alone(tmp_path: Path) -> None:
    """A config reached through a symlink was passed on resolved, pinned to the link's target on
    the day serve started: repointing the link changed nothing at night. A schedule that is not
    active never starts a run, so it needs no config."""
    target = a_config(tmp_path / "configs" / "sales-v1.yaml")
    (tmp_path / "configs" / "current.yaml").symlink_to(target.name)
    [read] = deployments_from_yaml(serve_spec(tmp_path, {"parameters": {"config": "configs/current.yaml"}}))
    assert read["parameters"]["config"] == str(tmp_path / "configs" / "current.yaml")
    [read] = deployments_from_yaml(serve_spec(tmp_path, {"schedules": [
        {"cron": "0 2 * * *", "parameters": {"config": str(target)}}, {"cron": "0 3 * * *", "active": False}]}))
    assert [s.active for s in read["schedules"]] == [True, False]


def test_serve_without_a_prefect_server_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to serve from a temporary API that vanished with the process, schedules and all."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["serve"]) == 2
    assert "`forecasting serve` needs a Prefect server" in capsys.readouterr().out
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:1/api"}):  # nothing listens on port 1
        assert main(["serve"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "PREFECT_API_URL ('http://127.0.0.1:1/api'): no Prefect server answers there" in out


def test_serve_reads_both_deployments_of_prefect_yaml() -> None:
    deployments = deployments_from_yaml(ROOT / "prefect.yaml")
    assert [d["name"] for d in deployments] == ["sales-nightly", "weather-nightly"]
    for deployment in deployments:
        assert Path(deployment["parameters"]["config"]).exists()
        assert deployment["schedules"][0].timezone
    assert [d.entrypoint for d in served_deployments(deployments)] == ["flows.nightly.nightly"] * 2  # a module path


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # what it tests is the CLI's output
def test_a_data_error_inside_the_flow_prints_no_traceback(engine: sa.Engine, env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """`forecasting run` on data that fails validation (a duplicate timestamp, found inside the
    flow): Prefect's task and flow loggers printed two tracebacks, 75 lines, above the one line
    that says what is wrong. The error is expected and says it all; a bug keeps its traceback."""
    from prefect.settings import PREFECT_API_URL

    load_sales(engine)
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(tiny_config(source={
        "query": "SELECT series_id, month, turnover FROM sales UNION ALL "
                 "SELECT series_id, month, turnover FROM sales WHERE month = '2019-06-01'",
        "id_column": "series_id", "time_column": "month", "target_column": "turnover"}).model_dump(mode="json")))
    cli_main = "import sys; from forecasting.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", cli_main, "run", "--config", str(path)], cwd=ROOT,
                          env={**os.environ, **env, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
                          capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-2000:]
    assert "failed validation" in out and "duplicate" in out
    assert "Traceback" not in out, out[-3000:]
    assert len(out.splitlines()) < 30, out


def test_deployed_runs_ship_tasks_a_remote_dask_worker_can_import(tmp_path: Path) -> None:
    """A deployed run's process loads the flow from its entrypoint, and Dask pickles the tasks it
    sends to a cluster. Loaded from a file path (flows/nightly.py:nightly), the module was
    `nightly`, and every worker outside this checkout failed: No module named 'nightly'."""
    import cloudpickle
    from prefect.flows import load_flow_from_entrypoint

    entrypoints = {d["entrypoint"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert entrypoints == {"flows.nightly:nightly"}
    flow = load_flow_from_entrypoint(entrypoints.pop())
    shipped = cloudpickle.dumps(sys.modules[flow.fn.__module__].backtest)
    worker = subprocess.run(  # a worker elsewhere: the package installed, not this directory
        [sys.executable, "-c", "import cloudpickle, sys; print(cloudpickle.loads(sys.stdin.buffer.read()).name)"],
        input=shipped, cwd=tmp_path, capture_output=True, timeout=120)
    assert worker.returncode == 0, worker.stderr.decode()[-500:]
    assert worker.stdout.decode().strip() == "backtest"


@pytest.mark.usefixtures("prefect")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_served_deployments_run_completes_in_a_process_of_its_own(
        engine: sa.Engine, env: dict[str, str], tmp_path: Path) -> None:
    """What `forecasting serve`'s runner does with each scheduled run: `python -m prefect.engine`
    in a new process, which loads the flow from the deployment's entrypoint, validates the run's
    parameters, runs it and ends. (With postponed annotations in a cloudpickled flow, every such
    run failed: `NightlyModel` is not fully defined; and the process then waited forever for its
    idle MLflow logging worker.)"""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from tests.flow_fixtures import SERIES, tiny_config

    config = sales_loaded_and_its_config(engine, tmp_path)
    spec = tmp_path / "prefect.yaml"
    spec.write_text(yaml.safe_dump({"deployments": [{
        "name": "tiny-nightly", "entrypoint": "flows.nightly:nightly", "parameters": {"config": str(config)},
        "schedules": [{"cron": "0 2 * * *", "timezone": "UTC"}]}]}))
    [deployment] = deployments_from_yaml(spec)
    [served] = served_deployments([deployment])  # as cmd_serve builds them

    async def served_run():  # type: ignore[no-untyped-def]
        deployment_id = await served.apply()
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment_id)
            engine_env = {**os.environ, "PREFECT__FLOW_RUN_ID": str(run.id), "PREFECT_API_URL": PREFECT_API_URL.value()}
            try:  # as the runner starts it (prefect.runner's EngineCommandStarter)
                process = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "prefect.engine"], env=engine_env, cwd=tmp_path,
                    capture_output=True, timeout=240)
                exitcode = process.returncode
            except subprocess.TimeoutExpired:  # its MLflow logging worker kept it alive: it hung
                exitcode = None
            return exitcode, await client.read_flow_run(run.id)

    exitcode, run = asyncio.run(served_run())
    assert run.state.is_completed(), run.state.message
    assert exitcode == 0, "the served run's process did not end"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM forecasts")).scalar_one() == len(SERIES) * tiny_config().horizon

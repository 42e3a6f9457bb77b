"""Pipeline overhead: the wall time of `forecasting run` on the sales config, split into its parts.

    .venv/bin/python benchmarks/overhead.py [--repeat 3] [--plain 1] [--config configs/sales.yaml]

Target (issue #7): everything that is not training - Prefect, MLflow, the database, validation -
is at most 10% of the wall time of the whole `forecasting run` process.

In a temporary directory (its own SQLite database, MLflow sqlite store and PREFECT_HOME, so
Prefect runs its ephemeral API as a fresh installation would), `forecasting init-db` and
`forecasting load-demo` write the real aus_retail data, then `forecasting run` runs --repeat
times, each in its own process. The first run is a first night (fresh Prefect and MLflow
databases, no champion yet); later runs are the nights after (same as_of, rows replaced).

Each run is `forecasting.cli.main(["run", ...])` in a child process that records, without
changing what runs:
- the stages of pipeline.StageTimer (the wall seconds `forecasting run` prints);
- every Prefect task call (its wall) and the task function inside it (the work), so that
  Prefect's own per-task time is the difference;
- `run_backtest` inside each backtest (the models' fit + predict + scores; the rest of the
  stage is the interval calibration);
- the process's start and import time, the flow's start-up before the first stage, the work
  after the last stage (finish-tracking, artifacts) and the exit, from the parent;
- the peak RSS during each stage (a sampling thread, psutil).

Parts of the process wall time:
- training: the task functions of backtest:<cell> and fit-champion (the networks), and the
  champion's final fit: fit-champion, or for an ETS champion (fitted per series when it
  forecasts) the forecast task;
- baselines: the task functions of backtest:naive / seasonal_naive / ets (fitting statistical
  models is model fitting, not pipeline overhead; the issue lists Prefect, MLflow, database and
  validation as the overhead), shown separately and counted both ways in the verdict;
- pipeline: load, validate, MLflow tracking/registry (what is left of it when the flow waits
  for it, and the tasks it runs in the flow's thread), forecast, write (task functions),
  compare and decide;
- MLflow in the background thread (the tasks that wait for the logging process: the night's
  parent run, the current champion, each candidate's run, the registration): its CPU seconds
  in this process during the fits, taken out of training - that thread holds the GIL while it
  works, and the training thread waits for it (see `breakdown`);
- Prefect: flow start-up (ephemeral API), per-task orchestration, artifacts, flow teardown, and
  the flow's end waiting for its heartbeat thread (timed apart: Prefect 3.9's sleeps in 1 s steps,
  which the flows no longer wait out since forecasting.prefect_heartbeats);
- python: interpreter start and imports (torch, prefect, pandas, sqlalchemy; mlflow and
  matplotlib load in the logging process, which the run's record checks), and process exit.

The floor, measured in the same run (--floor processes): a process that imports torch, pandas,
SQLAlchemy and Prefect and runs an empty Prefect flow that calls as many tasks as a night does,
against the same API. Any nightly job built on these libraries pays it, whatever its pipeline
does; the night's overhead less the floor is what this pipeline adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("rnn", "lstm", "gru")
BASELINES = ("naive", "seasonal_naive", "ets")
TARGET = 0.10
TRAINING = "training (cells' backtests + the champion's final fit)"
FIT_AT_FORECAST = ("ets",)  # champions whose per-series fitting happens in the forecast task


# ====================================================================== child: one instrumented run


class Recorder:
    """What the child process records: stage intervals, task calls, peak RSS per stage."""

    def __init__(self, sample_seconds: float = 0.05) -> None:
        self.stages: list[tuple[str, float, float]] = []  # name, start, end (time.time)
        self.tasks: list[tuple[str, float, float, float]] = []  # task, call start, call end, fn seconds
        self.task_cpu: list[float] = []  # CPU seconds of the calling thread, one per entry of `tasks`
        self.backtests: list[tuple[str, float]] = []  # candidate, run_backtest seconds
        self.current = "startup"
        self.heartbeat_joins: list[tuple[float, float]] = []  # a flow's end waiting for its heartbeat thread
        self.peak_rss: dict[str, int] = defaultdict(int)  # this process
        self.peak_tree_rss: dict[str, int] = defaultdict(int)  # with child processes
        self.sample_seconds = sample_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_sampling(self) -> None:
        import psutil

        me = psutil.Process()

        def sample() -> None:
            tick = 0
            while not self._stop.is_set():
                stage = self.current
                rss = me.memory_info().rss
                self.peak_rss[stage] = max(self.peak_rss[stage], rss)
                if tick % 4 == 0:  # children (Prefect's server, workers) less often
                    total = rss
                    for child in me.children(recursive=True):
                        try:
                            total += child.memory_info().rss
                        except psutil.Error:
                            pass
                    self.peak_tree_rss[stage] = max(self.peak_tree_rss[stage], total)
                tick += 1
                self._stop.wait(self.sample_seconds)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def instrument(recorder: Recorder) -> None:
    """Patch timers around the real flow; nothing it does changes."""
    import functools

    from prefect import Task

    import flows.nightly as nightly
    from forecasting import pipeline

    base = pipeline.StageTimer

    class RecordingTimer(base):  # type: ignore[misc, valid-type]
        @contextmanager
        def stage(self, name: str):  # type: ignore[override]
            recorder.current = name
            start = time.time()
            try:
                with base.stage(self, name):
                    yield
            finally:
                recorder.stages.append((name, start, time.time()))
                recorder.current = "between stages"

    pipeline.StageTimer = RecordingTimer  # type: ignore[misc]

    fn_seconds: dict[str, float] = {}

    def timed_fn(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                fn_seconds[name] = fn_seconds.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    class TimedTask:
        """Stands in for a Prefect task in the flow module: times the whole task call."""

        def __init__(self, task: Any) -> None:
            self.task = task

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            name = self.task.name
            fn_seconds[name] = 0.0
            start, cpu = time.time(), time.thread_time()
            try:
                return self.task(*args, **kwargs)
            finally:
                recorder.tasks.append((name, start, time.time(), fn_seconds.get(name, 0.0)))
                recorder.task_cpu.append(time.thread_time() - cpu)

        def __getattr__(self, item: str) -> Any:
            return getattr(self.task, item)

    for attr, value in list(vars(nightly).items()):
        if isinstance(value, Task):
            value.fn = timed_fn(value.name, value.fn)
            setattr(nightly, attr, TimedTask(value))

    real_backtest = pipeline.run_backtest

    @functools.wraps(real_backtest)
    def run_backtest(panel: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real_backtest(panel, *args, **kwargs)
        finally:
            recorder.backtests.append((",".join(kwargs.get("candidates", ["?"])), time.perf_counter() - start))

    pipeline.run_backtest = run_backtest

    # Prefect (3.9) sends flow-run heartbeats from a thread that sleeps in 1 s steps and joins it
    # when the flow ends (forecasting.prefect_heartbeats stops that join; what is left of the wait
    # is timed here); the engine looks `_send_heartbeats` up in its module at each flow run.
    import prefect.flow_engine as flow_engine

    real_heartbeats = flow_engine._send_heartbeats

    @contextmanager
    def timed_heartbeats(engine: Any, join_on_exit: bool = True):
        with real_heartbeats(engine, join_on_exit=join_on_exit):
            try:
                yield
            finally:
                stopping = time.time()
        recorder.heartbeat_joins.append((stopping, time.time()))

    flow_engine._send_heartbeats = timed_heartbeats


class ImportTimer:
    """Times one module's import, its own imports included, where it happens (a meta path
    finder that wraps the module's loader), so that the import order is left as it is."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seconds: float | None = None

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            start = time.time()
            try:
                real_exec(module)
            finally:
                self.seconds = time.time() - start

        spec.loader.exec_module = exec_module
        return spec


def child_run(config: str, out: Path) -> None:
    """Run `forecasting run --config CONFIG` in this process, instrumented; write JSON to `out`."""
    t_first = time.time()
    torch_import = ImportTimer("torch")
    sys.meta_path.insert(0, torch_import)
    from forecasting import cli

    cli.flow_module()  # what `forecasting run` imports (while Prefect's local API starts), timed here
    t_imported = time.time()
    recorder = Recorder()
    instrument(recorder)
    summaries: list[dict] = []
    real_print = cli.print_summary

    def print_summary(summary: dict) -> None:
        summaries.append(summary)
        real_print(summary)

    cli.print_summary = print_summary
    recorder.start_sampling()
    t_call = time.time()
    rc = cli.main(["run", "--config", config])
    t_done = time.time()
    recorder.current = "after flow"
    recorder.stop_sampling()
    import resource

    out.write_text(json.dumps({
        "rc": rc, "t_first": t_first, "t_imported": t_imported, "t_call": t_call, "t_done": t_done,
        "torch_import": torch_import.seconds,
        "stages": recorder.stages, "tasks": recorder.tasks, "backtests": recorder.backtests,
        "task_cpu": recorder.task_cpu, "heartbeat_joins": recorder.heartbeat_joins,
        "peak_rss": dict(recorder.peak_rss), "peak_tree_rss": dict(recorder.peak_tree_rss),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "summary": summaries[0] if summaries else None,
        # The flow's process should import none of these: every MLflow call (and so every HTTP
        # request and figure) is the logging process's.
        "imported_here": sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "matplotlib", "requests"}),
    }, default=str))
    cli.exit_quickly(rc)  # the end of the `forecasting` command (cli.entry_point), timed by the parent


def child_floor(tasks: int, out: Path) -> None:
    """The floor under any such job: a process that imports the libraries the night's process
    imports (torch, pandas, SQLAlchemy, Prefect) and runs a Prefect flow that calls as many tasks
    as the night does, each doing nothing, against the same Prefect API, then exits as
    `forecasting` does. What the night's overhead has above this is the pipeline's own."""
    t_first = time.time()
    import pandas  # noqa: F401  the job's data frames
    import sqlalchemy  # noqa: F401  its database
    import torch  # noqa: F401  its models
    from prefect import flow, task

    from forecasting import prefect_heartbeats
    from forecasting.cli import exit_quickly

    prefect_heartbeats.install()  # as the night's flows do: any job can end without that wait

    @task(name="nothing")
    def nothing(i: int) -> int:
        return i

    @flow(name="overhead-floor")
    def empty(n: int) -> int:
        return sum(nothing(i) for i in range(n))

    t_call = time.time()
    empty(tasks)
    t_done = time.time()
    out.write_text(json.dumps({"t_first": t_first, "t_call": t_call, "t_done": t_done}))
    exit_quickly(0)


# ====================================================================== parent: runs and tables


def verdict_lines(median_runs: dict[str, tuple], floors: list[dict[str, float]], task_calls: int) -> list[str]:
    """The verdicts: per group of nights, the run of median overhead; the floor, if measured."""
    verdicts = []
    for label, (run, share, _, shares) in median_runs.items():
        each = ", ".join(f"{s['overhead']:.1%}" for s in shares)
        verdicts.append(
            f"{label}{'' if len(shares) == 1 else ', the run of median overhead'}: process wall "
            f"{run['process wall']:.1f}s; overhead (not model fitting) {share['overhead s']:.1f}s = "
            f"{share['overhead']:.1%} of the process ({'meets' if share['overhead'] <= TARGET else 'misses'} "
            f"<= 10%; each run's: {each}); counting the baselines' backtests as overhead too: "
            f"{share['with baselines']:.1%}; without Prefect's flow start-up ({run['prefect flow start-up']:.1f}s): "
            f"{share['without flow start-up']:.1%}; counting torch's import ({run[TORCH_IMPORT]:.1f}s) as "
            f"training's start-up, not overhead: {share['without torch import']:.1%}; of the overhead, the "
            f"flow's end waiting for Prefect's heartbeat thread: {run[HEARTBEAT_JOIN]:.2f}s (without that "
            f"wait: {share['without heartbeat wait']:.1%})")
    if floors:
        floor = {k: median([f[k] for f in floors]) for k in floors[0]}
        _, _, parts, shares = median_runs["next nights (median)"]
        # per night: its overhead above the floor, as a share of its own wall; then the median
        above = [s["overhead s"] - floor["process wall"] for s in shares]
        above_share = median([a / p["process wall"] for a, p in zip(above, parts)])
        verdicts.append(
            f"floor (median of {len(floors)}): a process importing torch, pandas, SQLAlchemy and Prefect "
            f"and running an empty flow of {task_calls} tasks against the same API: {floor['process wall']:.1f}s "
            f"(start + imports {floor['start + imports']:.1f}s, flow {floor['flow']:.1f}s, exit "
            f"{floor['exit']:.2f}s) = {median([floor['process wall'] / p['process wall'] for p in parts]):.1%} "
            f"of a next night's process (median); the pipeline's own overhead above it, per night then the "
            f"median: {median(above):.1f}s = {above_share:.1%}")
    return verdicts


def overhead_shares(parts: dict[str, float]) -> dict[str, float]:
    """One run's overhead (its wall less its model fitting), in seconds and as shares of its wall."""
    wall, baselines = parts["process wall"], parts["baselines' backtests"]
    overhead = wall - parts[TRAINING] - baselines
    startup, heartbeat = parts["prefect flow start-up"], parts[HEARTBEAT_JOIN]
    return {"overhead s": overhead, "overhead": overhead / wall, "with baselines": (overhead + baselines) / wall,
            "without flow start-up": (overhead - startup) / (wall - startup),
            "without torch import": (overhead - parts[TORCH_IMPORT]) / wall,
            "without heartbeat wait": (overhead - heartbeat) / (wall - heartbeat)}


def bench_env(workdir: Path, prefect_api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("PREFECT_API") or key == "PREFECT_PROFILE":
            env.pop(key)  # the ephemeral API, as on a fresh machine
    if prefect_api_url:  # or a Prefect server that is already running, as for deployments
        env["PREFECT_API_URL"] = prefect_api_url
    env.update({
        "FORECASTING_DATABASE_URL": f"sqlite:///{workdir / 'forecasting.db'}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "PREFECT_HOME": str(workdir / "prefect"),
        # Prefect's default (20 s) is too short for a fresh ephemeral server on a busy shared
        # machine; the time it does take is measured either way.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": env.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    return env


def forecasting_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "forecasting.cli", *args]


def timed_command(cmd: list[str], *, env: dict[str, str], log: Path) -> float:
    start = time.time()
    with log.open("a") as out:
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.time() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); log {log}:\n{tail}")
    return seconds


def instrumented_run(config: str, *, env: dict[str, str], workdir: Path, index: int) -> dict[str, Any]:
    out = workdir / f"run{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-run", config, "--out", str(out)]
    t_spawn = time.time()
    timed_command(cmd, env=env, log=workdir / f"run{index}.log")
    t_exit = time.time()
    record = json.loads(out.read_text())
    if record["rc"] != 0 or not record["stages"]:
        tail = "\n".join((workdir / f"run{index}.log").read_text().splitlines()[-20:])
        raise SystemExit(f"`forecasting run --config {config}` failed (rc {record['rc']}):\n{tail}")
    record.update(t_spawn=t_spawn, t_exit=t_exit)
    return record


def floor_run(tasks: int, *, env: dict[str, str], workdir: Path, index: int) -> dict[str, float]:
    """One `child_floor` process: its wall, split into start + imports, the flow, the exit."""
    out = workdir / f"floor{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-floor", str(tasks), "--out", str(out)]
    t_spawn = time.time()
    timed_command(cmd, env=env, log=workdir / f"floor{index}.log")
    t_exit = time.time()
    r = json.loads(out.read_text())
    return {"start + imports": r["t_call"] - t_spawn, "flow": r["t_done"] - r["t_call"],
            "exit": t_exit - r["t_done"], "process wall": t_exit - t_spawn}


# Run in a thread of their own, beside the candidates' training and the forecast (see `breakdown`).
BACKGROUND = ("start-tracking", "load-champion", "log-candidate", "register")
STALL = "MLflow logging in the background: its CPU seconds (GIL) during the fits"
TORCH_IMPORT = "of imports: torch's (with what it imports first)"
HEARTBEAT_JOIN = "prefect flow end: waiting for its heartbeat thread (1 s sleeps)"


def background_stall(r: dict[str, Any]) -> dict[str, float]:
    """The background thread's CPU seconds per stage of the main thread, spread over each
    task's wall time by overlap (0 for runs recorded before task CPU times were)."""
    out: dict[str, float] = defaultdict(float)
    for (name, start, end, _), cpu in zip(r["tasks"], r.get("task_cpu", [])):
        if name not in BACKGROUND or end <= start:
            continue
        for stage, s, e in r["stages"]:
            overlap = min(end, e) - max(start, s)
            if overlap > 0:
                out[stage] += cpu * overlap / (end - start)
    return out


def breakdown(r: dict[str, Any]) -> dict[str, float]:
    """The process wall time of one run, split into parts that add up to it.

    The night's parent MLflow run and the candidates' runs are logged in a background thread
    while the candidates train. Its waits for I/O overlap the training, but its Python work
    holds the GIL, and the training thread waits for it between torch calls: measured here
    (a thread rendering plots beside a training loop), the two take as long together as one
    after the other. So the background thread's CPU seconds are taken out of the stages they
    overlapped (each task's CPU spread over its wall by overlap) and counted as MLflow
    overhead; the wait for what is left of it (the 'tracking' stages after the champion's
    fit) counts too. Its wall seconds are shown apart.
    """
    stages = r["stages"]
    first, last = min(s[1] for s in stages), max(s[2] for s in stages)
    inside = lambda t: any(s[1] <= t[1] and t[2] <= s[2] for s in stages)  # noqa: E731
    background = [t for t in r["tasks"] if t[0] in BACKGROUND]
    tasks = [t for t in r["tasks"] if t[0] not in BACKGROUND]
    fn = defaultdict(float)
    prefect_tasks = 0.0
    for name, start, end, seconds in tasks:
        fn[name if inside((name, start, end)) else f"untimed:{name}"] += seconds
        prefect_tasks += (end - start) - seconds
    backtest_fn = {}  # backtest task fn seconds per candidate, in stage order
    for name, start, end, seconds in tasks:
        if name == "backtest":
            stage = next(s[0] for s in stages if s[1] <= start and end <= s[2])
            backtest_fn[stage.split(":", 1)[1]] = seconds
    stage_wall = sum(s[2] - s[1] for s in stages)
    task_call_in_stages = sum(e - s for n, s, e, _ in tasks if inside((n, s, e)))
    fits_at_forecast = (r.get("summary") or {}).get("champion") in FIT_AT_FORECAST
    # the night's flow ends after the last stage (a backfill's nights are subflows, ending earlier)
    heartbeat_join = sum(end - start for start, end in r.get("heartbeat_joins", []) if start >= last)

    def waits_in(stage: str) -> float:  # what is left of the background's work, waited for
        return sum(end - start for name, start, end in stages if name == stage
                   and not any(start <= s and e <= end for _, s, e, _ in tasks))

    waits = waits_in("tracking") + waits_in("register")
    stall = background_stall(r)  # per stage: the background thread's CPU seconds during it
    training_stages = [f"backtest:{c}" for c in CELLS] + ["fit-champion"] + (["forecast"] if fits_at_forecast else [])
    training_stall = sum(stall.get(name, 0.0) for name in training_stages)
    baseline_stall = sum(stall.get(f"backtest:{c}", 0.0) for c in BASELINES)
    parts = {
        "python start + imports (local Prefect API starting beside them)": r["t_call"] - r["t_spawn"],
        "prefect flow start-up": first - r["t_call"],
        TRAINING: sum(backtest_fn.get(c, 0.0) for c in CELLS)
        + fn.get("fit-champion", 0.0) + (fn.get("forecast", 0.0) if fits_at_forecast else 0.0) - training_stall,
        "baselines' backtests": sum(backtest_fn.get(c, 0.0) for c in BASELINES) - baseline_stall,
        STALL: training_stall + baseline_stall,
        "load (database)": fn.get("load", 0.0),
        "validate": fn.get("validate", 0.0),
        "MLflow tracking": waits_in("tracking") + fn.get("untimed:finish-tracking", 0.0),
        "register (MLflow)": waits_in("register") + fn.get("register", 0.0),
        "forecast": 0.0 if fits_at_forecast else fn.get("forecast", 0.0),
        "write (database, and the alias move in MLflow)": fn.get("write", 0.0),
        "compare + decide": fn.get("untimed:compare", 0.0) + fn.get("decide", 0.0),
        "in stages, outside tasks": stage_wall - task_call_in_stages - waits,
        "prefect per-task orchestration": prefect_tasks,
        "after last stage, outside tasks (artifacts, teardown)": (r["t_done"] - last) - sum(
            e - s for n, s, e, _ in tasks if s >= last) - heartbeat_join,
        HEARTBEAT_JOIN: heartbeat_join,
        "process exit": r["t_exit"] - r["t_done"],
        "between stages, outside tasks": (last - first) - stage_wall - sum(
            e - s for n, s, e, _ in tasks if not inside((n, s, e)) and first <= s and e <= last),
    }
    parts["unaccounted"] = (r["t_exit"] - r["t_spawn"]) - sum(parts.values())
    parts["process wall"] = r["t_exit"] - r["t_spawn"]
    parts["sum of stages"] = stage_wall
    # intervals: the part of each backtest task that is not run_backtest
    parts["of backtests: interval calibration"] = sum(backtest_fn.values()) - sum(s for _, s in r["backtests"])
    parts["MLflow jobs waited for in the background (wall)"] = sum(e - s for _, s, e, _ in background)
    parts[TORCH_IMPORT] = r.get("torch_import") or float("nan")
    return parts


def stage_table(r: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Per stage: wall, task-function work, Prefect's part (wall - work - code outside tasks)."""
    out: dict[str, list[float]] = {}
    tasks = [t for t in r["tasks"] if t[0] not in BACKGROUND]
    for name, start, end in r["stages"]:
        work = sum(sec for _, s, e, sec in tasks if start <= s and e <= end)
        calls = sum(e - s for _, s, e, _ in tasks if start <= s and e <= end)
        row = out.setdefault(name, [0.0, 0.0, 0.0])
        row[0] += end - start
        row[1] += work
        row[2] += calls - work
    return {k: tuple(v) for k, v in out.items()}  # type: ignore[misc]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sales.yaml")
    parser.add_argument("--repeat", type=int, default=3, help="instrumented runs (the first is a first night)")
    parser.add_argument("--plain", type=int, default=1,
                        help="uninstrumented `forecasting run` processes after them, to check the instrumentation")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the databases here (default: a temp dir)")
    parser.add_argument("--prefect-api-url", default=None,
                        help="report to this running Prefect server instead of the ephemeral API")
    parser.add_argument("--floor", type=int, default=2,
                        help="processes running an empty Prefect flow of as many tasks (the floor; 0: none)")
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--child-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-floor", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_run:
        child_run(args.child_run, args.out)
        return
    if args.child_floor is not None:
        child_floor(args.child_floor, args.out)
        return

    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        env = bench_env(workdir, args.prefect_api_url)
        setup = {
            "init-db": timed_command(forecasting_cmd("init-db"), env=env, log=workdir / "setup.log"),
            "load-demo": timed_command(forecasting_cmd("load-demo"), env=env, log=workdir / "setup.log"),
        }
        print(f"setup: init-db {setup['init-db']:.1f}s, load-demo {setup['load-demo']:.1f}s (not part of a run)")
        runs = []
        for i in range(args.repeat):
            record = instrumented_run(args.config, env=env, workdir=workdir, index=i)
            runs.append(record)
            parts = breakdown(record)
            decision = record["summary"]["decision"] if record["summary"] else "?"
            print(f"run {i + 1}/{args.repeat}: process {parts['process wall']:.1f}s, stages "
                  f"{parts['sum of stages']:.1f}s, training {parts[TRAINING]:.1f}s, decision {decision}, "
                  f"imported by the flow's process of mlflow, matplotlib, requests: "
                  f"{record.get('imported_here', '?') or 'none'}", flush=True)
        plain = [timed_command([str(Path(sys.executable).parent / "forecasting"), "run", "--config", args.config],
                               env=env, log=workdir / "plain.log") for _ in range(args.plain)]
        # the night's task calls, the background thread's included
        task_calls = int(median([len(r["tasks"]) for r in runs[1:] or runs]))
        floors = [floor_run(task_calls, env=env, workdir=workdir, index=i) for i in range(args.floor)]

    cold, warm = runs[0], runs[1:] or runs[:1]
    part_rows, median_runs = {}, {}
    for label, group in (("first night", [cold]), ("next nights (median)", warm)):
        parts = [breakdown(r) for r in group]
        part_rows[label] = {k: median([p[k] for p in parts]) for k in parts[0]}
        # The verdict quotes one run, the one whose overhead share is the median, so that its
        # seconds, shares and wall belong together: the process wall's median less training's
        # and the baselines' medians (taken from different runs on a noisy machine) is no run's.
        shares = [overhead_shares(p) for p in parts]
        middle = sorted(range(len(parts)), key=lambda i: shares[i]["overhead"])[(len(parts) - 1) // 2]
        median_runs[label] = (parts[middle], shares[middle], parts, shares)
    table = pd.DataFrame(part_rows)
    totals = table.loc["process wall"]
    info = ["process wall", "sum of stages", "of backtests: interval calibration",
            "MLflow jobs waited for in the background (wall)", TORCH_IMPORT]  # not parts of the wall
    order = [k for k in table.index if k not in info]
    shares = table.loc[order] / totals
    table_out = table.loc[order + info]
    table_out = pd.concat({"seconds": table_out, "share": shares}, axis=1)
    print("\nProcess wall time of `forecasting run`, by part:")
    print(table_out.to_string(float_format=lambda v: f"{v:.3f}"))

    stages = defaultdict(list)
    for r in warm:
        for name, row in stage_table(r).items():
            stages[name].append(row)
    peaks = defaultdict(list)
    for r in warm:
        for name, rss in r["peak_rss"].items():
            peaks[name].append(rss / 2**20)
    stage_rows = pd.DataFrame({
        name: {"wall s": median([v[0] for v in rows]), "task work s": median([v[1] for v in rows]),
               "prefect s": median([v[2] for v in rows]), "peak RSS MiB": median(peaks.get(name, []))}
        for name, rows in stages.items()
    }).T
    print("\nPer stage, next nights (median of", len(warm), "runs):")
    print(stage_rows.to_string(float_format=lambda v: f"{v:.2f}"))

    verdicts = verdict_lines(median_runs, floors, task_calls)
    if plain:
        verdicts.append(f"uninstrumented `forecasting run` process wall: {', '.join(f'{p:.1f}s' for p in plain)} "
                        f"(instrumented next nights median {part_rows['next nights (median)']['process wall']:.1f}s)")
    verdicts.append(f"setup (not in the runs): init-db {setup['init-db']:.1f}s, load-demo {setup['load-demo']:.1f}s")
    print()
    for line in verdicts:
        print(line)
    if not args.no_results:
        from results import append_section

        body = (table_out.to_markdown(floatfmt=".3f") + "\n\nPer stage, next nights (median):\n\n"
                + stage_rows.to_markdown(floatfmt=".2f"))
        api = f", Prefect server {args.prefect_api_url}" if args.prefect_api_url else ", Prefect ephemeral API"
        append_section(f"pipeline overhead: `forecasting run --config {args.config}` "
                       f"({args.repeat} runs{api})", body, notes=verdicts)


if __name__ == "__main__":
    main()

"""A night's networks on every core against each on the threads its probe chose.

    .venv/bin/python benchmarks/night_threads.py [--rounds 3] [--prefect-api-url URL] [--no-record]

`forecasting run --config configs/sales.yaml` in a temporary directory (its own SQLite
database, MLflow store and Prefect home, as benchmarks/overhead.py sets them up), each run a
fresh process, rounds alternating two settings:

- every core: OMP_NUM_THREADS=<the cores> pins torch's threads, as every night trained before
  forecasting.thread_probe (each network on all the cores the process may use);
- probe: OMP_NUM_THREADS unset, each network trains on the threads forecasting.thread_probe
  chose for its shape. The runs have a cache directory of their own (FORECASTING_CACHE_DIR), so
  one untimed night first measures them (the first night's probes, at the flow's start) and
  the user's answers are neither read nor written.

The settings take turns, and which goes first alternates by round. Prints the probe's answers,
the median process wall and the median seconds of each backtest per setting, and the ratios
probe / every core; appends them to benchmarks/RESULTS.md (not with --no-record).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from forecasting import thread_probe
from overhead import ROOT, bench_env, forecasting_cmd, timed_command
from results import append_section

STAGES = re.compile(r"^wall time per stage: (.*)$", re.MULTILINE)


def night(env: dict[str, str], log: Path) -> dict[str, float]:
    """One `forecasting run` of the sales config: its process wall and the seconds of each stage."""
    log.write_text("")
    wall = timed_command(forecasting_cmd("run", "--config", str(ROOT / "configs" / "sales.yaml")), env=env, log=log)
    [stages] = STAGES.findall(log.read_text())
    seconds = {name: float(value.rstrip("s")) for name, value in
               (part.strip().rsplit(" ", 1) for part in stages.split(","))}
    return {"process wall": wall, **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefect-api-url", default=None, help="a running Prefect server (default: ephemeral API)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the databases here (default: a temp dir)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="night-threads-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        env = bench_env(workdir, args.prefect_api_url)
        env.pop("OMP_NUM_THREADS", None)
        env["FORECASTING_CACHE_DIR"] = str(workdir / "cache")
        settings = {f"every core (OMP_NUM_THREADS={cores})": {**env, "OMP_NUM_THREADS": str(cores)},
                    "probe's choice (OMP_NUM_THREADS unset)": env}
        for command in ("init-db", "load-demo"):
            timed_command(forecasting_cmd(command), env=env, log=workdir / "setup.log")
        started = time.perf_counter()
        night(env, workdir / "warm-up.log")  # the first night: the probe measures, MLflow's stores fill
        print(f"warm-up night (the probe measures its shapes): {time.perf_counter() - started:.1f}s", flush=True)
        answers = json.loads((workdir / "cache" / thread_probe.CACHE_FILE).read_text())
        chosen = {re.search(r"cell=(\w+)", key)[1]: (answer["threads"], answer["seconds"])
                  for key, answer in answers.items()}
        print(f"the probe's answers (threads, seconds per step by count): {chosen}", flush=True)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
        for round_ in range(args.rounds):
            order = list(settings) if round_ % 2 == 0 else list(settings)[::-1]
            for name in order:
                setting = settings[name]
                runs[name].append(night(setting, workdir / f"night-{len(runs[name])}-{name[:5]}.log"))
                print(f"round {round_ + 1}: {name}: {runs[name][-1]['process wall']:.1f}s", flush=True)
    table = pd.DataFrame({name: {key: statistics.median(run[key] for run in done) for key in done[0]}
                          for name, done in runs.items()})
    table = table.loc[["process wall", *[k for k in table.index if k.startswith("backtest:")], "forecast"]]
    every, probe = table.columns
    table["probe / every core"] = table[probe] / table[every]
    print(table.to_markdown(floatfmt=".3f"))
    if not args.no_record:
        append_section(f"a night's networks on every core vs the thread probe's choice ({args.rounds} rounds, "
                       f"{cores} cores; medians in seconds)", table,
                       notes=[f"{name}: process walls " + ", ".join(f"{run['process wall']:.1f}" for run in done)
                              for name, done in runs.items()]
                       + [f"the probe's answers (threads, seconds per step by count), measured by the untimed first "
                          f"night: {chosen}"])


if __name__ == "__main__":
    sys.exit(main())

"""Scale: synthetic daily panels of 100, 1,000 and 10,000 series through `forecasting run`.

    .venv/bin/python benchmarks/scale.py [--sizes 100,1000,10000] [--repeat 1] [--days 730]

Targets (issue #7): with a fixed training budget, cost grows no faster than linearly in the
number of series, and 10,000 series (2 years of days each, h = 28) fit in 8 GiB.

For each size, in its own temporary directory: a SQLite database holding a synthetic table
`daily_units(series_id, day, units)` (positive series with a level, a trend, a weekly and a
yearly season and noise; synthetic data is allowed for scale tests), the pipeline's tables
(`forecasting init-db`), its own MLflow store and PREFECT_HOME, and a dataset config with
freq D, horizon 28, season 7 and a FIXED training budget (max_epochs and
max_batches_per_epoch). The run is `forecasting run` in a child process, instrumented as in
benchmarks/overhead.py: wall seconds and peak RSS (this process, and with its child processes:
Prefect's server, ETS workers) per stage, sampled every 50 ms by a thread.

Per-series cost ratios: (seconds / series at the larger size) / (seconds / series at the
smaller); <= 1 means no worse than linear (fixed costs - Prefect start-up, the fixed training
budget - make small panels dearer per series).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402  (same directory)
    BASELINES,
    CELLS,
    TRAINING,
    bench_env,
    breakdown,
    forecasting_cmd,
    instrumented_run,
    timed_command,
)

HORIZON, SEASON = 28, 7
MEMORY_TARGET_GIB = 8.0
STAGES = ("load", "validate", "tracking", *(f"backtest:{m}" for m in (*BASELINES, *CELLS)),
          "fit-champion", "decide", "register", "forecast", "write")
TABLE = "daily_units"


def write_panel(path: Path, *, n_series: int, days: int, seed: int = 0) -> int:
    """The synthetic table, written with sqlite3 directly (fast); returns the rows written."""
    conn = sqlite3.connect(path)
    conn.execute(f"""CREATE TABLE {TABLE} (
        series_id VARCHAR(32) NOT NULL, day DATE NOT NULL, units DOUBLE PRECISION,
        CONSTRAINT {TABLE}_key PRIMARY KEY (series_id, day))""")
    dates = pd.date_range(end="2024-12-31", periods=days, freq="D")
    day_text = dates.strftime("%Y-%m-%d").to_numpy()
    t = np.arange(days)
    rng = np.random.default_rng(seed)
    rows = 0
    for first in range(0, n_series, 500):  # 500 series (365k rows) per batch
        ids = np.arange(first, min(first + 500, n_series))
        k = len(ids)
        level = rng.uniform(20, 500, k)[:, None]
        trend = rng.normal(0, 0.0005, k)[:, None] * level
        weekly = rng.uniform(0.05, 0.3, k)[:, None] * level * np.sin(2 * np.pi * t / 7 + rng.uniform(0, 7, k)[:, None])
        yearly = rng.uniform(0, 0.2, k)[:, None] * level * np.sin(2 * np.pi * t / 365.25 + rng.uniform(0, 6, k)[:, None])
        noise = rng.normal(0, 0.08, (k, days)) * level
        values = np.maximum(level + trend * t + weekly + yearly + noise, 0.0)  # [series, days]
        names = np.char.add("item-", np.char.zfill(ids.astype(str), 5))
        conn.executemany(f"INSERT INTO {TABLE} VALUES (?, ?, ?)",
                         zip(np.repeat(names, days).tolist(), np.tile(day_text, k).tolist(),
                             values.reshape(-1).round(3).tolist()))
        rows += k * days
    conn.commit()
    conn.close()
    return rows


def write_config(path: Path, *, name: str, epochs: int, batches: int) -> None:
    path.write_text(f"""# Synthetic daily panel for benchmarks/scale.py: fixed training budget.
name: {name}
source:
  table: {TABLE}
  id_column: series_id
  time_column: day
  target_column: units
freq: D
horizon: {HORIZON}
season_length: {SEASON}
models: [rnn, lstm, gru]
training:
  max_epochs: {epochs}
  max_batches_per_epoch: {batches}
  patience: {epochs}
backtest:
  windows: 1
validation:
  policy: refuse
""")


def run_size(n_series: int, *, days: int, repeat: int, epochs: int, batches: int,
             keep: Path | None) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory(prefix=f"scale-{n_series}-") as tmp:
        workdir = (keep / str(n_series)) if keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        env = bench_env(workdir)
        start = time.time()
        rows = write_panel(workdir / "forecasting.db", n_series=n_series, days=days)
        written = time.time() - start
        timed_command(forecasting_cmd("init-db"), env=env, log=workdir / "setup.log")
        config = workdir / "scale.yaml"
        write_config(config, name=f"scale{n_series}", epochs=epochs, batches=batches)
        print(f"{n_series} series: {rows} rows written in {written:.0f}s", flush=True)
        for i in range(repeat):
            record = instrumented_run(str(config), env=env, workdir=workdir, index=i)
            record.update(series=n_series, rows=rows)
            records.append(record)
            parts = breakdown(record)
            peak = max(record["peak_rss"].values()) / 2**20
            print(f"  run {i + 1}/{repeat}: process {parts['process wall']:.1f}s, peak RSS {peak:.0f} MiB, "
                  f"champion {record['summary']['champion'] if record['summary'] else '?'}", flush=True)
    return records


def stage_seconds(record: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, start, end in record["stages"]:
        out[name] = out.get(name, 0.0) + end - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="numbers of series, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (the median is shown)")
    parser.add_argument("--days", type=int, default=730, help="length of each series (2 years)")
    parser.add_argument("--epochs", type=int, default=4, help="training budget: max_epochs")
    parser.add_argument("--batches", type=int, default=20, help="training budget: max_batches_per_epoch")
    parser.add_argument("--keep", type=Path, default=None, help="keep each size's databases under this folder")
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    rows, per_stage, peaks, tree_peaks, all_records = {}, {}, {}, {}, {}
    for n in sizes:
        records = all_records[n] = run_size(n, days=args.days, repeat=args.repeat, epochs=args.epochs,
                           batches=args.batches, keep=args.keep)
        med = lambda values: statistics.median(values)  # noqa: E731
        stages = {s: med([stage_seconds(r).get(s, 0.0) for r in records]) for s in STAGES}
        parts = [breakdown(r) for r in records]
        total = med([p["process wall"] for p in parts])
        peak = med([max(r["peak_rss"].values()) for r in records]) / 2**20
        tree = med([max(r["peak_tree_rss"].values()) for r in records]) / 2**20
        rows[n] = {"series": n, "rows": records[0]["rows"], **{f"{s} s": v for s, v in stages.items()},
                   "other s": total - sum(stages.values()), "total s": total,
                   "training s": med([p[TRAINING] for p in parts]),
                   "peak MiB": peak, "peak MiB with children": tree, "s / 1000 series": total / n * 1000}
        per_stage[n] = stages
        peaks[n] = {s: med([r["peak_rss"].get(s, float("nan")) for r in records]) / 2**20
                    for s in STAGES}  # NaN: the stage was over before the first sample
        tree_peaks[n] = tree

    table = pd.DataFrame(rows).T
    table[["series", "rows"]] = table[["series", "rows"]].astype(int)
    print("\nWall seconds per stage, total (the whole `forecasting run` process) and peak RSS:")
    print(table.T.to_string(float_format=lambda v: f"{v:.1f}"))
    memory = pd.DataFrame(peaks)
    memory.index = [f"{s} peak MiB" for s in memory.index]
    print("\nPeak RSS of the run's process during each stage (MiB):")
    print(memory.to_string(float_format=lambda v: f"{v:.0f}"))

    notes = [f"fixed training budget: max_epochs {args.epochs}, max_batches_per_epoch {args.batches}, "
             f"batch_size 512; {args.days} days per series, h = {HORIZON}, season {SEASON}; "
             f"{args.repeat} run(s) per size (median)"]
    ratios = []
    for small, large in zip(sizes, sizes[1:]):
        total = (table.loc[large, "total s"] / large) / (table.loc[small, "total s"] / small)
        by_stage = {s: (per_stage[large][s] / large) / (per_stage[small][s] / small)
                    for s in STAGES if per_stage[small][s] > 0}
        worst = max(by_stage, key=by_stage.get)
        line = (f"per-series cost {large}/{small}: total {total:.2f}x "
                f"({'no worse than' if total <= 1.0 else 'WORSE than'} linear); per stage: "
                + ", ".join(f"{s} {v:.2f}x" for s, v in by_stage.items())
                + f"; worst {worst} {by_stage[worst]:.2f}x")
        ratios.append(line)
        print(line)
    largest = sizes[-1]
    verdict = (f"peak RSS at {largest} series: {table.loc[largest, 'peak MiB'] / 1024:.2f} GiB "
               f"(with child processes {tree_peaks[largest] / 1024:.2f} GiB): "
               f"{'within' if tree_peaks[largest] / 1024 <= MEMORY_TARGET_GIB else 'OVER'} {MEMORY_TARGET_GIB:.0f} GiB")
    print(verdict)
    if not args.no_results:
        from results import append_section

        body = (table.T.to_markdown(floatfmt=".1f") + "\n\nPeak RSS per stage (MiB):\n\n"
                + memory.to_markdown(floatfmt=".0f"))
        append_section(f"scale: synthetic daily panels {args.sizes} series through `forecasting run`",
                       body, notes=notes + ratios + [verdict])


if __name__ == "__main__":
    main()

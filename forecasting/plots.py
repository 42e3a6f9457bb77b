"""Figures for reviewers: forecast against actual for a few series."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on a worker

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def sample_series(series_ids: pd.Series, n: int) -> list[str]:
    """Evenly spaced over the sorted ids, so the same series are shown night after night."""
    unique = sorted(series_ids.unique())
    if len(unique) <= n:
        return unique
    step = len(unique) / n
    return [unique[int(i * step)] for i in range(n)]


def forecast_vs_actual(
    panel: pd.DataFrame,
    predictions: pd.DataFrame,
    *,
    title: str,
    n_series: int = 4,
    context: int = 48,
) -> Figure:
    """One panel per sampled series: the last `context` actuals, then yhat at each origin."""
    chosen = sample_series(predictions["series_id"], n_series)
    figure, axes = plt.subplots(len(chosen), 1, figsize=(9, 2.4 * len(chosen)), squeeze=False)
    for ax, series_id in zip(axes[:, 0], chosen):
        actual = panel[panel["series_id"] == series_id].tail(context + predictions["step"].max())
        ax.plot(actual["ts"], actual["value"], color="black", linewidth=1, label="actual")
        mine = predictions[predictions["series_id"] == series_id]
        for origin, group in mine.groupby("origin"):
            ax.plot(group["ts"], group["yhat"], linewidth=1.5, label=f"forecast from {pd.Timestamp(origin):%Y-%m-%d}")
            if {"lower", "upper"} <= set(group.columns) and group["lower"].notna().all():
                ax.fill_between(group["ts"], group["lower"], group["upper"], alpha=0.2)
        ax.set_title(str(series_id), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    return figure

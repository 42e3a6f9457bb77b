"""Figures for reviewers: forecast against actual for a few series."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # matplotlib is imported where figures are drawn: the logging process, not the flow's
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fixed margins instead of tight_layout: tight_layout renders the figure to measure its text
# (building a forecast figure took 0.13 s with it, 0.03 s without) and left a layout engine that
# made savefig draw the figure twice (seen with py-spy on a sales night). Panels are stacked
# 2.4 inches apart with one title each, so fixed fractions fit them all.
PANEL_INCHES = 2.4
FIGURE_SERIES = 4  # series shown per figure
CONTEXT = 48  # actuals shown before a forecast


def _stacked_panels(title: str, panels: int) -> tuple[Figure, list[Axes]]:
    """A figure titled `title` in its top 0.3 inch, then `panels` axes one above the other."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no display, any thread

    height = PANEL_INCHES * panels
    figure = Figure(figsize=(9, height))
    figure.suptitle(title, y=1 - 0.08 / height, va="top")
    figure.subplots_adjust(left=0.08, right=0.98, top=1 - 0.6 / height, bottom=0.35 / height,
                           hspace=0.55)
    return figure, list(figure.subplots(panels, 1, squeeze=False)[:, 0])


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
    n_series: int = FIGURE_SERIES,
    context: int = CONTEXT,
) -> Figure:
    """One panel per sampled series: the last `context` actuals, then yhat at each origin."""
    chosen = sample_series(predictions["series_id"], n_series)
    figure, axes = _stacked_panels(title, len(chosen))
    for ax, series_id in zip(axes, chosen):
        actual = panel[panel["series_id"] == series_id].tail(context + predictions["step"].max())
        ax.plot(actual["ts"], actual["value"], color="black", linewidth=1, label="actual")
        mine = predictions[predictions["series_id"] == series_id]
        for origin, group in mine.groupby("origin"):
            ax.plot(group["ts"], group["yhat"], linewidth=1.5, label=f"forecast from {pd.Timestamp(origin):%Y-%m-%d}")
            if {"lower", "upper"} <= set(group.columns) and group["lower"].notna().all():
                ax.fill_between(group["ts"], group["lower"], group["upper"], alpha=0.2)
        ax.set_title(str(series_id), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return figure


def forecast_with_intervals(
    panel: pd.DataFrame, forecast: pd.DataFrame, *, title: str, n_series: int = FIGURE_SERIES, context: int = CONTEXT
) -> Figure:
    """Tonight's forecast after the last `context` actuals, with its interval as a band."""
    chosen = sample_series(forecast["series_id"], n_series)
    figure, axes = _stacked_panels(title, len(chosen))
    for ax, series_id in zip(axes, chosen):
        actual = panel[panel["series_id"] == series_id].tail(context)
        mine = forecast[forecast["series_id"] == series_id]
        ax.plot(actual["ts"], actual["value"], color="black", linewidth=1, label="actual")
        ax.plot(mine["ts"], mine["value"], linewidth=1.5, label="forecast")
        ax.fill_between(mine["ts"], mine["lower"], mine["upper"], alpha=0.25, label="interval")
        ax.set_title(str(series_id), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return figure


"""From a long panel to float32 training windows: checks, scaling, calendar features, windows.

The panel is long: `series_id`, `ts`, `value` (+ numeric covariate columns), sorted by
(series_id, ts), regular and without gaps. Everything the networks see is built here:

    value --(log1p if the training data allow it)--> per-series standardisation --> channel 0
    position in season --> sin, cos                                             --> channels 1, 2
    position in the year --> sin, cos (training.annual_cycle only)              --> channels 3, 4
    covariates --(per-column standardisation)-->                                  the channels after

All series are concatenated into ONE float32 tensor `[total_steps, features]`; a window is just a
start index into it, so no window is ever materialised until a mini-batch gathers it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import Tick

# Offsets that have no Period of their own map to the Period that counts the same steps.
_PERIOD_ALIASES = {"MS": "M", "ME": "M", "BMS": "M", "BME": "M", "QS": "Q", "QE": "Q",
                   "BQS": "Q", "BQE": "Q", "YS": "Y", "YE": "Y", "BYS": "Y", "BYE": "Y"}
N_CALENDAR = 2  # sin and cos of the position in the season
N_ANNUAL = 2  # sin and cos of the position in the year, with training.annual_cycle
DAYS_PER_YEAR = 365.2425  # the Gregorian calendar's mean year
NO_SPREAD = 1e-12  # a series' spread under this times its size (max(1, |mean|)) is none at all
FLAT_DIVISOR = 1e-9  # the divisor of such a series, times its size


# ----------------------------------------------------------------------------- checks


def check_horizon(horizon: int) -> int:
    if not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"`horizon` ({horizon!r}) must be an integer >= 1")
    return int(horizon)


class SeriesTooShort(ValueError):
    """A series has fewer observations than a model's input window and horizon need."""


def check_panel(panel: pd.DataFrame, *, covariates: Sequence[str] = (), min_length: int = 1,
                min_length_name: str = "input_window + horizon") -> None:
    """Raise a ValueError naming the parameter, the series and the value for unusable input."""
    missing = [c for c in ("series_id", "ts", "value", *covariates) if c not in panel.columns]
    if missing:
        raise ValueError(f"`panel` lacks columns {missing}; it has {list(panel.columns)}")
    if panel.empty:
        raise ValueError("`panel` holds no rows")
    for column in ("value", *covariates):
        bad = panel[column].isna()
        if bad.any():
            row = panel.loc[bad.idxmax()]
            raise ValueError(
                f"`{column}` of series {row['series_id']!r} is NaN at ts {row['ts']} "
                f"({int(bad.sum())} NaN values in all); fill or drop them before forecasting"
            )
    lengths = panel.groupby("series_id", sort=False).size()
    short = lengths[lengths < min_length]
    if len(short):
        sid, n = short.index[0], int(short.iloc[0])
        raise SeriesTooShort(
            f"series {sid!r} has {n} observations, fewer than `{min_length_name}` ({min_length})"
            + (f"; {len(short)} series are that short" if len(short) > 1 else "")
        )


# ----------------------------------------------------------------------------- calendar


def season_position(ts: pd.Series | pd.DatetimeIndex, *, freq: str, season_length: int) -> np.ndarray:
    """Position of each timestamp in its season, 0..season_length-1, the same for all series."""
    index = pd.DatetimeIndex(ts)
    offset = to_offset(freq)
    code = offset.rule_code
    base = code.partition("-")[0]
    ordinal = None
    if base in ("SMS", "SME"):  # twice a month: no Period counts them, and months count half
        second = index.day >= offset.day_of_month if base == "SMS" else index.day > offset.day_of_month
        halves = 2 * (index.year * 12 + index.month - 1) + np.asarray(second, np.int64)
        return np.mod(np.asarray(halves, np.int64) // max(offset.n, 1), season_length)
    for period_freq in (code, _PERIOD_ALIASES.get(base, base)):
        try:
            with warnings.catch_warnings():  # PeriodDtype[B] is deprecated but still counts right
                warnings.simplefilter("ignore", FutureWarning)
                ordinal = index.to_period(period_freq).asi8 // max(offset.n, 1)
            break
        except (ValueError, TypeError):
            continue
    if ordinal is None:  # no Period for this offset: count its steps from a fixed anchor
        ordinal = _steps_from_epoch(index, offset)
    return np.mod(ordinal, season_length)


def _steps_from_epoch(index: pd.DatetimeIndex, offset: Any) -> np.ndarray:
    """Steps of `offset` between its first timestamp from 1970-01-01 on and each of `index`.

    A fixed-length offset divides; business hours count whole weeks; any other (week of month,
    custom business days or month starts) is counted on its own grid: days since 1970 gave such a series
    positions that jumped at random (e.g. 3, 2, 6, 10 for the first Mondays of four months).
    The timestamps are on the grid: validation refuses any off it.
    """
    if isinstance(offset, Tick):
        return np.floor_divide(index.as_unit("ns").asi8, offset.nanos)
    if isinstance(offset, (pd.offsets.BusinessHour, pd.offsets.CustomBusinessHour)):
        return _business_hour_steps(index, offset)
    anchor = offset.rollforward(pd.Timestamp("1970-01-01"))
    grid = pd.date_range(min(index.min(), anchor), max(index.max(), anchor), freq=offset)
    return (grid.searchsorted(index) - grid.searchsorted(anchor)).astype(np.int64)


def _business_hour_steps(index: pd.DatetimeIndex, offset: Any) -> np.ndarray:
    """Business hours (bh, cbh) from the Monday 1970-01-05, whole weeks at a time: their grid
    repeats every week (a freq string sets no holidays), and a grid from 1970 took seconds."""
    monday = pd.Timestamp("1970-01-05")
    week = pd.date_range(monday, monday + pd.Timedelta(days=7), freq=offset.base, inclusive="left")
    starts = index.normalize() - pd.to_timedelta(index.day_of_week, unit="D")  # each one's Monday
    weeks = np.asarray((starts - monday).days, np.int64) // 7
    within = np.searchsorted((week - monday).as_unit("ns").asi8, (index - starts).as_unit("ns").asi8)
    return (weeks * len(week) + within) // max(offset.n, 1)


def calendar_features(position: np.ndarray, season_length: int) -> np.ndarray:
    angle = 2.0 * np.pi * position / season_length
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)  # [n, 2]


def calendar_channels(annual_cycle: bool) -> int:
    """How many calendar channels follow the target: the season's sin/cos, and the year's."""
    return N_CALENDAR + (N_ANNUAL if annual_cycle else 0)


def year_fraction(ts: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Where each timestamp lies in its calendar year, in [0, 1): 1 January 00:00 is 0.

    A season of `season_length` steps cannot say this for daily or hourly data (a year is not a
    whole number of days), yet their level often follows the year: temperature, heating, holidays.
    """
    index = pd.DatetimeIndex(ts)
    day = (index.day_of_year - 1).to_numpy(np.float64)
    time_of_day = np.asarray((index - index.normalize()) / pd.Timedelta(days=1), np.float64)  # hourly data
    return (day + time_of_day) / np.where(index.is_leap_year, 366.0, 365.0)


def years_per_step(freq: str) -> float:
    """The mean length of one `freq` step as a fraction of a year (business days, months and
    weeks included), for advancing the year's channels a step at a time."""
    steps = 4000
    span = pd.date_range("2001-01-01", periods=steps + 1, freq=freq)
    return (span[-1] - span[0]) / pd.Timedelta(days=DAYS_PER_YEAR) / steps


# ----------------------------------------------------------------------------- scaling


@dataclass
class Scaler:
    """Per-series scaling of (optionally log1p-transformed) values, fitted on training data.

    scaled = (transform(value) - mean) / scale, with `scale` the standard deviation of the
    transformed series (`scale_by="std"`) or its mean absolute seasonal difference
    (`"seasonal_diff"`: the MASE denominator, so an error of 1 in scaled space is about one MASE).
    """

    log: bool  # log1p before scaling (only when every training value is >= 0)
    scale_by: str = "std"  # std | seasonal_diff
    season_length: int = 1
    mean: dict[str, float] = field(default_factory=dict)  # per series, of the transformed values
    std: dict[str, float] = field(default_factory=dict)  # per series divisor
    cov_mean: dict[str, float] = field(default_factory=dict)  # per covariate column
    cov_std: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, panel: pd.DataFrame, *, scaling: str = "auto", scale_by: str = "std",
            season_length: int = 1, covariates: Sequence[str] = ()) -> Scaler:
        if scaling not in ("auto", "log", "standard"):
            raise ValueError(f"`scaling` ({scaling!r}) must be one of 'auto', 'log', 'standard'")
        if scale_by not in ("std", "seasonal_diff"):
            raise ValueError(f"`scale_by` ({scale_by!r}) must be 'std' or 'seasonal_diff'")
        nonneg = bool((panel["value"] >= 0).all())
        if scaling == "log" and not nonneg:
            sid = panel.loc[panel["value"] < 0, "series_id"].iloc[0]
            raise ValueError(f"`scaling` ('log') needs values >= 0; series {sid!r} has negative values")
        scaler = cls(log=(scaling == "log") or (scaling == "auto" and nonneg), scale_by=scale_by,
                     season_length=season_length)
        scaler.add_series(panel)
        for column in covariates:
            values = panel[column].to_numpy(np.float64)
            scaler.cov_mean[column] = float(values.mean())
            scaler.cov_std[column] = _safe_std(values)
        return scaler

    def add_series(self, panel: pd.DataFrame, *, blocks: SeriesBlocks | None = None) -> None:
        """Fit the statistics of series not seen yet (from the history they come with).

        Vectorised over the new series, a bounded number of rows at a time: per series the
        mean of the transformed values and the divisor (mean absolute seasonal difference,
        or the standard deviation).
        """
        blocks = blocks or series_blocks(panel)
        new = np.flatnonzero([sid not in self.mean for sid in blocks.ids])
        if len(new) == 0:
            return
        values = panel["value"].to_numpy(np.float64)
        for series, rows in blocks.chunks(new):
            lengths = blocks.lengths[series]
            z = values[rows]  # [rows] the chunk's series one after another
            if self.log:
                ends = np.cumsum(lengths)
                require_log_domain(z, lambda row: blocks.ids[series[int(np.searchsorted(ends, row, side="right"))]])
                z = np.log1p(z)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            owner = np.repeat(np.arange(len(series)), lengths)  # [rows] series of each row
            mean = np.add.reduceat(z, starts) / lengths
            std = np.sqrt(np.add.reduceat((z - mean[owner]) ** 2, starts) / lengths)
            # A series without spread (constant, in log1p's units too) gets a divisor that is tiny
            # against its own size: the network's small residual output then moves its forecast by
            # nothing, where a divisor of 1 turned 0.02 into a 2% error in log units. Spread is
            # judged relative to the size too: 1e9 +- 1 has a spread of 1e-9 after log1p.
            size = np.maximum(1.0, np.abs(mean))
            divisor = np.where((std > NO_SPREAD * size) & np.isfinite(std), std, FLAT_DIVISOR * size)
            if self.scale_by == "seasonal_diff":
                m = np.where(lengths > self.season_length, self.season_length, 1)  # [series]
                mad = np.full(len(series), np.nan)
                position = np.arange(len(z)) - starts[owner]  # [rows] step within its series
                for lag in np.unique(m):
                    has = position >= lag
                    diff = np.where(has, np.abs(z - np.roll(z, lag)), 0.0)  # |z_t - z_t-lag|
                    total = np.bincount(owner, weights=diff, minlength=len(series))
                    with np.errstate(invalid="ignore", divide="ignore"):
                        mad = np.where(m == lag, total / (lengths - lag), mad)
                use = (lengths > m) & np.isfinite(mad) & (mad > NO_SPREAD * size)
                divisor = np.where(use, mad, divisor)
            for i, index in enumerate(series):
                sid = blocks.ids[index]
                self.mean[sid] = float(mean[i])
                self.std[sid] = float(divisor[i])

    def _transform(self, values: np.ndarray, sid: str) -> np.ndarray:
        if self.log:
            require_log_domain(values, lambda row: sid)
            return np.log1p(values)
        return values

    def scale_rows(self, values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """scale() of many rows at once, given each row's series mean and divisor."""
        z = np.log1p(values) if self.log else values
        return (z - mean) / std

    def arrays(self, series_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """mean and divisor of the given series as arrays: [series] each."""
        return (np.array([self.mean[sid] for sid in series_ids], np.float64),
                np.array([self.std[sid] for sid in series_ids], np.float64))

    def unscale_rows(self, scaled: np.ndarray, series_ids: Sequence[str]) -> np.ndarray:
        """unscale() of a [series, steps] array, row i of series_ids[i]."""
        mean, std = self.arrays(series_ids)
        z = np.asarray(scaled, np.float64) * std[:, None] + mean[:, None]
        return np.expm1(z) if self.log else z

    def scale(self, values: np.ndarray, sid: str) -> np.ndarray:
        return (self._transform(values, sid) - self.mean[sid]) / self.std[sid]

    def unscale(self, scaled: np.ndarray, sid: str) -> np.ndarray:
        z = scaled * self.std[sid] + self.mean[sid]
        return np.expm1(z) if self.log else z

    def to_dict(self) -> dict:
        return {"log": self.log, "scale_by": self.scale_by, "season_length": self.season_length,
                "mean": self.mean, "std": self.std, "cov_mean": self.cov_mean, "cov_std": self.cov_std}

    @classmethod
    def from_dict(cls, raw: dict) -> Scaler:
        return cls(log=bool(raw["log"]), scale_by=raw["scale_by"], season_length=int(raw["season_length"]),
                   mean=dict(raw["mean"]), std=dict(raw["std"]),
                   cov_mean=dict(raw["cov_mean"]), cov_std=dict(raw["cov_std"]))


def require_log_domain(values: np.ndarray, series_of_row: Callable[[int], str]) -> None:
    """Refuse values log1p cannot take (<= -1) in a model scaled with it, naming the series of
    the first: at fit, a new series' own history; at predict, a seen one's recent rows, which
    would otherwise become NaN forecasts without a word."""
    bad = np.flatnonzero(values <= -1)
    if len(bad):
        raise ValueError(f"`value` of series {series_of_row(int(bad[0]))!r} holds {values[bad[0]]} but the "
                         "model was trained with log1p scaling (values must be > -1)")


def _safe_std(values: np.ndarray) -> float:
    std = float(values.std())
    return std if std > 1e-8 and math.isfinite(std) else 1.0


# ----------------------------------------------------------------------------- features & windows


@dataclass
class SeriesFeatures:
    """All series' features concatenated into one float32 tensor, with per-series bounds."""

    data: torch.Tensor  # [total_steps, features] float32
    series_ids: list[str]
    starts: np.ndarray  # [series] first row of each series in `data`
    lengths: np.ndarray  # [series]
    last_ts: list[pd.Timestamp]


CHUNK_ROWS = 1 << 20  # rows converted at a time: bounds the float64 temporaries to a few MiB


@dataclass
class SeriesBlocks:
    """Where each series of a long panel lies: its rows, series after series.

    Series come in order of first appearance (as groupby(sort=False)), the rows of a series in
    panel order. `order` is None when the series are already contiguous (the usual case: panels
    are sorted by series_id, ts), so that no reordered copy of the panel is ever made.
    """

    ids: list[str]  # [series]
    lengths: np.ndarray  # [series]
    starts: np.ndarray  # [series] first position of each series in block order
    order: np.ndarray | None  # [rows] panel row of each position; None: the identity

    def rows(self, series: np.ndarray) -> np.ndarray:
        """Panel row positions of the given series, one series after the other."""
        lengths = self.lengths[series]
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        positions = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(self.starts[series] - first, lengths)
        return positions if self.order is None else self.order[positions]

    def chunks(self, series: np.ndarray | None = None,
               max_rows: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(series, their rows) in runs of whole series of about max_rows (CHUNK_ROWS) rows at most."""
        max_rows = max_rows or CHUNK_ROWS
        series = np.arange(len(self.ids)) if series is None else np.asarray(series)
        ends = np.cumsum(self.lengths[series])
        begin = 0
        while begin < len(series):
            base = ends[begin - 1] if begin else 0
            end = max(int(np.searchsorted(ends, base + max_rows, side="right")), begin + 1)
            chunk = series[begin:end]
            yield chunk, self.rows(chunk)
            begin = end


def series_blocks(panel: pd.DataFrame) -> SeriesBlocks:
    codes, uniques = pd.factorize(panel["series_id"], sort=False)
    lengths = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    contiguous = bool((codes[1:] >= codes[:-1]).all())  # first-appearance codes only rise
    order = None if contiguous else np.argsort(codes, kind="stable").astype(np.int64)
    return SeriesBlocks(list(uniques), lengths, starts, order)


def tail_rows(blocks: SeriesBlocks, n: int) -> np.ndarray:
    """Panel rows of the last `n` rows of each series (all of a shorter one), series after series."""
    keep = np.minimum(blocks.lengths, n)
    skip = blocks.lengths - keep
    first = np.concatenate([[0], np.cumsum(keep)[:-1]]).astype(np.int64)
    positions = np.arange(int(keep.sum()), dtype=np.int64) + np.repeat(blocks.starts + skip - first, keep)
    return positions if blocks.order is None else blocks.order[positions]


def build_features(panel: pd.DataFrame, scaler: Scaler, *, freq: str, season_length: int,
                   covariates: Sequence[str] = (), annual_cycle: bool = False) -> SeriesFeatures:
    """The one float32 tensor every window is gathered from: [total_steps, features].

    Written in place a bounded number of rows at a time: no float64 copy of the panel and no
    frame per series. Row order: series after series (first appearance), panel order within.
    """
    calendar = calendar_channels(annual_cycle)
    n, f = len(panel), 1 + calendar + len(covariates)
    data = np.empty((n, f), dtype=np.float32)  # [total_steps, features]
    blocks = series_blocks(panel)
    mean, std = scaler.arrays(blocks.ids)  # [series] each
    values = panel["value"].to_numpy(np.float64)
    ts = panel["ts"].to_numpy("datetime64[ns]")
    extra = [panel[c].to_numpy(np.float64) for c in covariates]
    for series, rows in blocks.chunks():
        first = int(blocks.starts[series[0]])
        out = slice(first, first + len(rows))
        owner = np.repeat(series, blocks.lengths[series])  # [rows]
        if scaler.log:  # a series seen in training may since hold a value log1p cannot take
            require_log_domain(values[rows], lambda row: blocks.ids[owner[row]])
        data[out, 0] = scaler.scale_rows(values[rows], mean[owner], std[owner])
        index = pd.DatetimeIndex(ts[rows])  # built once per chunk: both calendars read it
        pos = season_position(index, freq=freq, season_length=season_length)
        data[out, 1:1 + N_CALENDAR] = calendar_features(pos, season_length)
        if annual_cycle:
            data[out, 1 + N_CALENDAR:1 + calendar] = calendar_features(year_fraction(index), 1)
        for j, column in enumerate(covariates):
            data[out, 1 + calendar + j] = (extra[j][rows] - scaler.cov_mean[column]) / scaler.cov_std[column]
    last = blocks.starts + blocks.lengths - 1
    last_rows = last if blocks.order is None else blocks.order[last]
    return SeriesFeatures(torch.from_numpy(data), blocks.ids, blocks.starts.copy(),
                          blocks.lengths.copy(), list(pd.DatetimeIndex(ts[last_rows])))


def window_starts(features: SeriesFeatures, *, input_window: int, horizon: int,
                  val_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Start rows of the training and validation windows (input_window + horizon rows each).

    Validation windows are those whose target ends in the last `val_steps` steps of a series;
    training windows have targets that end before the first validation target begins, so early
    stopping judges on steps no training window has seen. A series with a single window gives
    it to validation.
    """
    total = input_window + horizon
    train, val = [], []
    for start, length in zip(features.starts, features.lengths):
        last = start + length - total  # start of the last window of this series
        if last < start:
            continue
        first_val = max(start, last - val_steps + 1)
        # The first validation target starts at first_val + input_window; a training target
        # (horizon rows) must end before it.
        train.append(np.arange(start, first_val - horizon + 1, dtype=np.int64))
        val.append(np.arange(first_val, last + 1, dtype=np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.empty(0, np.int64)  # noqa: E731
    return cat(train), cat(val)


def gather_windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Gather rows `start..start+length-1` for each start: [batch, length, features]."""
    index = starts[:, None] + torch.arange(length, device=data.device)  # [batch, length]
    return data[index]  # [batch, length, features]


def last_windows(features: SeriesFeatures, input_window: int) -> torch.Tensor:
    """The last `input_window` rows of every series: [series, input_window, features]."""
    starts = torch.as_tensor(features.starts + features.lengths - input_window)
    return gather_windows(features.data, starts, input_window)

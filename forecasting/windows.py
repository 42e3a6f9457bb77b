"""From a long panel to float32 training windows: checks, scaling, calendar features, windows.

The panel is long: `series_id`, `ts`, `value` (+ numeric covariate columns), sorted by
(series_id, ts), regular and without gaps. Everything the networks see is built here:

    value --(log1p if the training data allow it)--> per-series standardisation --> channel 0
    position in season --> sin, cos                                             --> channels 1, 2
    covariates --(per-column standardisation)-->                                  channels 3...

All series are concatenated into ONE float32 tensor `[total_steps, features]`; a window is just a
start index into it, so no window is ever materialised until a mini-batch gathers it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from pandas.tseries.frequencies import to_offset

# Offsets that have no Period of their own map to the Period that counts the same steps.
_PERIOD_ALIASES = {"MS": "M", "ME": "M", "BMS": "M", "BME": "M", "SMS": "M", "QS": "Q", "QE": "Q",
                   "BQS": "Q", "BQE": "Q", "YS": "Y", "YE": "Y", "BYS": "Y", "BYE": "Y"}
N_CALENDAR = 2  # sin and cos of the position in the season


# ----------------------------------------------------------------------------- checks


def check_horizon(horizon: int) -> int:
    if not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"`horizon` ({horizon!r}) must be an integer >= 1")
    return int(horizon)


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
        raise ValueError(
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
    for period_freq in (code, _PERIOD_ALIASES.get(base, base)):
        try:
            with warnings.catch_warnings():  # PeriodDtype[B] is deprecated but still counts right
                warnings.simplefilter("ignore", FutureWarning)
                ordinal = index.to_period(period_freq).asi8 // max(offset.n, 1)
            break
        except (ValueError, TypeError):
            continue
    if ordinal is None:  # no Period for this offset: count fixed-length steps from the epoch
        try:
            step = offset.nanos
        except ValueError:
            step = pd.Timedelta(days=1).value
        ordinal = np.round(index.asi8 / step).astype(np.int64)
    return np.mod(ordinal, season_length)


def calendar_features(position: np.ndarray, season_length: int) -> np.ndarray:
    angle = 2.0 * np.pi * position / season_length
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)  # [n, 2]


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

    def add_series(self, panel: pd.DataFrame) -> None:
        """Fit the statistics of series not seen yet (from the history they come with)."""
        for sid, values in panel.groupby("series_id", sort=False)["value"]:
            if sid in self.mean:
                continue
            z = self._transform(values.to_numpy(np.float64), sid)
            self.mean[sid] = float(z.mean())
            m = self.season_length if len(z) > self.season_length else 1
            if self.scale_by == "seasonal_diff" and len(z) > m:
                diff = float(np.mean(np.abs(z[m:] - z[:-m])))
                self.std[sid] = diff if diff > 1e-8 and math.isfinite(diff) else _safe_std(z)
            else:
                self.std[sid] = _safe_std(z)

    def _transform(self, values: np.ndarray, sid: str) -> np.ndarray:
        if self.log:
            if (values <= -1).any():
                raise ValueError(f"`value` of series {sid!r} holds {values.min()} but the model was "
                                 "trained with log1p scaling (values must be > -1)")
            return np.log1p(values)
        return values

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


def build_features(panel: pd.DataFrame, scaler: Scaler, *, freq: str, season_length: int,
                   covariates: Sequence[str] = ()) -> SeriesFeatures:
    n, f = len(panel), 1 + N_CALENDAR + len(covariates)
    data = np.empty((n, f), dtype=np.float32)  # [total_steps, features]
    ids, starts, lengths, last_ts = [], [], [], []
    row = 0
    for sid, group in panel.groupby("series_id", sort=False):
        k = len(group)
        data[row:row + k, 0] = scaler.scale(group["value"].to_numpy(np.float64), sid)
        pos = season_position(group["ts"], freq=freq, season_length=season_length)
        data[row:row + k, 1:1 + N_CALENDAR] = calendar_features(pos, season_length)
        for j, column in enumerate(covariates):
            values = group[column].to_numpy(np.float64)
            data[row:row + k, 1 + N_CALENDAR + j] = (values - scaler.cov_mean[column]) / scaler.cov_std[column]
        ids.append(sid)
        starts.append(row)
        lengths.append(k)
        last_ts.append(group["ts"].iloc[-1])
        row += k
    return SeriesFeatures(torch.from_numpy(data), ids, np.asarray(starts, np.int64),
                          np.asarray(lengths, np.int64), last_ts)


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

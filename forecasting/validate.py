"""Checks on the long frame before any model sees it, and what to do when one fails.

Each problem names the dataset, the series, the check and an example timestamp. The policy of
the dataset config decides: `refuse` (default) fails the run; `fill` repairs gaps and missing
targets by interpolation within each series (and keeps one of rows that repeat a timestamp with
the same values); `drop` leaves the failing series out and forecasts the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import Tick

from forecasting.config import DatasetConfig

# The checks a policy of `fill` can repair; the others always refuse or drop the series.
# Infinite values are not filled in: they are what an upstream division by zero or overflow
# writes, a fault to fix there, and a series with no value at all has nothing to fill from.
FILLABLE = frozenset({"missing_timestamps", "missing_target", "missing_covariate",
                      "duplicate_timestamps", "unsorted"})


@dataclass(frozen=True)
class Problem:
    series_id: str
    check: str  # duplicate_timestamps | conflicting_duplicates | unsorted | missing_target | missing_covariate
    #             | non_finite | no_values
    #             | off_frequency | missing_timestamps | too_short | ends_before_as_of | empty | negative_target
    example: pd.Timestamp | None
    detail: str

    def describe(self, dataset: str) -> str:
        at = f" at {self.example}" if self.example is not None else ""
        return f"dataset {dataset!r}, series {self.series_id!r}: {self.check}{at}: {self.detail}"


class ValidationFailed(ValueError):
    """The dataset failed validation under the `refuse` policy (never retried)."""

    def __init__(self, dataset: str, problems: list[Problem], note: str | None = None) -> None:
        self.dataset = dataset
        self.problems = problems
        shown = "\n".join("  " + p.describe(dataset) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        why = f": {note}" if note else ""
        super().__init__(
            f"dataset {dataset!r} failed validation ({len(problems)} problem(s)){why}:\n{shown}{more}"
        )


@dataclass
class ValidationReport:
    panel: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # series left out under `drop`
    filled: dict[str, int] = field(default_factory=dict)  # series -> values (targets, covariates) filled under `fill`


def observed_rows(loaded: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """The rows the source really holds: what `actuals` may record. Never a value filled in by
    the `fill` policy; but a series dropped tonight is observed all the same, and its real
    values still meet the forecasts made for it before (they used to go unrecorded)."""
    if report.panel is loaded:  # no problems: nothing dropped, filled, duplicated or NaN
        return loaded
    troubled = set(report.filled) | set(report.dropped)
    # Series that passed every check hold neither NaN targets nor duplicate timestamps; only
    # the repaired and the dropped ones need the rows the source really holds picked out.
    picked = loaded["series_id"].isin(list(troubled)).to_numpy()
    if not picked.any():
        return loaded
    part = loaded[picked]
    real = np.isfinite(part["value"].to_numpy(dtype=float)) & ~part.duplicated(["series_id", "ts"], keep="last").to_numpy()
    # A timestamp held with different targets has no one observation to record (and a dropped
    # series may hold one: `conflicting_duplicates`); repeats of one value are that value.
    clashing = conflicting_versions(part, ["value"])
    if len(clashing):
        keys = pd.MultiIndex.from_frame(part[["series_id", "ts"]])
        real &= ~keys.isin(pd.MultiIndex.from_frame(clashing[["series_id", "ts"]]))
    keep = ~picked
    keep[np.flatnonzero(picked)[real]] = True
    return loaded[keep]


LENGTH_RULE = "input window + horizon x (backtest windows + 1)"


def min_length(config: DatasetConfig, input_window: int) -> int:
    """Enough history for one training window plus every backtest window."""
    return input_window + config.horizon * (config.backtest.windows + 1)


def describe_min_length(config: DatasetConfig, input_window: int) -> str:
    """min_length with its terms and the keys that set them: what to change for shorter series."""
    window = (f"training.input_window {input_window}" if config.training.input_window is not None else
              f"training.input_window {input_window} (its default, 3 x season_length or more)")
    return f"{window} + horizon {config.horizon} x (backtest.windows {config.backtest.windows} + 1)"


def find_problems(
    panel: pd.DataFrame, *, freq: str, required_length: int, as_of: pd.Timestamp | None = None,
    covariates: Sequence[str] = (), length_rule: str = LENGTH_RULE,
) -> list[Problem]:
    """Every problem of every series, series in sorted order, checks in a fixed order.

    Series whose timestamps are exactly the `freq` grid from their first to their last (the
    usual case) are checked for all series at once; only the others go through the checks one
    series at a time, which name the first offending timestamp.
    """
    offset = pd.tseries.frequencies.to_offset(freq)
    codes, ids = pd.factorize(panel["series_id"], sort=True)  # the order of groupby(sort=True)
    ts_column = panel["ts"]
    if len(ids) == 0 or (codes < 0).any() or not _is_naive_datetime(ts_column):
        return [p for sid, group in panel.groupby("series_id", sort=True)
                for p in _series_problems(sid, group, freq=freq, offset=offset, required_length=required_length,
                                          as_of=as_of, covariates=covariates, length_rule=length_rule)]
    lengths = np.bincount(codes, minlength=len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    order = np.argsort(codes, kind="stable")  # rows of each series together, panel order within
    ts = ts_column.to_numpy("datetime64[ns]").view(np.int64)[order]
    owner = codes[order]
    same = owner[1:] == owner[:-1]
    # a series is clean when sorted, without duplicates, NaN, infinities or NaT, and exactly on its grid
    clean = np.ones(len(ids), bool)
    clean[owner[1:][same & (ts[1:] <= ts[:-1])]] = False  # unsorted or duplicated
    for column in ("value", *covariates):
        clean[codes[~np.isfinite(_floats(panel[column]))]] = False
    clean[owner[ts == np.iinfo(np.int64).min]] = False  # NaT
    first, last = ts[starts], ts[starts + lengths - 1]
    # one grid per distinct (first, last): usually a handful for the whole panel
    pairs, pair_of = np.unique(np.stack([first, last], axis=1), axis=0, return_inverse=True)
    by_pair = np.argsort(pair_of.reshape(-1), kind="stable")
    bounds = np.searchsorted(pair_of.reshape(-1)[by_pair], np.arange(len(pairs) + 1))
    for p, (begin, end) in enumerate(pairs):
        members = by_pair[bounds[p]:bounds[p + 1]]
        members = members[clean[members]]
        if len(members) == 0:
            continue
        expected = pd.date_range(pd.Timestamp(begin), pd.Timestamp(end), freq=offset).as_unit("ns").asi8
        clean[members[lengths[members] != len(expected)]] = False
        fits = members[lengths[members] == len(expected)]
        step = max(1, (1 << 20) // max(len(expected), 1))  # about a million rows at a time
        for chunk in (fits[i:i + step] for i in range(0, len(fits), step)):
            grid = ts[starts[chunk][:, None] + np.arange(len(expected))] == expected  # [series, steps]
            clean[chunk[~grid.all(axis=1)]] = False
    problems: list[Problem] = []
    for i, sid in enumerate(ids):
        if not clean[i]:
            group = panel.iloc[order[starts[i]:starts[i] + lengths[i]]]
            problems += _series_problems(sid, group, freq=freq, offset=offset, required_length=required_length,
                                         as_of=as_of, covariates=covariates, length_rule=length_rule)
            continue
        end = pd.Timestamp(int(last[i]))
        if lengths[i] < required_length:  # clean: the steps spanned are its rows
            problems.append(Problem(sid, "too_short", end, _too_short(int(lengths[i]), required_length,
                                                                                 length_rule)))
        if as_of is not None and end < as_of:
            problems.append(Problem(sid, "ends_before_as_of", end, f"last observation is before as_of {as_of}"))
    return problems


def _floats(column: pd.Series) -> np.ndarray:
    return column.to_numpy(dtype="float64", na_value=np.nan)


def _is_naive_datetime(column: pd.Series) -> bool:
    return isinstance(column.dtype, np.dtype) and column.dtype.kind == "M"


def _too_short(steps: int, required_length: int, length_rule: str) -> str:
    return f"{steps} time steps, need at least {required_length} ({length_rule})"


def _series_problems(series_id: str, group: pd.DataFrame, *, freq: str, offset: pd.DateOffset,
                     required_length: int, as_of: pd.Timestamp | None,
                     covariates: Sequence[str] = (), length_rule: str = LENGTH_RULE) -> list[Problem]:
    """The checks of one series, in order, each naming its first offending timestamp."""
    problems: list[Problem] = []
    ts = group["ts"]
    duplicated = ts[ts.duplicated()]
    if len(duplicated):  # timestamps, not extra rows; the first in time, not in the rows' order
        problems.append(Problem(series_id, "duplicate_timestamps", duplicated.min(),
                                f"{duplicated.nunique()} timestamp(s) appear more than once"))
        problems += _conflicting_duplicates(series_id, group, ["value", *covariates])
    if not ts.is_monotonic_increasing:
        position = int((ts.diff() < pd.Timedelta(0)).to_numpy().argmax())
        problems.append(Problem(series_id, "unsorted", ts.iloc[position],
                                "rows are not in time order"))
    target = _floats(group["value"])
    for column in ("value", *covariates):
        problems += _value_problems(series_id, ts, target if column == "value" else _floats(group[column]),
                                    column=column)
    unique = pd.DatetimeIndex(ts.drop_duplicates().sort_values())
    expected = pd.date_range(unique[0], unique[-1], freq=offset)
    off_grid = unique.difference(expected)
    if len(off_grid):
        problems.append(Problem(series_id, "off_frequency", off_grid[0],
                                f"{len(off_grid)} timestamp(s) not on the {freq!r} grid"))
    gaps = expected.difference(unique)
    if len(gaps):
        problems.append(Problem(series_id, "missing_timestamps", gaps[0],
                                f"{len(gaps)} timestamp(s) missing against freq {freq!r}"))
    # Length and end are the target's: rows whose target is NULL before the first value or
    # after the last add no history (`fill` has nothing to interpolate them from), so a series
    # that stopped reporting but kept its rows ends where it would without them.
    seen = pd.DatetimeIndex(ts[~np.isnan(target)].drop_duplicates().sort_values())
    if not len(seen):  # no target at all: no_values names it
        return problems
    spanned = len(pd.date_range(seen[0], seen[-1], freq=offset))  # steps; gaps are their own check
    if spanned < required_length:
        problems.append(Problem(series_id, "too_short", seen[-1], _too_short(spanned, required_length, length_rule)))
    if as_of is not None and seen[-1] < as_of:
        problems.append(Problem(series_id, "ends_before_as_of", seen[-1],
                                f"last observation is before as_of {as_of}"))
    return problems


def _conflicting_duplicates(series_id: str, group: pd.DataFrame, columns: list[str]) -> list[Problem]:
    """Timestamps repeated with different values (target or covariates): no policy may pick one.

    The rows of one timestamp come in the order the database returns them, which no query
    without an ORDER BY on more than the time fixes: `fill` kept "the last", so two runs of one
    night could train on different values. Two series under one id (partly overlapping, in a
    source without `source.id_column`) look the same. Rows that repeat a timestamp with the same
    values are one observation delivered twice, and stay `fill`'s to repair.
    """
    versions = conflicting_versions(group, columns)
    if versions.empty:
        return []
    clashing = versions["ts"].drop_duplicates()
    first = clashing.iloc[0]
    at_first = versions[versions["ts"] == first]
    shown = "; ".join(f"{'target' if column == 'value' else repr(column)} {_distinct(at_first[column])}"
                      for column in columns if at_first[column].nunique(dropna=False) > 1)
    return [Problem(series_id, "conflicting_duplicates", first, (
        f"{len(clashing)} timestamp(s) appear more than once with different values (here: {shown}); "
        "no policy chooses between them: keep one row per timestamp in `source.query`, or, if the source "
        "holds several series, name the column that tells them apart in `source.id_column`"))]


def _distinct(values: pd.Series) -> str:
    """A column's distinct values in a fixed order (ascending, NULL/NaN last; not the database's
    order) and in full (15 significant digits: 1234567 and 1234568 stay apart)."""
    numbers = sorted({float(v) for v in values.dropna().tolist()})
    return ", ".join([*(f"{v:.15g}" for v in numbers), *(["NULL"] if values.isna().any() else [])])


def conflicting_versions(rows: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The distinct versions (series_id, ts and `columns`) of every (series_id, ts) that `rows`
    hold with different values; NaN equals NaN, and differs from a number. In time order."""
    keys = ["series_id", "ts"]
    repeated = rows[rows.duplicated(keys, keep=False)]
    distinct = repeated.drop_duplicates([*keys, *columns])
    clashing = distinct[distinct.duplicated(keys, keep=False)]
    return clashing.sort_values(keys, kind="stable")[[*keys, *columns]]


def _value_problems(series_id: str, ts: pd.Series, values: np.ndarray, *, column: str) -> list[Problem]:
    """NaN/NULL and infinite values of one numeric column of one series (`value`: the target)."""
    role = "target" if column == "value" else "covariate"
    what = "target" if role == "target" else f"covariate {column!r}"
    missing = np.isnan(values)
    if missing.all():
        return [Problem(series_id, "no_values", ts.iloc[0],
                        f"all {len(values)} {what} value(s) are NaN/NULL: nothing to fill from")]
    problems = []
    if missing.any():
        problems.append(Problem(series_id, f"missing_{role}", ts.iloc[int(missing.argmax())],
                                f"{int(missing.sum())} NaN/NULL {what} value(s)"))
    infinite = np.isinf(values)
    if infinite.any():
        problems.append(Problem(series_id, "non_finite", ts.iloc[int(infinite.argmax())],
                                f"{int(infinite.sum())} infinite {what} value(s)"))
    return problems


_CLOCK_CHANGES = {"duplicate_timestamps": "repeated", "conflicting_duplicates": "repeated",
                  "missing_timestamps": "skipped"}


def _sub_daily(freq: str) -> bool:
    """Whether `freq` steps more than once a day (where a clock change repeats or skips a step;
    a day that starts at a change, as in Santiago or Beirut, is still that day)."""
    offset = to_offset(freq)
    if isinstance(offset, (pd.offsets.BusinessHour, pd.offsets.CustomBusinessHour)):
        return True
    return isinstance(offset, Tick) and offset.nanos < pd.Timedelta(days=1).value


def _with_clock_hint(problem: Problem, timezone: str) -> Problem:
    """A duplicate or missing timestamp that a daylight-saving change explains, saying so: on
    a local wall clock, sub-daily data repeat an hour each autumn and skip one each spring."""
    change = _CLOCK_CHANGES.get(problem.check)
    if change is None or problem.example is None:
        return problem
    try:
        pd.Timestamp(problem.example).tz_localize(timezone, ambiguous="raise", nonexistent="raise")
    except (ValueError, TypeError):  # ambiguous or nonexistent on that clock
        return replace(problem, detail=(
            f"{problem.detail}; {problem.example} is {change} by a daylight-saving change in {timezone}: keep "
            "sub-daily data on a clock without one (timestamps with a zone, read with `source.timezone: UTC`)"))
    return problem


def validate(
    panel: pd.DataFrame, config: DatasetConfig, *, input_window: int, as_of: pd.Timestamp | None
) -> ValidationReport:
    """Apply the checks and the config's policy; return the panel the models may use."""
    if panel.empty:
        raise ValidationFailed(config.name, [Problem("*", "empty", None, "the source returned no rows")])
    if config.source.id_column is None:
        _refuse_several_series_as_one(panel, config)
    required = min_length(config, input_window)
    problems = find_problems(panel, freq=config.freq, required_length=required, as_of=as_of,
                             covariates=config.source.covariates, length_rule=describe_min_length(config, input_window))
    if _sub_daily(config.freq):
        problems = [_with_clock_hint(p, config.source.timezone) for p in problems]
    if not problems:
        return ValidationReport(panel)
    policy = config.validation.policy
    if policy == "refuse":
        raise ValidationFailed(config.name, problems)
    report = ValidationReport(panel, problems=problems)
    failing = {p.series_id for p in problems}
    if policy == "fill":
        fixable = {p.series_id for p in problems} - {
            p.series_id for p in problems if p.check not in FILLABLE
        }
        repaired = []
        for series_id, group in panel.groupby("series_id", sort=True):
            if series_id in fixable:
                group, count = _fill(group, config.freq)
                report.filled[series_id] = count
            repaired.append(group)
        panel = pd.concat(repaired, ignore_index=True)
        failing -= fixable
        if failing:
            unfixable = [p for p in problems if p.series_id in failing]
            raise ValidationFailed(config.name, unfixable)
        report.panel = panel.reset_index(drop=True)
        return report
    # policy == "drop"
    report.dropped = sorted(failing)
    report.panel = panel[~panel["series_id"].isin(failing)].reset_index(drop=True)
    total = panel["series_id"].nunique()
    share = config.validation.max_dropped_share
    if report.panel.empty:
        raise ValidationFailed(config.name, problems, note="every series failed")
    if len(failing) / total > share:
        raise ValidationFailed(config.name, problems, note=(
            f"{len(failing)} of {total} series failed, more than validation.max_dropped_share ({share:g}) "
            "lets a night drop: not trained on the rest"))
    return report


def _refuse_several_series_as_one(panel: pd.DataFrame, config: DatasetConfig) -> None:
    """A source without `id_column` holds one series. Where each timestamp has two rows or more,
    it holds several: `fill` kept the last row of each timestamp and made one series of rows
    from all of them, and the night went on with a warning."""
    rows, stamps = len(panel), panel["ts"].nunique()
    if rows < 2 * stamps:
        return
    first = panel.loc[panel["ts"].duplicated(), "ts"].min()
    raise ValidationFailed(config.name, [Problem(str(panel["series_id"].iloc[0]), "duplicate_timestamps", first, (
        f"{rows} rows for {stamps} timestamps: the source holds several series, but `source.id_column` is not "
        "set; name the column that tells them apart (or, for repeated deliveries of one series, keep one row "
        "per timestamp in `source.query`)"))], note="refused under every validation.policy")


def refuse_negatives_under_log_scaling(panel: pd.DataFrame, config: DatasetConfig) -> None:
    """Before a night trains: `training.scaling: log` takes logs of the targets, and a negative
    one failed as the first network trained, after the baselines' backtests, naming no dataset.
    On the validated panel (a series the policy dropped is not trained on) and its finite values."""
    if config.training.scaling != "log":
        return
    values = _floats(panel["value"])
    negative = panel[np.isfinite(values) & (values < 0)]
    if negative.empty:
        return
    first = negative.iloc[0]
    raise ValidationFailed(config.name, [Problem(str(first["series_id"]), "negative_target", first["ts"], (
        f"{len(negative)} negative target value(s), which `training.scaling` ('log') cannot take; use 'auto' "
        "(log only where the whole panel has no negative value) or 'standard'"))])


def _fill(group: pd.DataFrame, freq: str) -> tuple[pd.DataFrame, int]:
    """Sort, keep one of rows repeating a timestamp (their values are the same: find_problems
    refuses those that differ), keep the span from the first target to the last, reindex that
    to freq, interpolate per step."""
    group = group.sort_values("ts", kind="stable").drop_duplicates("ts", keep="last")
    # Rows of NULL target before the first value or after the last have no neighbour to
    # interpolate from: carrying the nearest value over them made up flat history, and at the
    # end actuals that the backtest scored against (naive's MASE 0). find_problems judged the
    # series' length and end without them.
    observed = group["value"].notna().to_numpy()
    group = group.iloc[observed.argmax():len(observed) - observed[::-1].argmax()]
    series_id = group["series_id"].iloc[0]
    index = pd.date_range(group["ts"].iloc[0], group["ts"].iloc[-1], freq=freq)
    filled = group.set_index("ts").reindex(index)
    numeric = filled.columns.drop("series_id")
    before = int(filled[numeric].isna().to_numpy().sum())  # targets and covariates
    # Linear per step (the grid is regular). The target has a value at both ends now; a
    # covariate without one there takes its nearest value.
    filled[numeric] = filled[numeric].interpolate(method="linear").ffill().bfill()
    filled["series_id"] = series_id
    filled = filled.rename_axis("ts").reset_index()
    return filled[group.columns], before

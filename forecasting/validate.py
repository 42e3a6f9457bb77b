"""Checks on the long frame before any model sees it, and what to do when one fails.

Each problem names the dataset, the series, the check and an example timestamp. The policy of
the dataset config decides: `refuse` (default) fails the run; `fill` repairs gaps and missing
targets by interpolation within each series (and drops duplicate timestamps, keeping the last);
`drop` leaves the failing series out and forecasts the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from forecasting.config import DatasetConfig

# The checks a policy of `fill` can repair; the others always refuse or drop the series.
FILLABLE = frozenset({"missing_timestamps", "missing_target", "duplicate_timestamps", "unsorted"})


@dataclass(frozen=True)
class Problem:
    series_id: str
    check: str  # duplicate_timestamps | unsorted | missing_timestamps | missing_target | too_short | ends_before_as_of
    example: pd.Timestamp | None
    detail: str

    def describe(self, dataset: str) -> str:
        at = f" at {self.example}" if self.example is not None else ""
        return f"dataset {dataset!r}, series {self.series_id!r}: {self.check}{at}: {self.detail}"


class ValidationFailed(ValueError):
    """The dataset failed validation under the `refuse` policy (never retried)."""

    def __init__(self, dataset: str, problems: list[Problem]) -> None:
        self.dataset = dataset
        self.problems = problems
        shown = "\n".join("  " + p.describe(dataset) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(
            f"dataset {dataset!r} failed validation ({len(problems)} problem(s)):\n{shown}{more}"
        )


@dataclass
class ValidationReport:
    panel: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # series left out under `drop`
    filled: dict[str, int] = field(default_factory=dict)  # series -> values filled under `fill`


def observed_rows(loaded: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    """The rows the source really holds for the series kept: what `actuals` may record
    (never values filled in by the `fill` policy)."""
    kept = loaded[loaded["series_id"].isin(report.panel["series_id"].unique()) & loaded["value"].notna()]
    return kept.drop_duplicates(["series_id", "ts"], keep="last")


def min_length(config: DatasetConfig, input_window: int) -> int:
    """Enough history for one training window plus every backtest window."""
    return input_window + config.horizon * (config.backtest.windows + 1)


def find_problems(
    panel: pd.DataFrame, *, freq: str, required_length: int, as_of: pd.Timestamp | None = None
) -> list[Problem]:
    problems: list[Problem] = []
    offset = pd.tseries.frequencies.to_offset(freq)
    for series_id, group in panel.groupby("series_id", sort=True):
        ts = group["ts"]
        duplicated = ts[ts.duplicated()]
        if len(duplicated):
            problems.append(Problem(series_id, "duplicate_timestamps", duplicated.iloc[0],
                                    f"{len(duplicated)} timestamp(s) appear more than once"))
        if not ts.is_monotonic_increasing:
            position = int((ts.diff() < pd.Timedelta(0)).to_numpy().argmax())
            problems.append(Problem(series_id, "unsorted", ts.iloc[position],
                                    "rows are not in time order"))
        missing_target = group.loc[group["value"].isna(), "ts"]
        if len(missing_target):
            problems.append(Problem(series_id, "missing_target", missing_target.iloc[0],
                                    f"{len(missing_target)} NaN/NULL target value(s)"))
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
        if len(expected) < required_length:  # steps spanned; gaps are their own check
            problems.append(Problem(series_id, "too_short", unique[-1],
                                    f"{len(expected)} time steps, need at least {required_length} "
                                    "(input window + horizon x (backtest windows + 1))"))
        if as_of is not None and unique[-1] < as_of:
            problems.append(Problem(series_id, "ends_before_as_of", unique[-1],
                                    f"last observation is before as_of {as_of}"))
    return problems


def validate(
    panel: pd.DataFrame, config: DatasetConfig, *, input_window: int, as_of: pd.Timestamp | None
) -> ValidationReport:
    """Apply the checks and the config's policy; return the panel the models may use."""
    if panel.empty:
        raise ValidationFailed(config.name, [Problem("*", "empty", None, "the source returned no rows")])
    required = min_length(config, input_window)
    problems = find_problems(panel, freq=config.freq, required_length=required, as_of=as_of)
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
    if report.panel.empty:
        raise ValidationFailed(config.name, problems)
    return report


def _fill(group: pd.DataFrame, freq: str) -> tuple[pd.DataFrame, int]:
    """Sort, keep the last of duplicate timestamps, reindex to freq, interpolate per step."""
    group = group.sort_values("ts", kind="stable").drop_duplicates("ts", keep="last")
    series_id = group["series_id"].iloc[0]
    index = pd.date_range(group["ts"].iloc[0], group["ts"].iloc[-1], freq=freq)
    filled = group.set_index("ts").reindex(index)
    before = int(filled["value"].isna().sum())
    numeric = filled.columns.drop("series_id")
    # Linear per step (the grid is regular); ends without a neighbour take the nearest value.
    filled[numeric] = filled[numeric].interpolate(method="linear").ffill().bfill()
    filled["series_id"] = series_id
    filled = filled.rename_axis("ts").reset_index()
    return filled[group.columns], before

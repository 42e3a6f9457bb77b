"""Validation before training: valid series pass unchanged, each corruption is named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecasting import pipeline
from forecasting.validate import ValidationFailed, refuse_negatives_under_log_scaling, validate
from tests.flow_fixtures import tiny_config

CONFIG = tiny_config()  # monthly, horizon 6, one backtest window
WINDOW = 12
REQUIRED = WINDOW + CONFIG.horizon * 2


@st.composite
def panels(draw: st.DrawFn) -> pd.DataFrame:
    n_series = draw(st.integers(1, 4))
    frames = []
    end = pd.Timestamp("2020-12-01")
    for i in range(n_series):
        length = draw(st.integers(REQUIRED, REQUIRED + 30))
        values = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=length, max_size=length))
        ts = pd.date_range(end=end, periods=length, freq="MS")
        frames.append(pd.DataFrame({"series_id": f"s{i}", "ts": ts, "value": values}))
    return pd.concat(frames, ignore_index=True)


@settings(max_examples=40, deadline=None)
@given(panels())
def test_valid_panels_pass_unchanged(panel: pd.DataFrame) -> None:
    report = validate(panel, CONFIG, input_window=WINDOW, as_of=panel["ts"].max())
    assert report.problems == [] and report.dropped == []
    pd.testing.assert_frame_equal(report.panel, panel)


def corrupt(panel: pd.DataFrame, check: str, position: int) -> tuple[pd.DataFrame, str, pd.Timestamp]:
    series = panel[panel["series_id"] == "s0"]
    index = series.index[1 + position % (len(series) - 2)]
    at = panel.loc[index, "ts"]
    panel = panel.copy()
    if check == "missing_target":
        panel.loc[index, "value"] = np.nan
    elif check == "missing_timestamps":
        panel = panel.drop(index)
    elif check == "duplicate_timestamps":
        panel = pd.concat([panel.loc[:index], panel.loc[[index]], panel.loc[index + 1:]], ignore_index=True)
    elif check == "unsorted":
        before = series.index[series.index.get_loc(index) - 1]
        panel.loc[[before, index]] = panel.loc[[index, before]].to_numpy()
        at = panel.loc[index, "ts"]
    elif check == "too_short":
        panel = panel[(panel["series_id"] != "s0") | (panel.index >= series.index[-REQUIRED + 1])]
        at = series["ts"].iloc[-1]
    return panel, check, at


@settings(max_examples=60, deadline=None)
@given(panels(), st.sampled_from(["missing_target", "missing_timestamps", "duplicate_timestamps",
                                   "unsorted", "too_short"]), st.integers(0, 1000))
def test_corrupted_panels_are_refused_naming_the_check(panel: pd.DataFrame, check: str, position: int) -> None:
    bad, check, at = corrupt(panel, check, position)
    with pytest.raises(ValidationFailed) as caught:
        validate(bad, CONFIG, input_window=WINDOW, as_of=panel["ts"].max())
    named = [(p.series_id, p.check) for p in caught.value.problems]
    assert ("s0", check) in named
    assert f"dataset 'sales', series 's0': {check}" in str(caught.value)


def test_error_names_an_example_timestamp() -> None:
    ts = pd.date_range("2018-01-01", periods=REQUIRED + 2, freq="MS")
    panel = pd.DataFrame({"series_id": "a", "ts": ts.delete(5), "value": 1.0})
    with pytest.raises(ValidationFailed, match=r"series 'a': missing_timestamps at 2018-06-01 00:00:00: 1 timestamp"):
        validate(panel, CONFIG, input_window=WINDOW, as_of=None)


def test_drop_policy_forecasts_the_others_and_lists_the_dropped() -> None:
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    good = pd.DataFrame({"series_id": "good", "ts": ts, "value": 1.0})
    bad = pd.DataFrame({"series_id": "bad", "ts": ts, "value": [np.nan] + [1.0] * (REQUIRED - 1)})
    config = tiny_config(validation={"policy": "drop"})
    report = validate(pd.concat([bad, good], ignore_index=True), config, input_window=WINDOW, as_of=None)
    assert report.dropped == ["bad"]
    assert set(report.panel["series_id"]) == {"good"}


def test_fill_policy_interpolates_gaps_and_nan() -> None:
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    values = np.arange(REQUIRED, dtype=float)
    panel = pd.DataFrame({"series_id": "a", "ts": ts, "value": values}).drop(index=4)
    panel.loc[7, "value"] = np.nan
    report = validate(panel, tiny_config(validation={"policy": "fill"}), input_window=WINDOW, as_of=None)
    assert report.filled == {"a": 2}
    assert len(report.panel) == REQUIRED
    np.testing.assert_allclose(report.panel["value"].to_numpy(), values)


def test_series_ending_before_as_of_is_named() -> None:
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    panel = pd.DataFrame({"series_id": "late", "ts": ts, "value": 1.0})
    with pytest.raises(ValidationFailed, match="series 'late': ends_before_as_of"):
        validate(panel, CONFIG, input_window=WINDOW, as_of=ts[-1] + pd.DateOffset(months=2))


def stopped_reporting(null_tail: int, null_head: int = 0) -> tuple[pd.DataFrame, pd.Timestamp]:
    """Series a, and b whose first `null_head` and last `null_tail` rows hold a NULL target:
    a source that keeps writing rows for a series it no longer measures; and the as_of."""
    ts = pd.date_range("2018-01-01", periods=REQUIRED + 10, freq="MS")
    values = np.arange(len(ts), dtype=float)
    b = values.copy()
    b[:null_head] = np.nan
    b[len(b) - null_tail:] = np.nan
    panel = pd.concat([pd.DataFrame({"series_id": "a", "ts": ts, "value": values}),
                       pd.DataFrame({"series_id": "b", "ts": ts, "value": b})], ignore_index=True)
    return panel, ts[-1]


@pytest.mark.parametrize("policy", ["refuse", "fill"])
def test_null_targets_after_the_last_value_do_not_extend_a_series(policy: str) -> None:
    """`fill` carried b's last value over its NULL tail: made-up actuals at the end, which the
    backtest scored against (naive's MASE 0 on b). Those rows add nothing: b ends where it
    would without them, before as_of, whatever the policy."""
    panel, as_of = stopped_reporting(null_tail=4)
    with pytest.raises(ValidationFailed, match=r"series 'b': ends_before_as_of at 2020-06-01 00:00:00"):
        validate(panel, tiny_config(validation={"policy": policy}), input_window=WINDOW, as_of=as_of)
    without_rows = panel[panel["value"].notna()]
    with pytest.raises(ValidationFailed, match=r"series 'b': ends_before_as_of at 2020-06-01 00:00:00"):
        validate(without_rows, tiny_config(validation={"policy": policy}), input_window=WINDOW, as_of=as_of)
    dropped = validate(panel, tiny_config(validation={"policy": "drop", "max_dropped_share": 1.0}),
                       input_window=WINDOW, as_of=as_of)
    assert dropped.dropped == ["b"]


def test_fill_starts_a_series_at_its_first_value_and_judges_its_length_from_there() -> None:
    """Leading NULL targets were back-filled with the first value: flat made-up history that
    lowered the series' MASE scale (in-sample naive errors of 0) and its scaler's spread."""
    panel, as_of = stopped_reporting(null_tail=0, null_head=5)
    report = validate(panel, tiny_config(validation={"policy": "fill"}), input_window=WINDOW, as_of=as_of)
    b = report.panel[report.panel["series_id"] == "b"]
    assert b["ts"].iloc[0] == pd.Timestamp("2018-06-01") and len(b) == REQUIRED + 5
    np.testing.assert_array_equal(b["value"].to_numpy(), np.arange(5.0, REQUIRED + 10))
    assert report.filled == {"b": 0}
    # the same rows, fewer of them real: now too short, judged on the target's span alone
    short, as_of = stopped_reporting(null_tail=0, null_head=11)
    with pytest.raises(ValidationFailed, match=rf"series 'b': too_short at 2020-10-01 00:00:00: {REQUIRED - 1} time "
                                               rf"steps, need at least {REQUIRED}"):
        validate(short, tiny_config(validation={"policy": "fill"}), input_window=WINDOW, as_of=as_of)


def _observed_by_definition(loaded: pd.DataFrame) -> pd.DataFrame:
    """Finite targets, one row per (series, ts); none where the source holds two different ones."""
    versions = loaded.groupby(["series_id", "ts"])["value"].transform(lambda v: v.nunique(dropna=False))
    real = loaded[np.isfinite(loaded["value"]) & (versions == 1).to_numpy()]
    return real.drop_duplicates(["series_id", "ts"], keep="last")


@pytest.mark.parametrize("policy", ["refuse", "drop", "fill"])
def test_observed_rows_are_the_real_source_rows_of_every_series(policy: str) -> None:
    """Dropped series included: their real values still meet the forecasts made for them
    before they were dropped (those used to get no accuracy row)."""
    from forecasting.validate import observed_rows

    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    clean = pd.concat([pd.DataFrame({"series_id": s, "ts": ts, "value": float(i)}) for i, s in enumerate("abc")],
                      ignore_index=True)
    loaded = clean.copy()
    if policy != "refuse":  # b has a NaN and a duplicate, c a gap
        loaded.loc[len(ts) + 3, "value"] = np.nan
        repeat = loaded.iloc[[len(ts) + 5]]  # `fill` repairs a row delivered twice; under drop, a second value
        loaded = pd.concat([loaded, repeat.assign(value=9.0) if policy == "drop" else repeat], ignore_index=True)
        loaded = loaded.drop(index=2 * len(ts) + 4)
    config = tiny_config(validation={"policy": policy, "max_dropped_share": 1.0})  # b and c both fail
    report = validate(loaded, config, input_window=WINDOW, as_of=None)
    observed = observed_rows(loaded, report)
    pd.testing.assert_frame_equal(observed, _observed_by_definition(loaded))
    if policy == "drop":
        assert set(report.dropped) == {"b", "c"} and set(observed["series_id"]) == {"a", "b", "c"}
        # b's two values at ts[5]: neither is an observation to record
        assert not ((observed["series_id"] == "b") & (observed["ts"] == ts[5])).any()
    if policy == "fill":
        assert ((observed["series_id"] == "b") & (observed["ts"] == ts[5])).sum() == 1
    if policy == "refuse":
        assert observed is loaded  # nothing to pick out: no copy


def test_checks_of_all_series_at_once_equal_series_by_series() -> None:
    from forecasting.validate import _series_problems, find_problems

    rng = np.random.default_rng(0)
    for freq in ("D", "MS", "W-MON", "h"):
        for trial in range(25):
            n, length = int(rng.integers(1, 6)), int(rng.integers(3, 30))
            ts = pd.date_range("2020-01-01", periods=length, freq=freq)
            panel = pd.DataFrame({"series_id": np.repeat([f"s{i}" for i in range(n)], length),
                                  "ts": np.tile(ts.values, n), "value": rng.normal(size=n * length),
                                  "price": rng.normal(size=n * length)})
            panel = panel[~((panel["series_id"] == "s1") & (panel.index % length < 2))]  # a later start
            at = panel.index[int(rng.integers(0, len(panel)))]
            kind = trial % 10
            if kind == 1:
                panel.loc[at, "value"] = np.nan
            elif kind == 6:
                panel.loc[at, "value"] = np.inf
            elif kind == 7:
                panel.loc[at, "price"] = np.nan
            elif kind == 8:
                panel.loc[panel["series_id"] == panel.loc[at, "series_id"], "price"] = -np.inf
            elif kind == 2:
                panel = panel.drop(index=at)
            elif kind == 3:
                panel = pd.concat([panel.loc[:at], panel.loc[[at]], panel.loc[at:].iloc[1:]], ignore_index=True)
            elif kind == 4:
                panel = panel.sample(frac=1.0, random_state=trial).reset_index(drop=True)
            elif kind == 5:
                panel.loc[at, "ts"] = panel.loc[at, "ts"] + pd.Timedelta(minutes=7)
            as_of = panel["ts"].max() if trial % 2 else None
            required = int(rng.integers(2, 30))
            offset = pd.tseries.frequencies.to_offset(freq)
            expected = [p for sid, group in panel.groupby("series_id", sort=True)
                        for p in _series_problems(sid, group, freq=freq, offset=offset,
                                                  required_length=required, as_of=as_of, covariates=("price",))]
            assert find_problems(panel, freq=freq, required_length=required, as_of=as_of,
                                 covariates=("price",)) == expected


def with_price(**changes: object):
    source = {"table": "sales", "id_column": "series_id", "time_column": "month", "target_column": "turnover",
              "covariates": ["price"]}
    return tiny_config(source=source, **changes)


def price_panel() -> pd.DataFrame:
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    return pd.concat([pd.DataFrame({"series_id": sid, "ts": ts, "value": np.arange(REQUIRED, dtype=float),
                                    "price": np.arange(REQUIRED, dtype=float) / 10})
                      for sid in ("a", "b")], ignore_index=True)


@pytest.mark.parametrize("policy", ["refuse", "fill"])
def test_infinite_values_are_refused_not_filled(policy: str) -> None:
    """An infinity is an upstream fault: it would make the MASE scale infinite and every
    prediction of a global network NaN, so not even `fill` lets it through."""
    panel = price_panel()
    panel.loc[3, "value"] = np.inf
    panel.loc[REQUIRED + 5, "price"] = -np.inf
    with pytest.raises(ValidationFailed) as caught:
        validate(panel, with_price(validation={"policy": policy}), input_window=WINDOW, as_of=None)
    message = str(caught.value)
    assert "series 'a': non_finite at 2018-04-01 00:00:00: 1 infinite target value(s)" in message
    assert "series 'b': non_finite at 2018-06-01 00:00:00: 1 infinite covariate 'price' value(s)" in message


def test_missing_covariate_is_named_filled_or_dropped() -> None:
    panel = price_panel()
    panel.loc[4, "price"] = np.nan
    with pytest.raises(ValidationFailed, match=r"series 'a': missing_covariate at 2018-05-01 00:00:00: "
                                               r"1 NaN/NULL covariate 'price' value"):
        validate(panel, with_price(), input_window=WINDOW, as_of=None)
    filled = validate(panel, with_price(validation={"policy": "fill"}), input_window=WINDOW, as_of=None)
    assert filled.filled == {"a": 1}
    np.testing.assert_allclose(filled.panel["price"].to_numpy(), price_panel()["price"].to_numpy())
    dropped = validate(panel, with_price(validation={"policy": "drop"}), input_window=WINDOW, as_of=None)
    assert dropped.dropped == ["a"] and set(dropped.panel["series_id"]) == {"b"}


@pytest.mark.parametrize("column", ["value", "price"])
def test_fill_refuses_a_series_with_no_values_to_fill_from(column: str) -> None:
    """Interpolation cannot fill a column that holds no value at all: it would pass NaN on."""
    panel = price_panel()
    panel.loc[panel["series_id"] == "b", column] = np.nan
    what = "target" if column == "value" else "covariate 'price'"
    with pytest.raises(ValidationFailed, match=rf"series 'b': no_values at 2018-01-01 00:00:00: all {REQUIRED} "
                                               rf"{what} value\(s\) are NaN/NULL"):
        validate(panel, with_price(validation={"policy": "fill"}), input_window=WINDOW, as_of=None)
    dropped = validate(panel, with_price(validation={"policy": "drop"}), input_window=WINDOW, as_of=None)
    assert dropped.dropped == ["b"]


def test_an_hour_a_daylight_saving_change_repeats_or_skips_is_named_as_such() -> None:
    """Hourly data on Berlin's wall clock repeat 02:00 on 2024-10-27 and skip it on 2024-03-31:
    the checks named the hour, not why, nor what to do."""
    def hourly(start: str, drop_or_repeat: str) -> pd.DataFrame:
        ts = pd.date_range(start, periods=24 * 20, freq="h")
        mark = pd.Timestamp(drop_or_repeat)
        ts = ts[ts != mark] if start.startswith("2024-03") else ts.append(pd.DatetimeIndex([mark])).sort_values()
        return pd.DataFrame({"series_id": "s", "ts": ts, "value": np.arange(len(ts), dtype=float)})

    cases = [("2024-03-25", "2024-03-31 02:00", "missing_timestamps", "skipped"),
             ("2024-10-21", "2024-10-27 02:00", "duplicate_timestamps", "repeated")]
    for start, hour, check, change in cases:
        panel = hourly(start, hour)
        for timezone, hinted in (("Europe/Berlin", True), ("UTC", False)):
            config = tiny_config(freq="h", season_length=24, horizon=6,
                                 source={**tiny_config().source.model_dump(), "timezone": timezone})
            with pytest.raises(ValidationFailed) as failed:
                validate(panel, config, input_window=48, as_of=panel["ts"].max())
            message = str(failed.value)
            assert f"{check} at {hour}:00" in message
            hint = f"{hour}:00 is {change} by a daylight-saving change in Europe/Berlin: keep sub-daily data"
            assert (hint in message) == hinted, message
            if check == "duplicate_timestamps":  # the hour's two readings differ: the same hint on that
                assert f"conflicting_duplicates at {hour}:00" in message
                assert message.count(hint) == (2 if hinted else 0), message
    # A day that starts at a clock change (Santiago, 2024-09-08 00:00) is still that day: no hint.
    days = pd.date_range("2024-06-01", periods=200, freq="D")
    daily = pd.DataFrame({"series_id": "s", "ts": days[days != pd.Timestamp("2024-09-08")], "value": 1.0})
    santiago = tiny_config(freq="D", season_length=7, source={**tiny_config().source.model_dump(),
                                                              "timezone": "America/Santiago"})
    with pytest.raises(ValidationFailed) as failed:
        validate(daily, santiago, input_window=14, as_of=daily["ts"].max())
    assert "missing_timestamps at 2024-09-08" in str(failed.value) and "daylight" not in str(failed.value)


def test_drop_fails_the_night_rather_than_train_on_a_remnant() -> None:
    """One series loaded early moved as_of; every other one then 'ended before as_of', was
    dropped, and a model trained on the one left took the champion alias."""
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    panel = pd.concat([pd.DataFrame({"series_id": s, "ts": ts, "value": float(i)}) for i, s in enumerate("abcd")],
                      ignore_index=True)
    early = pd.DataFrame({"series_id": ["a"], "ts": [ts[-1] + pd.offsets.MonthBegin()], "value": [9.0]})
    partial = pd.concat([panel, early], ignore_index=True)
    config = tiny_config(validation={"policy": "drop"})
    with pytest.raises(ValidationFailed, match=r"3 of 4 series failed, more than validation.max_dropped_share "
                                               r"\(0.5\) lets a night drop: not trained on the rest"):
        validate(partial, config, input_window=WINDOW, as_of=partial["ts"].max())
    late = partial[partial["series_id"] != "b"].pipe(lambda p: pd.concat(
        [p, pd.DataFrame({"series_id": ["b", "c", "d"], "ts": [early["ts"].iloc[0]] * 3, "value": [1.0] * 3}),
         panel[panel["series_id"] == "b"].iloc[:-3]], ignore_index=True))  # b alone is short of its last rows
    report = validate(late, config, input_window=WINDOW, as_of=late["ts"].max())
    assert report.dropped == ["b"]  # 1 of 4: within the share
    # at the share exactly: within it (29 of 100 at 0.29 read 29 > 28.999999999999996)
    many = pd.concat([pd.DataFrame({"series_id": f"s{i:03d}", "ts": ts, "value": 1.0}) for i in range(100)],
                     ignore_index=True)
    short = many[~(many["series_id"].isin([f"s{i:03d}" for i in range(29)]) & (many["ts"] > ts[5]))]
    at_share = tiny_config(validation={"policy": "drop", "max_dropped_share": 0.29})
    assert len(validate(short, at_share, input_window=WINDOW, as_of=ts[-1]).dropped) == 29
    everything = tiny_config(validation={"policy": "drop", "max_dropped_share": 1.0})
    with pytest.raises(ValidationFailed, match=r"failed validation \(\d+ problem\(s\)\): every series failed"):
        validate(short[short["series_id"] < "s029"], everything, input_window=WINDOW, as_of=ts[-1])


@pytest.mark.parametrize("policy", ["refuse", "drop", "fill"])
def test_several_series_without_an_id_column_are_refused_not_merged(policy: str) -> None:
    """Two stores in a source configured without `id_column`: `fill` kept the last row of each
    timestamp and made one series of both, and the night went on."""
    config = tiny_config(source={"table": "sales", "time_column": "month", "target_column": "turnover"},
                         validation={"policy": policy})
    ts = pd.date_range("2015-01-01", periods=60, freq="MS")
    both = pd.DataFrame({"series_id": "sales", "ts": np.concatenate([ts, ts]),
                         "value": np.concatenate([np.full(60, 10.0), np.full(60, 500.0)])})
    with pytest.raises(ValidationFailed, match=r"series 'sales': duplicate_timestamps at 2015-01-01 00:00:00: "
                                               r"120 rows for 60 timestamps: .* `source.id_column` is not set"):
        validate(both, config, input_window=WINDOW, as_of=ts[-1])
    # a few repeated deliveries of one series are still `fill`'s to repair
    repeated = pd.concat([both.iloc[:60], both.iloc[:3]], ignore_index=True)
    if policy == "fill":
        assert len(validate(repeated, config, input_window=WINDOW, as_of=ts[-1]).panel) == 60
    # Two stores whose years overlap in part: fewer than two rows a timestamp, so not refused as
    # several series; `fill` kept one of each overlapping month and merged them into one.
    later = pd.date_range("2017-01-01", periods=60, freq="MS")
    overlapping = pd.DataFrame({"series_id": "sales", "ts": np.concatenate([ts, later]),
                                "value": np.concatenate([np.full(60, 10.0), np.full(60, 500.0)])})
    with pytest.raises(ValidationFailed, match=r"series 'sales': conflicting_duplicates at 2017-01-01 00:00:00: "
                                               r"36 timestamp\(s\) appear more than once with different values "
                                               r"\(here: target 10, 500\); .* `source.id_column`"):
        validate(overlapping, config, input_window=WINDOW, as_of=later[-1])


@pytest.mark.parametrize("policy", ["refuse", "fill", "drop"])
def test_a_timestamp_held_with_two_values_is_for_no_policy_to_choose(policy: str) -> None:
    """The rows of one timestamp come in whatever order the database returns them: `fill`
    kept "the last", so two runs of one night could train on different values."""
    config = tiny_config(source={**tiny_config().source.model_dump(), "covariates": ["price"]},
                         validation={"policy": policy, "max_dropped_share": 1.0})
    ts = pd.date_range("2018-01-01", periods=REQUIRED, freq="MS")
    clean = pd.concat([pd.DataFrame({"series_id": s, "ts": ts, "value": np.arange(REQUIRED, dtype=float),
                                     "price": 1.0}) for s in ("a", "b")], ignore_index=True)
    twice = clean.iloc[[3]].assign(value=99.0)  # a: ts[3] also with 99, then also NULL
    null = clean.iloc[[3]].assign(value=np.nan)
    for order in ([clean, twice, null], [null, twice, clean], [twice, clean, null]):
        panel = pd.concat(order, ignore_index=True)
        if policy == "drop":
            report = validate(panel, config, input_window=WINDOW, as_of=ts[-1])
            assert report.dropped == ["a"] and set(report.panel["series_id"]) == {"b"}
            continue
        with pytest.raises(ValidationFailed) as failed:
            validate(panel, config, input_window=WINDOW, as_of=ts[-1])
        message = str(failed.value)  # the same whatever order the database returned the rows in
        assert ("series 'a': conflicting_duplicates at 2018-04-01 00:00:00: 1 timestamp(s) appear more than once "
                "with different values (here: target 3, 99, NULL); no policy chooses between them") in message
        assert "series 'a': duplicate_timestamps at 2018-04-01 00:00:00: 1 timestamp(s) appear" in message
    # A covariate that differs is as ambiguous; the same row twice is one observation.
    priced = pd.concat([clean, clean.iloc[[3]].assign(price=2.0)], ignore_index=True)
    exact = pd.concat([clean, clean.iloc[[3]]], ignore_index=True)
    if policy == "fill":
        with pytest.raises(ValidationFailed, match=r"series 'a': conflicting_duplicates at 2018-04-01 00:00:00: "
                                                   r"1 timestamp\(s\) .* \(here: 'price' 1, 2\)"):
            validate(priced, config, input_window=WINDOW, as_of=ts[-1])
        close = pd.concat([clean.assign(value=clean["value"] + 1234560.0),
                           clean.iloc[[3]].assign(value=1234564.0)], ignore_index=True)
        with pytest.raises(ValidationFailed, match=r"\(here: target 1234563, 1234564\)"):  # in full, not 1.23456e+06
            validate(close, config, input_window=WINDOW, as_of=ts[-1])
        report = validate(exact, config, input_window=WINDOW, as_of=ts[-1])
        pd.testing.assert_frame_equal(report.panel, clean)
        assert report.filled == {"a": 0}


def test_too_short_says_which_keys_make_the_length_it_needs() -> None:
    """"104 time steps, need at least 182 (input window + horizon x (backtest windows + 1))"
    left the user to find that the window was 3 x season_length by default, and under which key."""
    ts = pd.date_range("2019-01-01", periods=REQUIRED - 1, freq="MS")
    short = pd.DataFrame({"series_id": "a", "ts": ts, "value": np.arange(float(len(ts)))})
    with pytest.raises(ValidationFailed, match=rf"{REQUIRED - 1} time steps, need at least {REQUIRED} "
                                               r"\(training.input_window 12 \+ horizon 6 x \(backtest.windows 1 \+ 1\)\)"):
        validate(short, tiny_config(training={"input_window": 12}), input_window=WINDOW, as_of=ts[-1])
    default = pipeline.input_window(CONFIG)  # what the flow passes: 36 here
    ts = pd.date_range("2015-01-01", periods=default + 11, freq="MS")
    shorter = pd.DataFrame({"series_id": "a", "ts": ts, "value": np.arange(float(len(ts)))})
    with pytest.raises(ValidationFailed, match=rf"training.input_window {default} \(its default, 3 x season_length "
                                               r"or more\) \+ horizon 6"):
        validate(shorter, CONFIG, input_window=default, as_of=ts[-1])


def test_negative_targets_under_log_scaling_are_refused_before_any_training() -> None:
    """They failed as the first network trained, after the baselines' backtests, naming no
    dataset. Checked on the validated panel: a series the policy dropped is not trained on."""
    ts = pd.date_range("2015-01-01", periods=60, freq="MS")
    panel = pd.DataFrame({"series_id": "a", "ts": ts, "value": np.linspace(-5.0, 50.0, 60)})
    with pytest.raises(ValidationFailed, match=r"dataset 'sales'.*series 'a': negative_target at 2015-01-01 00:00:00: "
                                               r"6 negative target value\(s\), which `training.scaling` \('log'\)"):
        refuse_negatives_under_log_scaling(panel, tiny_config(training={"scaling": "log"}))
    refuse_negatives_under_log_scaling(panel, CONFIG)  # auto: standard scaling for it
    refuse_negatives_under_log_scaling(panel.assign(value=np.where(panel["value"] < 0, -np.inf, 1.0)),
                                       tiny_config(training={"scaling": "log"}))  # -inf: non_finite's, not this

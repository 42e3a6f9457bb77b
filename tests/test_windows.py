import numpy as np
import pandas as pd
import pytest
import torch

from tests.forecast_fixtures import make_panel
from forecasting.windows import (
    Scaler,
    build_features,
    calendar_features,
    check_panel,
    gather_windows,
    last_windows,
    season_position,
    window_starts,
    year_fraction,
    years_per_step,
)


def test_season_position_is_month_of_year_for_monthly_data():
    ts = pd.date_range("2021-03-01", periods=14, freq="MS")
    assert season_position(ts, freq="MS", season_length=12).tolist() == [(2 + i) % 12 for i in range(14)]
    daily = pd.date_range("2024-01-01", periods=8, freq="D")  # a Monday
    pos = season_position(daily, freq="D", season_length=7)
    assert pos[0] == pos[7] and len(set(pos[:7])) == 7


def test_calendar_features_are_unit_circle_float32():
    feats = calendar_features(np.arange(12), 12)
    assert feats.shape == (12, 2) and feats.dtype == np.float32
    np.testing.assert_allclose((feats**2).sum(axis=1), 1.0, rtol=1e-6)


def test_year_fraction_counts_from_new_year_in_each_years_own_length():
    ts = pd.to_datetime(["2021-01-01 00:00", "2021-07-02 12:00", "2021-12-31 00:00", "2024-12-31 00:00"])
    np.testing.assert_allclose(year_fraction(ts), [0.0, 182.5 / 365, 364 / 365, 365 / 366], rtol=1e-12)
    assert years_per_step("D") == pytest.approx(1 / 365.2425, rel=1e-3)
    assert years_per_step("h") == pytest.approx(1 / (365.2425 * 24), rel=1e-3)
    assert years_per_step("MS") == pytest.approx(1 / 12, rel=1e-3)
    assert years_per_step("W-MON") == pytest.approx(7 / 365.2425, rel=1e-3)


def test_annual_cycle_adds_the_years_sin_cos_before_the_covariates():
    panel = make_panel(2, 400, freq="D", start="2023-12-30").assign(temp=lambda f: f["value"] * 2)
    scaler = Scaler.fit(panel, covariates=["temp"])
    plain = build_features(panel, scaler, freq="D", season_length=7, covariates=["temp"])
    annual = build_features(panel, scaler, freq="D", season_length=7, covariates=["temp"], annual_cycle=True)
    assert plain.data.shape == (800, 4) and annual.data.shape == (800, 6)
    torch.testing.assert_close(annual.data[:, [0, 1, 2, 5]], plain.data)  # the rest where it was
    angle = 2 * np.pi * year_fraction(panel["ts"])
    np.testing.assert_allclose(annual.data[:, 3].numpy(), np.sin(angle), atol=1e-6)
    np.testing.assert_allclose(annual.data[:, 4].numpy(), np.cos(angle), atol=1e-6)
    assert annual.data[2, 3] == 0.0 and annual.data[2, 4] == 1.0  # 2024-01-01: the year's start


@pytest.mark.parametrize("scale_by", ["std", "seasonal_diff"])
def test_scaler_round_trip_and_log_only_for_non_negative(scale_by):
    panel = make_panel(2, 48)
    scaler = Scaler.fit(panel, scale_by=scale_by, season_length=12)
    assert scaler.log
    values = panel.loc[panel.series_id == "s1", "value"].to_numpy()
    np.testing.assert_allclose(scaler.unscale(scaler.scale(values, "s1"), "s1"), values, rtol=1e-10)
    restored = Scaler.from_dict(scaler.to_dict())
    assert restored == scaler
    negative = panel.assign(value=panel["value"] - 100)
    assert not Scaler.fit(negative).log
    with pytest.raises(ValueError, match=r"`scaling` \('log'\) needs values >= 0; series 's0'"):
        Scaler.fit(negative, scaling="log")


def test_windows_split_train_and_validation_and_gather_float32():
    panel = make_panel(3, 40)
    feats = build_features(panel, Scaler.fit(panel), freq="MS", season_length=12)
    assert feats.data.dtype == torch.float32 and feats.data.shape == (120, 3)  # value, sin, cos
    train, val = window_starts(feats, input_window=12, horizon=4, val_steps=4)
    # per series 40 - 16 + 1 = 25 windows: the last 4 validate; the 3 before them are left out
    # because their targets would overlap validation targets; the first 18 train
    assert len(train) == 3 * 18 and len(val) == 3 * 4
    assert set(train).isdisjoint(val)
    for series_start in (0, 40, 80):  # no training target reaches into a validation target
        mine_train = [s for s in train if series_start <= s < series_start + 40]
        mine_val = [s for s in val if series_start <= s < series_start + 40]
        last_train_target = max(mine_train) + 12 + 4 - 1
        first_val_target = min(mine_val) + 12
        assert last_train_target < first_val_target
    batch = gather_windows(feats.data, torch.as_tensor(val[:5]), 16)
    assert batch.shape == (5, 16, 3) and batch.dtype == torch.float32
    # validation windows end exactly at the end of each series
    ends = {int(s) + 16 for s in val}
    assert {40, 80, 120} <= ends and max(ends) == 120
    last = last_windows(feats, 12)
    assert last.shape == (3, 12, 3)
    torch.testing.assert_close(last[1], feats.data[80 - 12:80])


def test_check_panel_names_parameter_series_and_value():
    panel = make_panel(2, 30)
    bad = panel.copy()
    bad.loc[35, "value"] = np.nan
    with pytest.raises(ValueError, match=r"`value` of series 's1' is NaN at ts"):
        check_panel(bad)
    with pytest.raises(ValueError, match=r"series 's0' has 30 observations, fewer than `input_window \+ horizon` \(40\)"):
        check_panel(panel, min_length=40)
    with pytest.raises(ValueError, match=r"`panel` lacks columns \['price'\]"):
        check_panel(panel, covariates=["price"])


def _reference_features(panel, scaler, *, freq, season_length):
    """The definition, one series at a time."""
    rows, ids = [], []
    for sid, group in panel.groupby("series_id", sort=False):
        pos = season_position(group["ts"], freq=freq, season_length=season_length)
        rows.append(np.column_stack([scaler.scale(group["value"].to_numpy(np.float64), sid),
                                     calendar_features(pos, season_length)]))
        ids.append(sid)
    return np.concatenate(rows).astype(np.float32), ids


@pytest.mark.parametrize("scale_by", ["std", "seasonal_diff"])
def test_features_of_all_series_at_once_equal_series_by_series(scale_by, monkeypatch):
    import forecasting.windows as windows

    panel = pd.concat([make_panel(3, 40), make_panel(1, 10, seed=2).assign(series_id="short"),
                       make_panel(1, 30, seed=4).assign(series_id="flat", value=5.0)], ignore_index=True)
    shuffled = panel.sample(frac=1.0, random_state=1).sort_values("ts", kind="stable")  # series interleaved
    monkeypatch.setattr(windows, "CHUNK_ROWS", 7)  # many chunks, split inside series too
    for frame in (panel, shuffled):
        scaler = Scaler.fit(frame, scale_by=scale_by, season_length=12)
        for sid, group in frame.groupby("series_id", sort=False):  # the per-series definition
            z = np.log1p(group["value"].to_numpy())
            assert scaler.mean[sid] == pytest.approx(z.mean(), rel=1e-12)
            m = 12 if len(z) > 12 else 1
            diff = np.abs(z[m:] - z[:-m]).mean()
            size = max(1.0, abs(z.mean()))  # a flat series: a divisor tiny against its size
            std = z.std() if z.std() > windows.NO_SPREAD * size else windows.FLAT_DIVISOR * size
            want = diff if scale_by == "seasonal_diff" and diff > windows.NO_SPREAD * size else std
            assert scaler.std[sid] == pytest.approx(want, rel=1e-10)
        feats = build_features(frame, scaler, freq="MS", season_length=12)
        expected, ids = _reference_features(frame, scaler, freq="MS", season_length=12)
        assert feats.series_ids == ids
        assert feats.lengths.tolist() == frame.groupby("series_id", sort=False).size().tolist()
        np.testing.assert_allclose(feats.data.numpy(), expected, rtol=1e-6, atol=1e-6)
        assert feats.last_ts == [g["ts"].iloc[-1] for _, g in frame.groupby("series_id", sort=False)]


def test_feature_construction_makes_no_float64_copy_of_the_panel(monkeypatch):
    import tracemalloc

    import forecasting.windows as windows

    n_series, length = 200, 2000  # 400,000 rows: a float64 [rows, 3] copy alone is 9.6 MB
    rng = np.random.default_rng(0)
    panel = pd.DataFrame({"series_id": np.repeat([f"s{i}" for i in range(n_series)], length),
                          "ts": np.tile(pd.date_range("2015-01-01", periods=length, freq="D").values, n_series),
                          "value": rng.gamma(2.0, 10.0, n_series * length)})
    scaler = Scaler.fit(panel, scale_by="seasonal_diff", season_length=7)
    monkeypatch.setattr(windows, "CHUNK_ROWS", 1 << 16)
    tracemalloc.start()
    feats = build_features(panel, scaler, freq="D", season_length=7)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert feats.data.dtype == torch.float32 and feats.data.shape == (n_series * length, 3)
    rows = n_series * length
    # the float32 result, the series codes (8 bytes a row) and temporaries of one chunk
    assert peak < feats.data.nbytes + 8 * rows + 8 * 2**20, peak / 2**20
    # windows are gathered from it on demand: a batch is a view-sized gather, never all windows
    starts = torch.as_tensor([0, 5, 2000])
    batch = gather_windows(feats.data, starts, 35)
    assert batch.shape == (3, 35, 3) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[2], feats.data[2000:2035])


@pytest.mark.parametrize("freq", ["SMS", "SME", "2SMS"])
def test_semi_month_steps_take_consecutive_season_positions(freq):
    """Twice a month: each step its own position (both halves of a month took one before)."""
    from forecasting.windows import season_position

    ts = pd.date_range("2020-01-01", periods=30, freq=freq)
    position = season_position(ts, freq=freq, season_length=24)
    assert (np.diff(position) % 24 == 1).all()


@pytest.mark.parametrize(("freq", "start"), [
    ("WOM-1MON", "2023-01-02"), ("LWOM-FRI", "2023-01-27"), ("CBMS", "2023-01-02"), ("CBME", "2023-01-31"),
    ("C", "2023-01-02"), ("bh", "2023-01-02 09:00"), ("cbh", "2023-01-02 09:00"), ("2C", "2023-01-02"),
    ("MS", "2023-01-01"), ("W-SUN", "2023-01-01"), ("B", "2023-01-02"), ("h", "2023-01-01"), ("15min", "2023-01-01"),
])
def test_every_step_of_an_accepted_freq_takes_the_next_season_position(freq, start):
    """Offsets without a pandas Period (week of month, custom business days and months,
    business hours) were placed by days since 1970: positions at random, so the networks'
    season inputs were noise and the recursive strategy's one-step rotation did not hold."""
    from tests.flow_fixtures import tiny_config

    assert tiny_config(freq=freq).freq == freq  # one the config accepts
    for season in (5, 8, 12):
        ts = pd.date_range(start, periods=40, freq=freq)
        position = season_position(ts, freq=freq, season_length=season)
        assert (np.diff(position) % season == 1).all(), position.tolist()
        # the same timestamps in a later window (prediction) keep their positions
        later = season_position(ts[20:], freq=freq, season_length=season)
        assert later.tolist() == position[20:].tolist()
    assert season_position(pd.date_range("2023-01-01", periods=3, freq="MS").as_unit("us"), freq="MS",
                           season_length=12).tolist() == [0, 1, 2]

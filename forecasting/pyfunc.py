"""The pyfunc of every registered version: history panel in, the forecast table's rows out.

    mlflow.pyfunc.load_model("models:/sales-forecaster@champion").predict(history)
        # history: series_id, ts, value (+ the model's covariates), one row per series and step
        # -> series_id, step, ts, value, lower, upper: what the pipeline writes to `forecasts`

One interface whichever model holds the alias, baseline or network: the pipeline's own files
(forecaster.json, a network's weights.pt) and the interval calibration are the model's
artifacts, and this class forecasts with them as the pipeline does. Logged as code
(forecasting/pyfunc_model.py) with this package as the model's code: it loads where
`forecasting` is not installed. forecasting.tracking re-exports the class under its old name,
which versions registered before that (cloudpickled) were pickled by reference to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from forecasting import intervals
from forecasting.forecasters import Forecaster, load_forecaster
from forecasting.validate import ValidationFailed, find_problems
from forecasting.windows import SeriesTooShort

FORECASTER_ARTIFACT = "forecaster"  # the directory Forecaster.save writes
CALIBRATION_ARTIFACT = "calibration"  # CALIBRATION_FILE: the version's interval quantiles
CALIBRATION_FILE = "calibration.json"


def write_calibration(path: Path, *, dataset: str, quantiles: list[float], level: float) -> Path:
    """What the pyfunc needs beside the forecaster to give the pipeline's intervals."""
    path.write_text(json.dumps({"dataset": dataset, "quantiles": [float(q) for q in quantiles],
                                "level": float(level)}))
    return path


class HistoryRefused(MlflowException, ValueError):
    """A history the model will not forecast from. An MlflowException, so that a served model
    (`mlflow models serve`) answers 400 with this message; MLflow's server answered any other
    error with "Encountered an unexpected error while evaluating the model"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    """A registered version as a pyfunc: the forecaster is read from the model's `forecaster`
    artifact (our own JSON and state_dict files, never a pickle)."""

    @classmethod
    def of(cls, forecaster: Forecaster, calibration: dict[str, Any] | None) -> ForecasterPyfunc:
        """The model as MLflow will load it, from what is in memory (to infer its signature)."""
        model = cls()
        model.forecaster, model.calibration = forecaster, calibration
        return model

    def load_context(self, context: Any) -> None:
        self.forecaster: Forecaster = load_forecaster(Path(context.artifacts[FORECASTER_ARTIFACT]))
        calibration = context.artifacts.get(CALIBRATION_ARTIFACT)  # absent before 2026-12-07
        self.calibration = json.loads(Path(calibration).read_text()) if calibration else None

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        # The forecasters read each series' last row as its last time point (the pipeline's
        # panels are sorted): rows in another order gave a forecast from the wrong date, silently.
        ordered = model_input.sort_values(["series_id", "ts"], kind="stable", ignore_index=True)
        try:
            self._check(ordered)
            rows = self.forecaster.predict(ordered)
        except (ValidationFailed, SeriesTooShort) as exc:  # the caller's history, not the model
            raise HistoryRefused(str(exc)) from None
        if self.calibration is None:
            return rows
        return intervals.add_step_intervals(rows, ordered, self.calibration["quantiles"],
                                            season_length=self.forecaster.season_length)

    def _check(self, history: pd.DataFrame) -> None:
        """The pipeline's validation of the history a caller passes: a month-end date given to a
        month-start model, a gap or a NaN would otherwise give a forecast dated or scaled wrong."""
        f = self.forecaster
        # The covariates it reads: a baseline's version holds the dataset's but was never given
        # them (MLflow drops columns its signature lacks)
        problems = find_problems(history, freq=f.freq, required_length=1, covariates=f.covariates_read)
        if problems:
            dataset = (self.calibration or {}).get("dataset", "model input")
            raise ValidationFailed(dataset, problems, note=f"the history given to the {f.name!r} model")

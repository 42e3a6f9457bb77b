"""The pyfunc wrapper of a baseline champion: history panel in, forecast frame out.

Logged as code (forecasting/pyfunc_model.py); forecasting.tracking re-exports it under its old
name, which the versions registered before that (cloudpickled) were pickled by reference to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from forecasting.forecasters import load_forecaster


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    """A baseline champion as a small pyfunc: the forecaster is read from the model's
    `forecaster` artifact, our own JSON files."""

    def load_context(self, context: Any) -> None:
        self.forecaster = load_forecaster(Path(context.artifacts["forecaster"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        # The forecasters read each series' last row as its last time point (the pipeline's
        # panels are sorted): rows in another order gave a forecast from the wrong date, silently.
        ordered = model_input.sort_values(["series_id", "ts"], kind="stable", ignore_index=True)
        return self.forecaster.predict(ordered)

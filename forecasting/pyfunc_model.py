"""The pyfunc that MLflow logs for a baseline champion, as code ("models from code").

MLflow loads such a model by running this file (copied into the model's artifacts), never by
unpickling a Python object: nothing in the registry runs code other than this package's.
The forecaster itself is read from the model's `forecaster` artifact, our own JSON files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from forecasting.forecasters import load_forecaster


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    """A baseline champion as a small pyfunc: history panel in, forecast frame out."""

    def load_context(self, context: Any) -> None:
        self.forecaster = load_forecaster(Path(context.artifacts["forecaster"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        return self.forecaster.predict(model_input)


mlflow.models.set_model(ForecasterPyfunc())

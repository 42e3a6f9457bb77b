"""The model file MLflow logs for a baseline champion ("models from code").

MLflow loads such a model by running this file (copied into the model's artifacts), never by
unpickling a Python object: nothing in the registry runs code other than this package's.
"""

import mlflow

from forecasting.pyfunc import ForecasterPyfunc

mlflow.models.set_model(ForecasterPyfunc())

"""convnet-pipeline: the five DVC stages (download, preprocess, train, evaluate, report), the
CLI and the params; helpers live in the sub-packages core, data, engine, explain, commands."""

import os

# MLflow writes an installation id to the home folder and reports usage unless told not to, at
# `import mlflow`: off unless the user turns it on (MLFLOW_DISABLE_TELEMETRY=false).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

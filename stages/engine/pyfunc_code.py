"""The code MLflow runs to load a training's logged model ("models from code", MLflow's way
instead of pickling the Python object): the model is stages.engine.serving.ImageClassifier,
from the installed project. MLflow keeps a copy of this file in every logged model."""

import mlflow

from stages.engine.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())

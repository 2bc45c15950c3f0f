"""The training engine: device and precision, optimizers, schedules, losses, distributed
training, the training loop, building and loading models, batched inference.

Imports `stages.data` and `stages.core`, never a stage.
"""

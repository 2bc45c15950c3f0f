"""Tools around trained models that are not pipeline stages: predict, ensemble, submit, lr-find,
results.

Each is one command of the CLI; they import the engine, the data path and explain, never a
stage.
"""

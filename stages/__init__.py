"""convnet-pipeline: the five DVC stages (download, preprocess, train, evaluate, report), the
CLI and the params; helpers live in the sub-packages core, data, engine, explain, commands."""

"""Where each stage reads and writes, relative to the repository root (DVC runs stages there).

dvc.yaml names the same paths; keep the two in step.
"""

from pathlib import Path

OUT = Path("out")
INPUTS = OUT / "inputs.json"  # inputs: says download.data_dir exists (download depends on it)
RAW = OUT / "raw"  # download: raw files, untouched
FOLDER = "folder"  # dataset=folder: RAW/folder/<class>/* is the snapshot of your images
PROCESSED = OUT / "processed"  # preprocess: packed uint8 arrays, labels, classes, mean image
TRAIN = OUT / "train"  # train: checkpoint, per-epoch history, the train params it used
EVALUATE = OUT / "evaluate"  # evaluate: metrics.json, confusion matrix, per-class accuracy
PREDICTIONS = EVALUATE / "predictions.csv"  # evaluate: (actual, predicted) per image

CHECKPOINT = TRAIN / "model.pt"
HISTORY = TRAIN / "history.csv"
# train: what the run ran with (commit, lock, machine, resolved speed settings) and its time
RUN_INFO = TRAIN / "run.json"
REPORT = OUT / "report"  # report: saliency, filters, augmentation preview, confused pairs
LR_FIND = OUT / "lr_find"  # lr-find command: the range test's curve and suggested rate
LAST = TRAIN / "last.pt"  # every epoch: resume point (outside DVC's outs, survives a kill)
BEST = TRAIN / "best.pt"  # the epoch with the best validation top-1
# What a training could not write to its MLflow run (the store failing): one JSON per run,
# written there by `convnet log-pending` or the next training.
MLFLOW_PENDING = TRAIN / "mlflow-pending"
# While a training runs: its MLflow run's id. Left by a training killed outright, it names the run
# that the next training in this out/train ends KILLED.
OPEN_RUN = TRAIN / "mlflow-run-open"

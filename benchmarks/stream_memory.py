"""Training a set larger than its memory budget: streamed from disk against resident, one run each.

    python benchmarks/stream_memory.py [--images 20000] [--model resnet18] [--budget 0.05]

Fabricates processed Tiny-ImageNet-shaped data (--images 64x64 training images, 200 classes) in
a temporary folder and trains one epoch of --model twice, each in a child process
(`python -m stages train`): with train.memory_budget=auto (the set resident in memory) and with
--budget GiB, several times smaller than the set (streamed: each batch read from the .npy file
by a background thread). Prints each run's training images/s (from history.csv), the ratio, and
each child's peak resident memory (ru_maxrss, as `/usr/bin/time -v` reports it) beside the size
of the training set. The goal: streaming at >= 0.9x the resident speed, and its peak not holding
the set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's stages/
from stages.data.writer import save_image  # noqa: E402

GiB = 2**30


def fabricate(root: Path, n: int, classes: int = 200, size: int = 64) -> int:
    """out/processed/ as preprocess writes it; returns the training images' bytes."""
    out = root / "out" / "processed"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = np.lib.format.open_memmap(out / "train_images.npy", "w+", np.uint8, (n, size, size, 3))
    for start in range(0, n, 4096):  # written a block at a time: this process stays small too
        block = rng.integers(0, 256, (min(4096, n - start), size, size, 3), dtype=np.uint8)
        train[start : start + len(block)] = block
    train.flush()
    del train
    np.save(out / "train_labels.npy", np.arange(n) % classes)
    np.save(out / "val_images.npy", rng.integers(0, 256, (1000, size, size, 3), dtype=np.uint8))
    np.save(out / "val_labels.npy", np.arange(1000) % classes)
    np.save(out / "mean.npy", np.full((size, size, 3), 127.5, np.float32))
    save_image(np.full((size, size, 3), 127.5), out / "mean.png")
    (out / "classes.json").write_text(json.dumps([f"c{i}" for i in range(classes)]))
    info = {"dataset": "tiny-imagenet", "image_size": size, "num_classes": classes,
            "train_count": n, "val_count": 1000, "std": [74.0] * 3}  # fmt: skip
    (out / "info.json").write_text(json.dumps(info))
    return n * size * size * 3


def train(root: Path, model: str, budget: str) -> tuple[float, int]:
    """One epoch in a child process: (training images/s, the child's peak RSS in bytes)."""
    env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/m.db"}
    cmd = [sys.executable, "-m", "stages", "train", "-S", "dataset=tiny-imagenet",
           "-S", f"model={model}", "-S", "train.epochs=1", "-S", "train.crop_size=56",
           "-S", "train.batch_size=128", "-S", "train.resume=false", "-S", "train.device=cpu",
           "-S", f"train.memory_budget={budget}"]  # fmt: skip
    if model.startswith("resnet"):
        cmd += ["-S", "net.stem_stride=4"]
    child = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)}: exit {child.returncode}")
    with open(root / "out" / "train" / "history.csv", newline="") as f:
        rate = float(next(csv.DictReader(f))["images_per_second"])
    return rate, usage.ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--budget", type=float, default=0.05, help="GiB, for the streamed run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
        shutil.copytree(REPO / "conf", root / "conf")  # what -S model=... composes
        size = fabricate(root, args.images)
        start = time.perf_counter()
        streamed, streamed_peak = train(root, args.model, str(args.budget))
        resident, resident_peak = train(root, args.model, "auto")
        seconds = time.perf_counter() - start
    print(f"training set {size / GiB:.2f} GiB ({args.images:,} 64x64 images), {args.model},"
          f" one epoch each, {seconds:.0f} s in all")  # fmt: skip
    print(f"resident: {resident:,.0f} images/s, peak RSS {resident_peak / GiB:.2f} GiB")
    print(f"streamed (budget {args.budget} GiB, the set is {size / GiB / args.budget:.0f}x it):"
          f" {streamed:,.0f} images/s, peak RSS {streamed_peak / GiB:.2f} GiB")  # fmt: skip
    print(f"ratio streamed / resident: {streamed / resident:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()

"""preprocess's decoding workers: a run that succeeds prints no worker traceback, and Ctrl-C ends
with one line from the parent alone (the workers no longer inherit the CLI's signal handler)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def folder_set(root: Path, per_class: int) -> None:
    """data/images/<class>/*.png: two classes of small photos-like images."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = root / "data" / "images" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def stage(root: Path, name: str, **popen) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/m.db"}
    cmd = [sys.executable, "-m", "stages", name, "-S", "dataset=folder",
           "-S", "preprocess.workers=2", "-S", "preprocess.image_size=32"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)  # fmt: skip


@pytest.mark.slow
def test_a_successful_preprocess_prints_no_worker_traceback(tmp_path):
    folder_set(tmp_path, per_class=300)  # 600 files: 3 chunks, both workers busy
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")  # -S dataset=folder composes it
    assert stage(tmp_path, "download").wait(timeout=120) == 0
    for _ in range(3):  # it was one run in two, or more: the pool's end raced the workers
        out, err = stage(tmp_path, "preprocess").communicate(timeout=300)
        assert "Traceback" not in out + err and "Interrupted" not in out + err, err
        assert "preprocess: folder: 480 train + 120 val images of 32px, 2 classes" in out


@pytest.mark.slow
def test_ctrl_c_during_decoding_is_one_line_from_the_parent(tmp_path):
    folder_set(tmp_path, per_class=1500)  # long enough to be interrupted while decoding
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copytree(REPO / "conf", tmp_path / "conf")  # -S dataset=folder composes it
    assert stage(tmp_path, "download").wait(timeout=300) == 0
    # Its own process group, as a terminal's: Ctrl-C reaches the parent and every worker.
    child = stage(tmp_path, "preprocess", start_new_session=True)
    time.sleep(0.5)
    while not list((tmp_path / "out").glob(".processed.*.tmp/train_images.npy")):
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted by Ctrl-C (SIGINT)"], err
    assert not (tmp_path / "out" / "processed").exists()
    assert not list((tmp_path / "out").glob(".processed.*"))  # the temporary folder removed

"""Stages and tools run as a user runs them: in subprocesses, against a workspace's own store."""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from stages.params import compose, yaml_text

REPO = Path(__file__).resolve().parents[2]
# What training writes to history.csv (and MLflow) every epoch.
METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
# A migrated, empty MLflow store (see conftest.py): copied into a workspace, it spares each
# stage subprocess the few seconds MLflow takes to create a store's tables.
STORE_TEMPLATE: Path | None = None


def env(root: Path, uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of `python -m stages` in workspace `root`: this checkout's code, the
    workspace's store (or `uri`), no multi-process or DVC experiment settings of the caller."""
    e = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    e["MLFLOW_TRACKING_URI"] = uri or f"sqlite:///{root}/mlflow.db"
    for key in ("WORLD_SIZE", "DVC_ROOT", "DVC_EXP_NAME"):
        e.pop(key, None)
    return e


def with_store(root: Path) -> Path:
    """Put a migrated, empty MLflow store at root/mlflow.db; its path."""
    db = root / "mlflow.db"
    if STORE_TEMPLATE is not None and not db.exists():
        shutil.copyfile(STORE_TEMPLATE, db)
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(root: Path) -> list[dict]:
    """out/train/history.csv: per epoch, its number and METRICS."""
    with open(root / "out/train/history.csv", newline="") as f:
        return [{k: float(r[k]) for k in ("epoch", *METRICS)} for r in csv.DictReader(f)]


def sh(*cmd: str, cwd: Path, env: dict, timeout: int = 600, quiet: bool = False) -> str:
    """Run `cmd`; its stdout. `quiet`: it must also print no warning (DVC's, Python's)."""
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    if quiet:
        said = result.stdout + result.stderr
        assert "WARNING" not in said and "Warning:" not in said, f"{' '.join(cmd)}:\n{said}"
    return result.stdout


def clone(dest: Path) -> dict[str, str]:
    """A fresh git repository in `dest` holding this checkout's files (committed or not) with a
    reduced configuration (logreg, 2 epochs; reports of few pictures); the environment to run
    DVC in it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        # Outputs of stages run by hand in this checkout are not the repository's files.
        if (REPO / name).is_file() and not name.startswith("out/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    # Every experiment composes conf/: its report draws fewer pictures of fewer channels.
    config = dest / "conf/config.yaml"
    text = config.read_text()
    for key, small in (("num_images", 4), ("augment_images", 8), ("ascent_steps", 2),
                       ("max_channels", 4)):  # fmt: skip
        text, found = re.subn(rf"(?m)^(  {key}:) \d+", rf"\1 {small}", text)
        assert found == 1, key
    config.write_text(text)
    reduced = compose(dest / "conf", ["model=logreg", "train.epochs=2", "train.batch_size=256"])
    (dest / "params.yaml").write_text(yaml_text(reduced))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t")
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    sh("git", "init", "-q", "-b", "main", cwd=dest, env=env)
    sh("git", "add", "-A", cwd=dest, env=env)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=dest, env=env)
    return env

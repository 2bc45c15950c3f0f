"""What git tracks: sources and small documents, never a tracking store, a pipeline result or a
large file. MLflow stores and artifacts (models of tens of MB), stage outputs (DVC caches them)
and anything over 1 MB belong elsewhere; only the `cache: false` metrics files DVC compares
across experiments (the evaluation's metrics, what the training ran with) may be committed from
out/.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_STORES = ("mlruns", "mlflow.db", "mlartifacts")
COMMITTED_METRICS = {"out/evaluate/metrics.json", "out/train/run.json"}
MAX_BYTES = 1 << 20


def tracked(root: Path) -> list[str]:
    """The files git tracks in `root` (the index, so a file added but not committed counts)."""
    result = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True
    )
    return [name for name in result.stdout.split("\0") if name]


def stage_outputs(root: Path) -> list[str]:
    """Every path dvc.yaml's stages write (outs and metrics)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = [e for s in stages.values() for key in ("outs", "metrics") for e in s.get(key, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def strays(root: Path) -> list[str]:
    """Tracked files that must not be: MLflow stores, stage outputs, files over 1 MB."""
    outputs = stage_outputs(root)
    found = []
    for name in tracked(root):
        path = Path(name)
        if path.parts[0] in MLFLOW_STORES:
            found.append(f"{name}: an MLflow store; `git rm -r --cached {path.parts[0]}`")
        elif name not in COMMITTED_METRICS and any(
            path == Path(o) or Path(o) in path.parents for o in outputs
        ):
            found.append(f"{name}: a stage output (DVC caches it); `git rm --cached {name}`")
        elif (root / path).is_file() and (root / path).stat().st_size > MAX_BYTES:
            found.append(f"{name}: over 1 MB; version it with DVC (`dvc add`), not git")
    return found


pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)


def test_git_tracks_no_store_no_output_and_no_large_file():
    found = strays(ROOT)
    assert not found, "git tracks files it must not:\n" + "\n".join(found)


def test_the_check_finds_each_kind_of_stray(tmp_path):
    """In a scratch repository with this dvc.yaml: each kind is reported, the metrics are not."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    files = {
        "mlruns/0/meta.yaml": b"x",
        "mlflow.db": b"x",
        "mlartifacts/1/a/model.pt2": b"x",
        "out/processed/train_images.npy": b"x",
        "out/train/model.pt": b"x",
        "out/evaluate/metrics.json": b"{}",
        "out/train/run.json": b"{}",
        "docs/big.png": bytes(MAX_BYTES + 1),
        "docs/small.png": bytes(MAX_BYTES),
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-f", "."], cwd=tmp_path, check=True)
    reported = sorted(line.split(":")[0] for line in strays(tmp_path))
    assert reported == [
        "docs/big.png",
        "mlartifacts/1/a/model.pt2",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "out/processed/train_images.npy",
        "out/train/model.pt",
    ]

"""What a training ran with: the code's commit, the locked environment, the machine, the speed
settings `auto` resolved to. train writes it to out/train/run.json (a DVC metrics file, so `dvc
exp show` has a column for each, precision included) and tags its MLflow run with it; `convnet
record` copies it into a run's record."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

from stages.core import tracking
from stages.engine.device import BF16_FLAGS, Speed, cpu_flags, cpu_name

LOCK = Path("requirements.lock")  # the pinned environment, at the repository root
# The code a run executes: a change under these paths (uncommitted) makes the commit not the
# whole story, and the record says so.
CODE = ("stages", "nets", "dvc.yaml", "pyproject.toml", str(LOCK))
# The flags that decide the CPU's speed settings (BENCHMARKS.md): bf16 in hardware or not.
SPEED_FLAGS = ("avx2", "avx512f", *sorted(BF16_FLAGS))


def lock_sha256(path: Path = LOCK) -> str:
    """The lock file's SHA-256 ("" when the repository has none)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def code() -> dict[str, object]:
    """The commit (DVC's baseline when the workspace is no git checkout) and whether the code
    differed from it."""
    commit = tracking.git_commit() or os.environ.get("DVC_EXP_BASELINE_REV", "")
    changed = tracking.git("status", "--porcelain", "--", *CODE)  # "" without git
    return {"commit": commit, "code_changed": bool(changed)}


def machine(device: torch.device) -> dict[str, object]:
    """The device and, on a CPU, its model name, cores and speed-relevant flags."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    flags = cpu_flags()
    return {
        "device": device.type,
        "device_name": name,
        "cpu_flags": " ".join(f for f in SPEED_FLAGS if f in flags),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def describe(speed: Speed, world: int) -> dict[str, object]:
    """Everything above plus the resolved speed settings: one flat dict of plain values."""
    return {
        "precision": speed.precision,
        "memory_format": speed.memory_format,
        "compile": speed.compile,
        "processes": world,
        **code(),
        "lock_sha256": lock_sha256(),
        **machine(speed.device),
    }

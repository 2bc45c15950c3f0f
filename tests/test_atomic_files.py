"""Atomic writes leave nothing behind: the temporaries of a killed write (SIGKILL runs no
cleanup) are removed by the next write of the same result, never those of a write still
running in another process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stages.core import errors
from stages.core.files import atomic_dir, atomic_path

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="process ids are checked on POSIX")

KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from stages.core.files import atomic_dir, atomic_path
with atomic_{kind}(Path(sys.argv[1])) as tmp:
    if tmp.is_dir():
        (tmp / "train_images.npy").write_bytes(bytes(1000))
    else:
        tmp.write_bytes(bytes(1000))
    print(tmp.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_write(kind: str, target: Path) -> Path:
    """Run a write of `target` in a process that SIGKILLs itself half-way: its temporary."""
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE.format(kind=kind), str(target)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    left = target.parent / result.stdout.strip()
    assert left.exists()  # what a killed preprocess used to leave for good
    return left


@pytest.mark.parametrize("kind", ["dir", "path"])
def test_the_next_write_removes_what_a_killed_one_left(tmp_path, kind):
    target = tmp_path / "out" / ("processed" if kind == "dir" else "model.pt")
    left = killed_write(kind, target)
    writer = atomic_dir if kind == "dir" else atomic_path
    with writer(target) as tmp:
        assert not left.exists()  # removed before this write began
        (tmp / "a").write_text("x") if kind == "dir" else tmp.write_text("x")
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_temporaries_of_live_writers_and_of_other_results_are_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [
            out / f".processed.{sleeper.pid}.abc123.tmp",  # another command, running now
            out / f".processed.{os.getpid()}.def456.tmp",  # this process's own
            out / f".processed.5.{sleeper.pid}.x.tmp",  # a write of `processed.5`, not ours
            out / f".processed.{sleeper.pid + 10**6}.tmp",  # no random part: not our format
            out / f".raw.{sleeper.pid + 10**6}.abc.tmp",  # another result's
        ]
        for path in kept:
            path.mkdir()
        with atomic_dir(out / "processed") as tmp:
            (tmp / "a").write_text("x")
        assert all(path.exists() for path in kept)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process gone, the sleeper's temporary is a leftover now.
    with atomic_dir(out / "processed"):
        pass
    assert not kept[0].exists() and all(path.exists() for path in kept[1:])


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_ctrl_c_as_the_temporary_is_made_leaves_nothing(tmp_path, monkeypatch, kind):
    """A Ctrl-C that lands once the temporary exists but before the write knows its name (the
    signal handler runs between any two Python instructions) still removes it."""
    make = tempfile.mkstemp if kind == "file" else tempfile.mkdtemp

    def then_ctrl_c(**where):
        made = make(**where)
        errors.on_signal(signal.SIGINT, None)  # what the CLI's handler does as the signal lands
        return made

    monkeypatch.setattr(tempfile, make.__name__, then_ctrl_c)
    write = atomic_path if kind == "file" else atomic_dir
    with pytest.raises(errors.Interrupted), write(tmp_path / "history.csv"):
        pytest.fail("the write went on after Ctrl-C")
    assert list(tmp_path.iterdir()) == []

"""DVC sees every change to the data: in a temporary clone of this checkout, with real `dvc`.

A fresh clone (no data/) runs `dvc repro` without a word about data/ or data.dvc. With
`dataset=folder`, adding, editing or deleting an image or renaming a class folder makes `dvc
status` report download changed and `dvc repro` rerun download and preprocess; replacing an
archive or an extracted copy in data/ shows in `dvc status`; nothing changed, nothing reruns.
After `dvc add data`, a change is recorded in data.dvc by the next `dvc repro`. Only the first
two stages run (preprocess's output is all later stages read), on six 20 px images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def test_data_dvc_is_a_note_dvc_would_write_back_unchanged():
    """The shipped data.dvc records no version yet: any `outs` entry names data/, which a
    fresh clone lacks (no hash: `dvc exp run` warns and rewrites the file; a hash: `dvc status`
    lists it "not in cache" and `dvc checkout` fails). `dvc add data` fills it in, keeping the
    note; DVC rewrites the file on `dvc exp run`, so it must be exactly as DVC writes it."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    text = (ROOT / "data.dvc").read_text()
    assert set(yaml.safe_load(text)) == {"desc"}
    assert dumps_yaml(parse_yaml_for_update(text, "data.dvc")) == text


class Clone:
    """A git repository holding this checkout's files (committed or not), nothing of out/."""

    def __init__(self, dest: Path) -> None:
        self.root = dest
        self.versioned = False  # data.dvc records data/ (after `dvc add data`)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
        self.env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
        files = self.run("git", "ls-files", "-co", "--exclude-standard", cwd=ROOT).split("\n")
        for name in filter(None, files):
            if (ROOT / name).is_file() and not name.startswith(("out/", "data/")):
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
        self.run("git", "init", "-q", "-b", "main")
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", "pipeline")

    def run(self, *cmd: str, cwd: Path | None = None) -> str:
        """`cmd`'s stdout and stderr; it must succeed, and, until data/ is versioned, DVC say
        nothing about data.dvc."""
        result = subprocess.run(
            cmd, cwd=cwd or self.root, env=self.env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        said = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{said}"
        if cmd[0] == "dvc" and not self.versioned:
            assert "data.dvc" not in said, f"{' '.join(cmd)}:\n{said}"
        return said

    def quiet(self, *cmd: str) -> str:
        """Like run, and no warning or error at all."""
        said = self.run(*cmd)
        assert "WARNING" not in said and "ERROR" not in said, f"{' '.join(cmd)}:\n{said}"
        return said

    def changed(self) -> list[str]:
        """The stages up to preprocess that `dvc status` reports changed."""
        said = self.run("dvc", "status", "--with-deps", "preprocess")
        return [line[:-1] for line in said.splitlines() if line.endswith(":") and line[0] != "\t"]

    def repro(self) -> list[str]:
        """`dvc repro preprocess` (inputs, download, preprocess): the stages it redid, by
        running them or, for inputs seen before, by restoring their outputs (run cache)."""
        said = self.quiet("dvc", "repro", "preprocess")
        redone = ("Running stage", "is cached - skipping run")
        return [line.split("'")[1] for line in said.splitlines() if any(r in line for r in redone)]


def processed_images(root: Path) -> int:
    """How many images preprocess stored (train + validation)."""
    folder = root / "out/processed"
    return sum(len(np.load(folder / f"{split}_labels.npy")) for split in ("train", "val"))


def image(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (shade, 255 - shade, 0)).save(path)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    return Clone(tmp_path_factory.mktemp("clone"))


def test_inputs_makes_a_missing_or_empty_data_folder_and_leaves_yours_alone(tmp_path, monkeypatch):
    from stages.inputs import README, inputs
    from stages.params import load

    monkeypatch.chdir(tmp_path)
    p = load(ROOT / "params.yaml", [])
    assert inputs(p) == Path("data") and (tmp_path / "data/README.md").read_text() == README
    assert json.loads((tmp_path / "out/inputs.json").read_text()) == {"data_dir": "data"}
    (tmp_path / "data/README.md").unlink()  # an empty folder: DVC would warn about it
    inputs(p)
    assert (tmp_path / "data/README.md").is_file()
    (tmp_path / "data/README.md").unlink()
    image(tmp_path / "data/images/a/0.png", 0)
    inputs(p)
    assert sorted(f.name for f in (tmp_path / "data").iterdir()) == ["images"]


@pytest.mark.slow
@needs_git
def test_a_fresh_clone_runs_clean_and_every_data_change_reruns_download(clone):
    root = clone.root
    assert not (root / "data").exists()
    # A fresh clone: nothing about data/ or data.dvc, from any command.
    assert clone.run("dvc", "checkout", "data.dvc").strip() == ""
    clone.run("dvc", "status")
    assert clone.repro() == ["inputs", "download", "preprocess"]
    assert (root / "data/README.md").is_file()  # made by inputs, so download could list data/
    assert clone.changed() == []
    assert clone.repro() == []  # nothing changed: nothing reruns
    assert clone.run("git", "status", "--porcelain", "data.dvc") == ""  # not rewritten

    # Your own images: 2 classes of 3.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dataset"] = "folder"
    params["preprocess"] |= {"image_size": 16, "workers": 1, "val_fraction": 0.34}
    params["train"]["crop_size"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cls, shade in (("cats", 0), ("dogs", 200)):
        for i in range(3):
            image(root / f"data/images/{cls}/{i}.png", shade + 10 * i)
    # inputs depends on every param (it checks them all before DVC touches any output).
    assert clone.repro() == ["inputs", "download", "preprocess"]
    assert clone.repro() == []

    def after(change) -> list[str]:
        change()
        assert "download" in clone.changed()  # seen before anything runs
        return clone.repro()

    images, both = root / "data/images", ["download", "preprocess"]
    assert after(lambda: image(images / "cats/3.png", 50)) == both
    assert processed_images(root) == 7
    raw = root / "out/raw/folder/cats/3.png"
    assert after(lambda: image(images / "cats/3.png", 90)) == both
    assert Image.open(raw).getpixel((0, 0))[0] == 90  # the edited image, not the old copy
    assert after(lambda: (images / "cats/3.png").unlink()) == both  # as before: run cache
    assert processed_images(root) == 6 and not raw.exists()
    assert after(lambda: (images / "dogs").rename(images / "wolves")) == both
    classes = json.loads((root / "out/processed/classes.json").read_text())
    assert classes == ["cats", "wolves"]
    assert clone.repro() == []

    # An archive, and an extracted copy, dropped into data/ then replaced (the real datasets
    # read them; download reruns for any dataset, here with the same result).
    archive = root / "data/cifar-10-binary.tar.gz"
    extracted = root / "data/tiny-imagenet-200/wnids.txt"
    extracted.parent.mkdir()
    for path in (archive, extracted):
        for content in (b"first", b"replaced"):
            path.write_bytes(content)
            assert clone.changed() == ["download"]
            assert clone.repro() == ["download"]  # out/raw the same: preprocess not redone
    assert clone.changed() == []

    # Then data/ under DVC (`dvc add data`): a change is recorded in data.dvc and reruns download.
    clone.versioned = True
    clone.run("dvc", "add", "data")
    recorded = yaml.safe_load((root / "data.dvc").read_text())
    assert recorded["outs"][0]["path"] == "data" and recorded["desc"]  # the note is kept
    assert clone.changed() == []
    image(root / "data/images/cats/9.png", 70)
    assert sorted(clone.changed()) == ["data.dvc", "download"]
    clone.repro()
    assert yaml.safe_load((root / "data.dvc").read_text())["outs"] != recorded["outs"]
    assert clone.changed() == []

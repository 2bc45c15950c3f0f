"""Stage 0, inputs: make sure the data folder (`download.data_dir`, data/) exists.

download lists that folder as a DVC dependency, so any change under it (an image added,
edited or deleted, a class folder renamed, an archive or an extracted copy replaced) makes
`dvc status` report download changed and `dvc repro` rerun it and what follows. But DVC fails
a stage whose dependency does not exist, and a fresh clone has no data/: git keeps no empty
folder, and a file git tracked inside it would stop `dvc add data`. This stage, which download
depends on through its small output, creates the folder with a README saying what goes there
(a folder left empty would make DVC warn). It reruns when its output is missing (a fresh
clone, a queued experiment's workspace) or any param changes: dvc.yaml lists them all under it,
so that a bad value, which every command refuses, stops `dvc repro` and `dvc exp run` here,
before DVC removes the outputs of the stage the value is for.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stages.core import paths
from stages.core.errors import PipelineError
from stages.core.files import write_json
from stages.params import Params

README = """\
Your data, read by the download stage (params.yaml: download.data_dir):

- dataset=folder: your images in images/<class name>/*.jpg (or .png, .webp), one folder per
  class (download.folder names images/);
- real datasets (mnist, cifar10, tiny-imagenet, imagenet64): their official archives or the
  same extracted (tiny-imagenet-200/, cifar-10-batches-bin/, the four MNIST idx files,
  ImageNet 64x64's npz files), put here by hand; they are used before any network access.

Any change in here reruns download, and what follows, at the next `dvc repro`.
`dvc add data` versions this folder in data.dvc (then `git add data.dvc`), so queued
experiments and other clones (after `dvc pull`) see the same files.
"""


def _versioned(folder: Path) -> bool:
    """Whether a <folder>.dvc file beside it records a version of it (`dvc add` was run)."""
    dvc_file = folder.with_name(folder.name + ".dvc")
    try:
        return bool((yaml.safe_load(dvc_file.read_text()) or {}).get("outs"))
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def inputs(p: Params) -> Path:
    """Create `download.data_dir` (with a README) if it is missing; return it."""
    folder = Path(p.download.data_dir)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(
            f"download.data_dir {folder}: is a file, not a folder; move it away, or set"
            " download.data_dir to a folder"
        )
    if not folder.exists():
        if _versioned(folder):  # making an empty one would record it as the new version
            raise PipelineError(
                f"{folder}: missing, but {folder}.dvc versions it: run `dvc pull {folder}.dvc`"
                f" (or `dvc checkout {folder}.dvc` where the DVC cache holds it)"
            )
        if folder.is_absolute() or ".." in folder.parts:
            raise PipelineError(
                f"download.data_dir {folder}: not found; create it, or set download.data_dir"
                " to a folder that exists (only a folder inside the repository is made)"
            )
        folder.mkdir(parents=True)
    if not any(folder.iterdir()):
        (folder / "README.md").write_text(README)
    write_json(paths.INPUTS, {"data_dir": str(folder)})
    return folder

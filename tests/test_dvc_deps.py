"""dvc.yaml's code deps are exactly what each stage runs: every file its module imports,
however indirectly (tools/dvc_deps.py computes them and writes them into dvc.yaml), so editing a
file makes `dvc status` list exactly the stages that import it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from dvc_deps import Untraceable, closure, expected, stage_module  # noqa: E402

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DATA_DIR = PARAMS["download"]["data_dir"]  # the user's data folder: a data dep, not code


def resolve(path: str) -> str:
    """`path` with DVC's `${key.sub}` templates filled from params.yaml, as DVC fills them."""

    def value(match: re.Match) -> str:
        found = PARAMS
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)

    return re.sub(r"\$\{([\w.]+)\}", value, path)


def paths(entries: list) -> list[str]:
    """Paths of a deps/outs/metrics list (an entry is a path or {path: options})."""
    return [resolve(e if isinstance(e, str) else next(iter(e))) for e in entries or []]


def outputs() -> set[str]:
    return {p for s in PIPELINE.values() for key in ("outs", "metrics") for p in paths(s.get(key))}


@pytest.mark.parametrize("stage", PIPELINE)
def test_code_deps_are_exactly_the_files_the_stage_imports(stage):
    found, want = PIPELINE[stage]["deps"], expected(ROOT, PIPELINE[stage])
    assert found == want, (
        f"dvc.yaml: stage {stage}: deps differ from its imports (run `python tools/dvc_deps.py`)"
        f"\nmissing: {sorted(set(want) - set(found))}\nunused: {sorted(set(found) - set(want))}"
    )


def test_a_train_only_module_is_no_dep_of_download_or_preprocess():
    """Editing the augmentation (train's) leaves the data stages, and their gigabytes, alone."""
    for stage in ("download", "preprocess"):
        assert "stages/data/augment.py" not in PIPELINE[stage]["deps"]
        assert "stages/core/runlog.py" not in PIPELINE[stage]["deps"]
    assert "stages/data/augment.py" in PIPELINE["train"]["deps"]


def test_the_rewriter_restores_a_dep_taken_out(tmp_path):
    """tools/dvc_deps.py --check fails on a dvc.yaml missing a dep, and a rewrite restores it."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(ROOT / "nets", tmp_path / "nets")
    shutil.copytree(ROOT / "tools", tmp_path / "tools")
    text = (ROOT / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - stages/data/augment.py\n", "", 1))
    tool = [sys.executable, str(tmp_path / "tools/dvc_deps.py")]
    check = subprocess.run([*tool, "--check"], capture_output=True, text=True, check=False)
    assert check.returncode == 1 and "stage train" in check.stderr
    subprocess.run(tool, capture_output=True, text=True, check=True)
    assert (tmp_path / "dvc.yaml").read_text() == text


@pytest.mark.parametrize("stage", PIPELINE)
def test_no_stage_imports_another(stage):
    others = {stage_module(PIPELINE[s]["cmd"]) for s in PIPELINE if s != stage}
    mine = closure(ROOT, ROOT / stage_module(PIPELINE[stage]["cmd"]))
    found = sorted(str(f) for f in mine & others)
    assert not found, f"stage {stage} imports other stages: {found}"


def test_every_dep_exists_or_is_a_stage_output():
    """Or is the data folder, which the inputs stage creates (a fresh clone has none)."""
    missing = [
        f"{name}: {dep}"
        for name, stage in PIPELINE.items()
        for dep in paths(stage["deps"])
        if dep not in (*outputs(), DATA_DIR) and not (ROOT / dep).exists()
    ]
    assert not missing, "dvc.yaml deps that do not exist:\n" + "\n".join(missing)


def test_download_depends_on_the_data_folder_after_inputs_made_it():
    """Every change under data/ reruns download; `inputs` runs first, so the folder exists."""
    deps = PIPELINE["download"]["deps"]
    assert "${download.data_dir}" in deps  # follows -S download.data_dir=... too
    [made] = paths(PIPELINE["inputs"]["outs"])
    assert made in paths(deps)
    # Not cached: a queued experiment's new workspace has no copy, so inputs runs there too.
    assert PIPELINE["inputs"]["outs"] == [{made: {"cache": False}}]
    readers = [name for name, s in PIPELINE.items() if DATA_DIR in paths(s["deps"])]
    assert readers == ["download"]  # nothing downstream reads data/ again


def test_closure_follows_lazy_indirect_and_relative_imports(tmp_path):
    """The walker itself, on a small package: what it must find and what it must not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import helper\n",
        "pkg/sub/helper.py": "import json\n",
        "pkg/sub/unused.py": "",
        "pkg/typed.py": "",
        "pkg/lazy.py": "from pkg.deep.leaf import VALUE\n",
        "pkg/deep/__init__.py": "",
        "pkg/deep/leaf.py": "VALUE = 1\n",
        "other/__init__.py": "",
        "pkg/stage.py": (
            "from typing import TYPE_CHECKING\n"
            "from pkg.sub import helper\n"
            "if TYPE_CHECKING:\n"
            "    from pkg import typed\n"
            "def run():\n"
            "    import pkg.lazy\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "pkg/sub/table.tsv").write_text("a\tb\n")  # read by helper.py, which names it
    (tmp_path / "pkg/sub/helper.py").write_text("import json\nTABLE = 'table.tsv'\n")
    (tmp_path / "pkg/sub/notes.txt").write_text("named by nobody\n")
    found = {str(p) for p in closure(tmp_path, tmp_path / "pkg/stage.py")}
    assert found == set(files) - {"pkg/sub/unused.py", "other/__init__.py"} | {"pkg/sub/table.tsv"}


def test_a_module_named_in_an_import_module_call_is_followed_a_computed_one_refused(tmp_path):
    """import_module("pkg.plugin") is an import like any other; import_module("pkg." + name)
    could load any file, so the walker names the line instead of leaving dvc.yaml stale."""
    files = {
        "pkg/__init__.py": "",
        "pkg/plugin.py": "",
        "pkg/stage.py": "import importlib\nPLUGIN = importlib.import_module('pkg.plugin')\n",
        "pkg/late.py": "import importlib\n\n\ndef load(name):\n"
        "    return importlib.import_module('pkg.' + name)\n",
        "pkg/dunder.py": "def load(name):\n    return __import__(name)\n",
        "pkg/relative.py": "from importlib import import_module\nimport_module('.plugin', 'pkg')\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert {str(p) for p in closure(tmp_path, tmp_path / "pkg/stage.py")} == {
        "pkg/__init__.py", "pkg/plugin.py", "pkg/stage.py",
    }  # fmt: skip
    for module, line in (("late", 5), ("dunder", 2), ("relative", 2)):
        with pytest.raises(Untraceable, match=rf"^pkg/{module}\.py:{line}: "):
            closure(tmp_path, tmp_path / f"pkg/{module}.py")


def test_the_rewriter_refuses_a_computed_import_in_one_line_and_writes_nothing(tmp_path):
    for folder in ("stages", "nets", "tools"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    loop = tmp_path / "stages/engine/loop.py"
    call = "    return importlib.import_module('stages.' + name)"
    loop.write_text(f"{loop.read_text()}\n\ndef _late(name):\n{call}\n")
    line = loop.read_text().splitlines().index(call) + 1
    for args in ([], ["--check"]):
        tool = [sys.executable, str(tmp_path / "tools/dvc_deps.py"), *args]
        done = subprocess.run(tool, capture_output=True, text=True, check=False)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(f"error: stages/engine/loop.py:{line}: importlib.")
        assert len(done.stderr.splitlines()) == 1
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()


def test_closure_of_train_reaches_indirect_and_lazy_imports():
    files = closure(ROOT, ROOT / "stages/train.py")
    assert Path("stages/engine/schedules.py") in files  # through engine.loop, too
    assert Path("stages/core/__init__.py") in files  # a parent package
    assert Path("nets/vgg.py") in files  # nets/__init__.py imports every net


def test_dvcignore_keeps_bytecode_out_of_the_hashes():
    lines = (ROOT / ".dvcignore").read_text().splitlines()
    assert "__pycache__/" in lines and "*.pyc" in lines


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_bytecode_under_a_directory_dep_leaves_dvc_status_clean(tmp_path):
    """In a git+DVC repository with this .dvcignore and a stage depending on nets/, writing
    __pycache__/*.pyc under nets/ changes nothing; without the .dvcignore it would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def run(*cmd: str) -> str:
        result = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    dvc = (sys.executable, "-m", "dvc")
    shutil.copytree(ROOT / "nets", tmp_path / "nets", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", tmp_path)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python -c pass\n    deps:\n      - nets\n"
    )
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "repro", "-q")
    (tmp_path / "nets/__pycache__").mkdir()
    (tmp_path / "nets/__pycache__/vgg.cpython-311.pyc").write_bytes(b"\0bytecode")
    (tmp_path / "nets/stray.pyc").write_bytes(b"\0bytecode")
    assert "up to date" in run(*dvc, "status"), "bytecode under nets/ made the stage stale"
    (tmp_path / ".dvcignore").unlink()  # the check can fail: without it, nets/ is modified
    assert "modified" in run(*dvc, "status")

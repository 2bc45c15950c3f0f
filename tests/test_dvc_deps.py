"""dvc.yaml's code deps are complete: every file a stage's module imports, however indirectly,
lies under one of that stage's deps, so editing it makes `dvc status` list the stage.

The imports are read with `ast`, every `import` and `from ... import` at any depth (inside
functions and `if TYPE_CHECKING:` blocks too): a lazy import still runs when its branch does.
Importing `stages.core.paths` executes `stages/__init__.py` and `stages/core/__init__.py`
first, so each parent package's `__init__.py` counts as imported. The walk starts at the stage
module that `python -m stages <name>` calls; `stages/__main__.py` and `stages/cli.py` only
dispatch to it and are not part of any stage's deps.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DATA_DIR = PARAMS["download"]["data_dir"]  # the user's data folder: a data dep, not code


def module_file(root: Path, module: str) -> Path | None:
    """The file of `module` in `root` (a module or a package's __init__.py), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imported_names(root: Path, path: Path) -> set[str]:
    """Every module name `path` may import; `from x import y` gives x and x.y (y may be a
    module or a name in x: module_file tells them apart)."""
    own = module_name(root, path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..core import y`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*parts, node.module] if node.module else parts)
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def closure(root: Path, start: Path) -> set[Path]:
    """`start` and every file of `root` it imports, transitively, parent packages included."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(root, path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c runs a/__init__.py, a/b/__init__.py
                found = module_file(root, ".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return {p.relative_to(root) for p in seen}


def stage_module(name: str) -> Path:
    cmd = shlex.split(PIPELINE[name]["cmd"])
    assert cmd[:3] == ["python", "-m", "stages"] and len(cmd) == 4, (
        f"{name}: cmd {PIPELINE[name]['cmd']!r} is not `python -m stages <stage>`"
    )
    return Path("stages") / f"{cmd[3]}.py"


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


def covers(dep: str, file: Path) -> bool:
    return Path(dep) == file or Path(dep) in file.parents


@pytest.mark.parametrize("stage", PIPELINE)
def test_deps_cover_every_file_the_stage_imports(stage):
    deps = paths(PIPELINE[stage]["deps"])
    module = stage_module(stage)
    assert (ROOT / module).is_file(), f"{stage}: {module} does not exist"
    missing = sorted(
        str(f) for f in closure(ROOT, ROOT / module) if not any(covers(d, f) for d in deps)
    )
    assert not missing, f"dvc.yaml: stage {stage} imports files none of its deps cover:\n" + (
        "\n".join(missing)
    )


@pytest.mark.parametrize("stage", PIPELINE)
def test_no_code_dep_is_unused(stage):
    """A code dep that covers nothing the stage imports only reruns it for nothing."""
    files = closure(ROOT, ROOT / stage_module(stage))
    code = [d for d in paths(PIPELINE[stage]["deps"]) if d not in (*outputs(), DATA_DIR)]
    unused = [d for d in code if not any(covers(d, f) for f in files)]
    assert not unused, f"dvc.yaml: stage {stage} lists deps it does not import: {unused}"


@pytest.mark.parametrize("stage", PIPELINE)
def test_no_stage_imports_another(stage):
    others = {stage_module(s) for s in PIPELINE if s != stage}
    found = sorted(str(f) for f in closure(ROOT, ROOT / stage_module(stage)) & others)
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
    found = {str(p) for p in closure(tmp_path, tmp_path / "pkg/stage.py")}
    assert found == set(files) - {"pkg/sub/unused.py", "other/__init__.py"}


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

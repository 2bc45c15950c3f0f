"""dvc.yaml's code deps, one file each, from what every stage imports.

    python tools/dvc_deps.py           # rewrite the code deps of every stage in dvc.yaml
    python tools/dvc_deps.py --check   # exit 1 naming each stage whose deps differ

A stage's code is the module `python -m stages <name>` runs and every file of this repository
it imports, however indirectly: every `import` and `from ... import` at any depth (inside
functions and `if TYPE_CHECKING:` blocks too: a lazy import still runs when its branch does),
each parent package's `__init__.py` (importing `stages.core.paths` runs `stages/__init__.py`
first), a module loaded by `importlib.import_module("a.b")` or `__import__("a.b")` with the
name written out, and the data files a module reads from its own folder (named in its text). So
editing a file reruns exactly the stages that run it. A module loaded by a name computed when
the code runs cannot be followed: such a call is an error naming its file and line, and the
fix is to import the modules it may load by name (a registry table, as nets/__init__.py and
stages/data/sources/__init__.py have); it reads the source, so code run through exec, runpy
or another name for these functions stays unseen. `stages/__main__.py` and `stages/cli.py` only
dispatch to the stage and are no stage's code. The other deps (the stage's inputs) are kept.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
CODE = ("stages", "nets")  # the folders that hold code a stage may run
IMPORTERS = ("import_module", "__import__")  # functions that import the module they are named


class Untraceable(Exception):
    """An import whose module is computed when the code runs: no file can be named for it."""


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
        elif isinstance(node, ast.Call) and _called(node.func) in IMPORTERS:
            arg = node.args[0] if node.args else None
            name = arg.value if isinstance(arg, ast.Constant) else None
            if not isinstance(name, str) or name.startswith("."):
                raise Untraceable(
                    f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}() of a"
                    " name computed at run time, or relative: dvc.yaml cannot name the file it"
                    " loads; import the modules it may load, by their full names"
                )
            names.add(name)
    return names


def _called(func: ast.expr) -> str | None:
    """The name a call calls: `f` for `f(...)` and `m.f(...)`."""
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def closure(root: Path, start: Path) -> set[Path]:
    """`start` and every file of `root` it imports, transitively, parent packages included,
    and the data files beside them that they name; paths relative to `root`."""
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
    data = {
        f
        for py in seen
        for f in py.parent.iterdir()
        if f.is_file() and f.suffix not in (".py", ".pyc") and f.name in py.read_text()
    }
    return {p.relative_to(root) for p in seen | data}


def stage_module(cmd: str) -> Path:
    """stages/<name>.py for `python -m stages <name>`."""
    words = shlex.split(cmd)
    if words[:3] != ["python", "-m", "stages"] or len(words) != 4:
        raise ValueError(f"cmd {cmd!r} is not `python -m stages <stage>`")
    return Path("stages") / f"{words[3]}.py"


def is_code(dep: str) -> bool:
    return Path(dep).parts[0] in CODE


def expected(root: Path, stage: dict) -> list[str]:
    """The stage's deps as they should be: its other deps first, then its code, sorted."""
    others = [d for d in stage["deps"] if not (isinstance(d, str) and is_code(d))]
    code = sorted(str(f) for f in closure(root, root / stage_module(stage["cmd"])))
    return others + code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 if they differ")
    args = ap.parse_args()
    yaml = YAML()  # round trip: dvc.yaml's comments and layout stay
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 100
    path = ROOT / "dvc.yaml"
    pipeline = yaml.load(path)
    stale = []
    for name, stage in pipeline["stages"].items():
        try:
            want = expected(ROOT, stage)
        except Untraceable as err:  # nothing is written
            print(f"error: {err}", file=sys.stderr)
            return 1
        if list(stage["deps"]) != want:
            stale.append(name)
            stage["deps"][:] = want
    if args.check:
        for name in stale:
            print(f"dvc.yaml: stage {name}: code deps differ from its imports", file=sys.stderr)
        if stale:
            print("run `python tools/dvc_deps.py` to rewrite them", file=sys.stderr)
        return 1 if stale else 0
    if stale:
        with path.open("w") as f:
            yaml.dump(pipeline, f)
    print(f"dvc.yaml: {', '.join(stale) or 'no stage'} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The package layout: imports point one way, and no stage imports another.

cli -> stages and commands -> engine / explain -> data -> core -> nets. Imports made only for
type hints (under `if TYPE_CHECKING:`) run nothing and are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("inputs", "download", "preprocess", "train", "evaluate", "report")


def layer(module: str) -> tuple[float, str]:
    """(rank, group) of a module of this repository: it may import lower ranks only, and
    modules of its own group (except a stage, which imports no other stage)."""
    parts = module.split(".")
    if parts[0] == "nets":
        return 0, "nets"
    sub = parts[1] if len(parts) > 1 else ""
    ranks = {"core": 1, "data": 2, "engine": 3, "explain": 3, "commands": 4}
    if sub in ranks:
        return ranks[sub], sub
    if sub in STAGES:
        return 4, module  # each stage is a group of its own
    if sub == "params":
        return 3.5, "params"  # config: read by stages and commands, built from the registry
    return 5, sub  # cli, __main__, the package itself


def runtime_imports(path: Path) -> set[str]:
    """Modules `path` imports when it runs (type-checking-only imports left out)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                base = REPO / full.replace(".", "/")  # a module, or a package
                is_module = base.with_suffix(".py").exists() or (base / "__init__.py").exists()
                found.add(full if is_module else node.module)
    return {m for m in found if m.split(".")[0] in ("stages", "nets")}


def modules() -> dict[str, Path]:
    files = sorted((REPO / "stages").rglob("*.py")) + sorted((REPO / "nets").rglob("*.py"))
    out = {}
    for f in files:
        rel = f.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = f
    return out


def test_imports_point_one_way_and_no_stage_imports_another():
    wrong = []
    for name, path in modules().items():
        rank, group = layer(name)
        for target in runtime_imports(path):
            t_rank, t_group = layer(target)
            if t_group == group:
                continue
            if t_rank >= rank and not (name.startswith("stages.cli") or name == "stages.__main__"):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_stages_holds_only_the_five_stages_the_cli_and_params():
    top = {f.stem for f in (REPO / "stages").glob("*.py")}
    assert top == {*STAGES, "cli", "__init__", "__main__"}
    subpackages = {d.name for d in (REPO / "stages").iterdir() if (d / "__init__.py").exists()}
    assert subpackages == {"core", "data", "engine", "explain", "commands", "params"}
    # One level deep, but for the dataset sources: one module per dataset, under data/.
    nested = {
        f"{sub}/{d.name}"
        for sub in subpackages
        for d in (REPO / "stages" / sub).iterdir()
        if (d / "__init__.py").exists()
    }
    assert nested == {"data/sources"}


def test_no_import_circle():
    """No two modules import each other, directly or not, type-hint imports included (a
    circle makes every change to one a change to the other, for DVC and for a reader). A
    package's __init__ importing its own modules, which register with it, is the one shape
    allowed (the model registry)."""
    graph = {name: set() for name in modules()}
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                continue
            graph[name] |= {t for t in targets if t in graph and t != name}
        if path.name == "__init__.py":  # the registry idiom: not an edge of a circle
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    circles = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not circles, "import circles:\n" + "\n".join(circles)

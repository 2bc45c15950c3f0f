"""The installed environment is the locked one (requirements.lock), and the lock is complete.

- every package pinned in requirements.lock that is installed has the locked version;
- every dependency that pyproject.toml declares is pinned in the lock, at a version it allows;
- every third-party module that stages/, nets/ and tools/ import is declared in pyproject.toml
  (not left to arrive through another package, such as dvc or mlflow).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
CODE_DIRS = ("stages", "nets", "tools")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
REINSTALL = 'reinstall from the lock: pip install -r requirements.lock -e ".[dev]"'


def normalise(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line.strip()):
            pins[normalise(match[1])] = match[2]
    return pins


def regenerate_command() -> str:
    """The pip-compile command written at the top of requirements.lock."""
    for line in LOCK.read_text().splitlines():
        if not line.startswith("#"):
            break
        if (command := line.lstrip("#").strip()).startswith("pip-compile "):
            return command
    return "the pip-compile command at the top of requirements.lock"


def regenerate() -> str:
    return f"regenerate the lock (pip-tools, in the repository root): {regenerate_command()}"


def declared() -> dict[str, Requirement]:
    """pyproject.toml's dependencies and its extras' (the lock is compiled with the dev extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {normalise(r.name): r for r in map(Requirement, reqs)}


def imported_modules() -> dict[str, set[str]]:
    """Top-level names of the absolute imports in stages/, nets/ and tools/ -> importing files."""
    local = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    local |= set(CODE_DIRS)
    found: dict[str, set[str]] = {}
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            siblings = {p.stem for p in path.parent.iterdir() if p.suffix == ".py" or p.is_dir()}
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    module = name.split(".")[0]
                    if module in sys.stdlib_module_names or module in local | siblings:
                        continue
                    found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


def test_lock_exists_and_pins_torch_with_torchvision():
    pins = lock_pins()
    assert pins, f"requirements.lock has no name==version pins: {regenerate()}"
    for name in ("torch", "torchvision"):
        assert name in pins, f"{name} is not pinned in requirements.lock: {regenerate()}"
    assert not any(line.lstrip().startswith("-e") for line in LOCK.read_text().splitlines()), (
        "requirements.lock installs the project itself (-e): the README installs it beside the "
        f"lock (pip install -r requirements.lock -e .); {regenerate()}"
    )


def test_installed_versions_match_the_lock():
    wrong = []
    for name, locked in sorted(lock_pins().items()):
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue
        try:
            # pip's own test for `name==locked` (a local build such as +cpu satisfies it too).
            matches = Version(installed) in SpecifierSet(f"=={locked}")
        except InvalidVersion:
            matches = installed == locked
        if not matches:
            wrong.append(f"{name}: installed {installed}, locked {locked}")
    assert not wrong, (
        f"{len(wrong)} installed package(s) differ from requirements.lock:\n  "
        + "\n  ".join(wrong)
        + f"\nFix: {REINSTALL}; or, if pyproject.toml's dependencies changed on purpose, "
        + regenerate()
    )


def test_declared_dependencies_are_in_the_lock():
    pins = lock_pins()
    problems = []
    for name, req in sorted(declared().items()):
        if name not in pins:
            problems.append(f"{req.name} (declared as {str(req)!r}) has no pin in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} in the lock is outside {str(req)!r}")
    assert not problems, (
        "requirements.lock is older than pyproject.toml:\n  "
        + "\n  ".join(problems)
        + f"\nFix: {regenerate()}"
    )


def test_imported_packages_are_declared():
    distributions = md.packages_distributions()
    deps = declared()
    undeclared = []
    for module, files in sorted(imported_modules().items()):
        providers = distributions.get(module, [])
        if not any(normalise(d) in deps for d in providers):
            where = ", ".join(sorted(files)[:3])
            by = ", ".join(sorted(set(providers))) or "no installed package"
            undeclared.append(f"module {module!r} (from {by}), imported in {where}")
    assert not undeclared, (
        "stages/, nets/ or tools/ import packages that pyproject.toml does not declare:\n  "
        + "\n  ".join(undeclared)
        + "\nFix: add each package to [project].dependencies in pyproject.toml, then "
        + regenerate()
        + f", then {REINSTALL}"
    )

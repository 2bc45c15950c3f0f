"""Print a recipe from presets/recipes.yaml as `-S key=value` arguments for `dvc exp run`.

A finished `dvc exp run` leaves its parameters in the workspace's params.yaml, and the next
`dvc exp run` starts from them: a recipe run after another would inherit the keys it does not
set (a schedule, label smoothing, colour jitter). So every key any recipe sets is printed, the
recipe's value or else the committed params.yaml's, and a recipe gives the same run whatever ran
before it. Keys no recipe touches (a change of your own) are left as they are.
"""

import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
RECIPES = yaml.safe_load((HERE / "recipes.yaml").read_text())


def committed_params() -> dict:
    """params.yaml as last committed; the workspace's copy outside a git checkout."""
    show = ["git", "show", "HEAD:params.yaml"]
    done = subprocess.run(show, cwd=HERE.parent, capture_output=True, text=True, check=False)
    return yaml.safe_load(
        done.stdout if done.returncode == 0 else (HERE.parent / "params.yaml").read_text()
    )


def lookup(params: dict, key: str) -> object:
    for part in key.split("."):
        params = params[part]
    return params


def args(name: str) -> list[str]:
    """["-S", "model=vgg16", ...] for recipe `name`, the keys it leaves at the committed value."""
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    recipe, base = RECIPES[name], committed_params()
    others = sorted({key for r in RECIPES.values() for key in r} - recipe.keys())
    values = recipe | {key: lookup(base, key) for key in others}
    text = {key: "null" if v is None else str(v).lower() if isinstance(v, bool) else v
            for key, v in values.items()}  # fmt: skip
    return [part for key, value in text.items() for part in ("-S", f"{key}={value}")]


if __name__ == "__main__":
    print(" ".join(args(sys.argv[1])))

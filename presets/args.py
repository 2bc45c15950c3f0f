"""Print a recipe from presets/recipes.yaml as `-S key=value` arguments for `dvc exp run`."""

import sys
from pathlib import Path

import yaml

RECIPES = yaml.safe_load((Path(__file__).parent / "recipes.yaml").read_text())


def args(name: str) -> list[str]:
    """["-S", "model=vgg16", ...] for recipe `name`."""
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return [part for key, value in RECIPES[name].items() for part in ("-S", f"{key}={value}")]


if __name__ == "__main__":
    print(" ".join(args(sys.argv[1])))

"""Every seed recipe in presets/recipes.yaml is a valid params.yaml override set."""

import sys
from pathlib import Path

import pytest
import yaml

from stages import params
from stages.datasets import DATASETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "presets"))
from args import RECIPES, args  # noqa: E402


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_validates(name):
    pairs = [a for a in args(name) if a != "-S"]
    # Datasets land with their own issues; a recipe whose dataset is not here yet is checked
    # on digits with the crop it would need.
    if RECIPES[name].get("dataset") not in DATASETS:
        pairs = [p for p in pairs if not p.startswith(("dataset=", "train.crop_size="))]
    p = params.load("params.yaml", pairs)
    assert p.model == RECIPES[name]["model"]
    assert yaml.safe_load(Path("params.yaml").read_text())  # untouched

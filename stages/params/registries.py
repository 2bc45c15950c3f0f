"""What params.yaml's schema cannot know, asked of the registries: the dataset and the model
exist, the crop fits the dataset's images and the model, `net` holds exactly the model's
options, `train.init: pretrained` has weights to load.

The CLI hands `check` to `load` and `validate`; nothing else in stages.params imports this
module. A stage's code (its deps in dvc.yaml) is every module it imports, and the model
registry is every net: imported from the params that all stages read, editing a net would
rerun download and preprocess too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.params.schema import Params


def check(p: Params) -> None:
    """ParamsError naming the first key the dataset sources or the model registry refuse."""
    # Imported here: the model registry imports torch, which a bad value need not wait for.
    from stages.data.sources import check_params
    from stages.engine.model import check_model_params

    check_params(p)
    check_model_params(p)

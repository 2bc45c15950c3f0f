"""The run's values: params.yaml, composed from conf/ by Hydra, read once and validated here.

schema.py says what params.yaml must hold (one pydantic model per section); compose.py makes
params.yaml from conf/, applies `-S` overrides and reads it as DVC does; registries.py asks the
dataset sources and the model registry what only they know. The CLI calls `load()`; every
stage function receives the resulting `Params` and never opens params.yaml itself.
"""

from stages.core.errors import ParamsError
from stages.params.compose import (
    GROUPS,
    check_conf,
    choices,
    compose,
    conf_dir,
    drift,
    load,
    read,
    validate,
    yaml_text,
)
from stages.params.schema import (
    DEVICE_NAMES,
    REPORT_PICTURES,
    DownloadParams,
    EvaluateParams,
    Params,
    PreprocessParams,
    ReportParams,
    ShapesParams,
    TrainParams,
    flatten,
    from_dict,
)

__all__ = [
    "DEVICE_NAMES", "GROUPS", "REPORT_PICTURES", "DownloadParams", "EvaluateParams", "Params",
    "ParamsError", "PreprocessParams", "ReportParams", "ShapesParams", "TrainParams",
    "check_conf", "choices", "compose", "conf_dir", "drift", "flatten", "from_dict", "load",
    "read", "validate", "yaml_text",
]  # fmt: skip

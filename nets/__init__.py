"""Model registry: one small builder per name; `build` wraps it with the input normalisation.

    import nets
    model = nets.build("alexnet", num_classes=200, image_size=56, mean=mean_image, lrn=True)

A builder has the signature `builder(num_classes, image_size, *, option: Type = default, ...)`;
its keyword defaults are the model's options (`options(name)`), so a checkpoint can store the
name plus the options and rebuild the same module. Each option's annotation says what it takes
(a type, a `Field` range, `Literal` choices): `options_model(name)` is the pydantic model that
checks params.yaml's `net` section against them. The defaults are the architecture as published;
what the pipeline trains (options and training values) is set in conf/model/<name>.yaml.
"""

from nets import alexnet, linear, mlp, resnet, vgg  # noqa: F401 - each registers its builders
from nets.registry import UnknownNetError, build, names, options, options_model, register

__all__ = ["UnknownNetError", "build", "names", "options", "options_model", "register"]

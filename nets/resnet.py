"""ResNet-18/34/50 for 32-64 px images: torchvision's ResNet with a small-image stem.

torchvision's class is reused rather than rewritten so the state-dict keys match torchvision's
pretrained weights everywhere except conv1 (useful for transfer learning later). Its stem (7x7
stride 2 + max-pool) shrinks a 32 px image 4x before layer1; here it is one conv of stride
`stem_stride` (3x3, or stride x stride patches beyond stride 3) and no max-pool, as in the CIFAR
ResNets; with `deep_stem`, a stride-2 3x3 convolution per halving instead (32 channels, batch
norm and ReLU between; the last gives layer1 its 64). `resnet50-keras` keeps torchvision's (and
Keras's) ImageNet stem, for comparison with Keras write-ups that train ResNet50 on 32 px images.
"""

from __future__ import annotations

from pydantic import PositiveInt
from torch import nn

from nets.common import Dropout, init_weights
from nets.registry import register


def _resnet(
    block: str,  # torchvision's block class: "BasicBlock" or "Bottleneck"
    layers: tuple[int, int, int, int],
    num_classes: int,
    stem_stride: int,
    zero_init_residual: bool,
    deep_stem: bool,
) -> nn.Module:
    # torchvision already inits convs with He (fan_out), BN with (1, 0), and zeroes each
    # block's last BN when zero_init_residual (a block starts as the identity). With BN after
    # every conv, fan_in vs fan_out does not matter, so its recipe is kept for the convs.
    # Imported here: torchvision.models imports every model family and torch._dynamo, seconds that
    # every process importing nets would pay for a ResNet it may never build.
    from torchvision.models import resnet

    model = resnet.ResNet(
        getattr(resnet, block),
        list(layers),
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
    )
    # A kernel that covers every pixel: 3x3 up to stride 3; beyond, stride x stride patches (a
    # 3x3 kernel at stride 4 never sees 7 of each 16 pixels, and its saliency maps show the
    # grid). On Tiny ImageNet at stride 4 both reach the same top-1 after 3 epochs, the
    # patches with a lower validation loss.
    kernel = max(3, stem_stride)
    model.conv1 = nn.Conv2d(
        3, 64, kernel, stride=stem_stride, padding=1 if kernel == 3 else 0, bias=False
    )  # (B, 64, s, s)
    if deep_stem:  # the same maps from 3x3 convolutions; model.bn1 and model.relu follow
        halvings = stem_stride.bit_length() - 1
        if stem_stride != 2**halvings or not halvings:
            raise ValueError(f"deep_stem needs a stem_stride of 2, 4, 8, ..., got {stem_stride}")
        widths, stem = [3] + [32] * (halvings - 1) + [64], []
        for i in range(halvings):
            stem.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False))
            if i < halvings - 1:
                stem += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
        model.conv1 = nn.Sequential(*stem)
    model.maxpool = nn.Identity()
    for conv in (m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)):
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    init_weights(model.fc, linear="xavier")  # the project's convention for Linear layers
    return model


@register("resnet18")
def resnet18(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
    deep_stem: bool = False,
) -> nn.Module:
    """ResNet-18: BasicBlock x (2, 2, 2, 2)."""
    return _resnet(
        "BasicBlock", (2, 2, 2, 2), num_classes, stem_stride, zero_init_residual, deep_stem
    )


@register("resnet34")
def resnet34(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
    deep_stem: bool = False,
) -> nn.Module:
    """ResNet-34: BasicBlock x (3, 4, 6, 3)."""
    return _resnet(
        "BasicBlock", (3, 4, 6, 3), num_classes, stem_stride, zero_init_residual, deep_stem
    )


@register("resnet50")
def resnet50(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
    deep_stem: bool = False,
) -> nn.Module:
    """ResNet-50: Bottleneck x (3, 4, 6, 3)."""
    return _resnet(
        "Bottleneck", (3, 4, 6, 3), num_classes, stem_stride, zero_init_residual, deep_stem
    )


@register("resnet50-keras")
def resnet50_keras(
    num_classes: int,
    image_size: int,
    *,
    dropout: Dropout = 0.5,
) -> nn.Module:
    """ResNet-50 as Keras builds it: the ImageNet stem (7x7 stride-2 convolution and 3x3
    stride-2 max-pool, so a 32 px image reaches the last stage as 1x1), global average pooling,
    dropout, one dense layer. Keras's and torchvision's ResNet-50 differ only in where the
    bottleneck strides (Keras: the first 1x1 convolution, torchvision: the 3x3)."""
    from torchvision.models import resnet  # see _resnet

    model = resnet.ResNet(resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
    init_weights(model.fc, linear="xavier")
    model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)  # (B, 2048) -> (B, C)
    return model

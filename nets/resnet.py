"""ResNet-18/34/50 for 32-64 px images: torchvision's ResNet with a small-image stem.

torchvision's class is reused rather than rewritten so the state-dict keys match torchvision's
pretrained weights everywhere except conv1 (useful for transfer learning later). Its stem (7x7
stride 2 + max-pool) shrinks a 32 px image 4x before layer1; here it is one conv of stride
`stem_stride` (3x3, or stride x stride patches beyond stride 3) and no max-pool, as in the CIFAR
ResNets. `resnet50-keras` keeps torchvision's (and Keras's) ImageNet stem, for comparison with
Keras write-ups that train ResNet50 on 32 px images.
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
    model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    init_weights(model.fc, linear="xavier")  # the project's convention for Linear layers
    return model


@register("resnet18")
def resnet18(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
) -> nn.Module:
    """ResNet-18: BasicBlock x (2, 2, 2, 2)."""
    return _resnet("BasicBlock", (2, 2, 2, 2), num_classes, stem_stride, zero_init_residual)


@register("resnet34")
def resnet34(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
) -> nn.Module:
    """ResNet-34: BasicBlock x (3, 4, 6, 3)."""
    return _resnet("BasicBlock", (3, 4, 6, 3), num_classes, stem_stride, zero_init_residual)


@register("resnet50")
def resnet50(
    num_classes: int,
    image_size: int,
    *,
    stem_stride: PositiveInt = 1,
    zero_init_residual: bool = True,
) -> nn.Module:
    """ResNet-50: Bottleneck x (3, 4, 6, 3)."""
    return _resnet("Bottleneck", (3, 4, 6, 3), num_classes, stem_stride, zero_init_residual)


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

"""The model zoo: LeNet, VGG11, VGG11_bn, ResNet18 for ``[N, C, 32, 32]`` images, and the
paper's layer blocks (the weight of every Conv2d/Linear).

- :func:`build_model` ``(name, in_channels=1, num_classes=10) -> nn.Module``; :data:`MODELS`.
- :func:`layer_blocks` ``(model) -> OrderedDict[str, list[Parameter]]`` (leaf parameters).
"""

from layerhessians.curvature.blocks import FULL, LAYER_TYPES, layer_blocks
from layerhessians.models.lenet import LeNet
from layerhessians.models.registry import (
    IMAGE_SIZE,
    MODELS,
    build_model,
    canonical_model_name,
)
from layerhessians.models.resnet import BasicBlock, ResNet, resnet18
from layerhessians.models.vgg import VGG, VGG11_CONFIG, vgg11, vgg11_bn

__all__ = [
    "MODELS",
    "IMAGE_SIZE",
    "build_model",
    "canonical_model_name",
    "layer_blocks",
    "FULL",
    "LAYER_TYPES",
    "LeNet",
    "VGG",
    "VGG11_CONFIG",
    "vgg11",
    "vgg11_bn",
    "ResNet",
    "BasicBlock",
    "resnet18",
]

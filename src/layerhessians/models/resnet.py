"""ResNet18 for 32x32 images (CIFAR-style), as in the original LayerHessians code.

Input ``[N, C, 32, 32]`` (C = ``in_channels``), output logits ``[N, num_classes]``.

    conv1   Conv2d(C, 64, 3, stride 1, padding 1, no bias) -> bn1 -> ReLU  (no max-pool)
    layer1  2 BasicBlocks, 64 channels,  stride 1   [N, 64, 32, 32]
    layer2  2 BasicBlocks, 128 channels, stride 2   [N, 128, 16, 16]
    layer3  2 BasicBlocks, 256 channels, stride 2   [N, 256, 8, 8]
    layer4  2 BasicBlocks, 512 channels, stride 2   [N, 512, 4, 4]
    global average pool -> [N, 512] -> fc Linear(512, num_classes)

A BasicBlock is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs
without bias; the shortcut is the identity, or, where the stride or width changes (first
block of layer2-4), the projection ``downsample = Sequential(Conv2d 1x1 stride s, no bias;
BatchNorm2d)``. Module names follow the original (``Network.ResNet18``, ``resnet_type=
'small'``, in yashkhasbage25/HTR ``LayerHessians/models/cifar/network.py``), so layer blocks
are named e.g. ``layer2.0.downsample.0.weight``.

Initialisation, as in the original: conv weights ``N(0, 2 / (k * k * out_channels))``
(Kaiming normal, fan-out), batch-norm scale 1, shift 0; ``fc`` keeps PyTorch's default.

Parameters (C channels, K classes): ``576 C + 11,167,104 + 513 K`` (11,173,962 for 3
channels, 10 classes).
"""

from torch import Tensor, nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers with a residual connection.

    ``[N, in_planes, H, W]`` -> ``[N, planes, H / stride, W / stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, the shortcut being the
        identity or the strided 1x1 conv + batch norm: ``[N, in_planes, H, W]`` ->
        ``[N, planes, H / stride, W / stride]``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks: ``[N, in_channels, 32, 32]`` -> ``[N, num_classes]``.

    ``blocks_per_stage``: number of BasicBlocks in each of the four stages (widths 64, 128,
    256, 512; strides 1, 2, 2, 2).
    """

    def __init__(self, blocks_per_stage=(2, 2, 2, 2), in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for stage, (planes, stride, count) in enumerate(
            zip((64, 128, 256, 512), (1, 2, 2, 2), blocks_per_stage), start=1
        ):
            blocks = []
            for index in range(count):
                blocks.append(BasicBlock(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N, num_classes] of images ``x`` [N, in_channels, 32, 32]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet18: BasicBlocks ``[2, 2, 2, 2]`` (see the module docstring)."""
    return ResNet((2, 2, 2, 2), in_channels, num_classes)

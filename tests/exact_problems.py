"""Tiny float64 versions of the zoo (LeNet, VGG11_bn, ResNet18) and counter-examples to
"Hessian block = GGN block", for the exact layer-spectrum tests (dense references fit)."""

import torch
from torch import nn
from torch.nn import functional as F

from layerhessians.models.resnet import BasicBlock


class TinyLeNet(nn.Module):
    """LeNet's structure on [N, 1, 12, 12]: conv-relu-maxpool x2, fc-relu x2, fc."""

    def __init__(self, classes=3, activation=None):
        super().__init__()
        self.activation = nn.ReLU() if activation is None else activation
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.conv2 = nn.Conv2d(2, 3, 2)
        self.fc1 = nn.Linear(3 * 2 * 2, 5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, classes)

    def forward(self, x):
        x = F.max_pool2d(self.activation(self.conv1(x)), 2)
        x = F.max_pool2d(self.activation(self.conv2(x)), 2)
        x = x.flatten(1)
        x = self.activation(self.fc1(x))
        x = self.activation(self.fc2(x))
        return self.fc3(x)


class TinyVGGbn(nn.Module):
    """VGG11_bn's structure on [N, 2, 8, 8]: conv-bn-relu-maxpool blocks, then the
    original's classifier Linear(no bias)-BatchNorm1d-ReLU x2, Linear."""

    def __init__(self, classes=3, norm=nn.BatchNorm2d, norm1d=nn.BatchNorm1d):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), norm(3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), norm(4), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(4, 6, bias=False), norm1d(6), nn.ReLU(),
            nn.Linear(6, 6, bias=False), norm1d(6), nn.ReLU(),
            nn.Linear(6, classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class TinyResNet(nn.Module):
    """ResNet18's structure on [N, 2, 8, 8]: conv-bn-relu stem, a BasicBlock with the
    identity shortcut and one with a strided 1x1 projection, global average pool, fc."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.layer1 = BasicBlock(3, 3, 1)
        self.layer2 = BasicBlock(3, 4, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.avgpool(x).flatten(1))


class SharedWeightNet(nn.Module):
    """A hidden Linear applied twice (a weight shared by two layers)."""

    def __init__(self, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.fc2 = nn.Linear(5, classes)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.fc2(x)


class LayerNormNet(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


def randomise_batch_norm(model, seed=0):
    """Non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


def zoo():
    """``{name: (model, data)}``: the tiny zoo in float64 (batch norm randomised)."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    lenet = TinyLeNet().double()
    vgg = randomise_batch_norm(TinyVGGbn().double())
    resnet = randomise_batch_norm(TinyResNet().double())
    x12 = torch.randn(9, 1, 12, 12, generator=g, dtype=torch.float64)
    x8 = torch.randn(9, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return {"LeNet": (lenet, [(x12[:5], y[:5]), (x12[5:], y[5:])]),
            "VGG11_bn": (vgg, (x8, y)),
            "ResNet18": (resnet, [(x8[:4], y[:4]), (x8[4:], y[4:])])}


def counter_examples():
    """``{name: (model, data, bn_mode)}``: where H_WW != G_WW for some Conv2d/Linear weight."""
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(1)
    x12 = torch.randn(8, 1, 12, 12, generator=g, dtype=torch.float64)
    x8 = torch.randn(8, 2, 8, 8, generator=g, dtype=torch.float64)
    x4 = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    no_stats = TinyVGGbn(norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False),
                         norm1d=lambda c: nn.BatchNorm1d(c, track_running_stats=False))
    return {
        "tanh": (TinyLeNet(activation=nn.Tanh()).double(), (x12, y), "eval"),
        "GELU": (TinyLeNet(activation=nn.GELU()).double(), (x12, y), "eval"),
        "softplus": (TinyLeNet(activation=nn.Softplus()).double(), (x12, y), "eval"),
        "train-mode batch norm": (randomise_batch_norm(TinyVGGbn().double()), (x8, y),
                                  "train"),
        "batch norm without running statistics": (randomise_batch_norm(no_stats.double()),
                                                  (x8, y), "eval"),
        "layer norm": (LayerNormNet().double(), (x4, y), "eval"),
        "shared weight": (SharedWeightNet().double(), (x4, y), "eval"),
    }

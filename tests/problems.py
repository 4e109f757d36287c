"""The one shared registry of tiny test problems: models, data (several unequal batches) and
a loss, in float64, small enough for dense references, on every device and dtype the tests
run (``DEVICES``, ``DTYPES``; ``Problem.build(device=..., dtype=...)``).

    from problems import PROBLEMS, tiny_mlp, mlp_data
    model, data = PROBLEMS["conv"].build()

- ``"mlp"``: 5 -> 4 (tanh) -> 3 MLP, 35 parameters; 12 examples in batches of 7 and 5.
- ``"conv"``: :class:`TinyConvNet` (grouped, strided, dilated conv, batch norm with
  non-trivial running statistics, max-pool, conv, linear), 91 parameters; 10 examples
  [N, 2, 8, 8] in batches of 6 and 4.
Every problem uses ``nn.CrossEntropyLoss()`` over 3 classes unless it says otherwise.

The exact layer-spectrum tests use the tiny zoo (:func:`zoo`: LeNet, VGG11_bn and ResNet18's
structures) and the counter-examples to "Hessian block = GGN block" (:func:`counter_examples`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from layerhessians.curvature import Reduction
from layerhessians.models.resnet import BasicBlock

CE = nn.CrossEntropyLoss()
#: where and in which precision the registry's problems are built: CPU always, CUDA where a
#: device is present; float64 for dense references, float32 for the engine's working dtype
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
DTYPES = (torch.float64, torch.float32)


class TinyConvNet(nn.Module):
    """[N, 2, 8, 8] -> conv1 (3x3, stride 2, dilation 2, groups 2) -> BatchNorm2d -> ReLU ->
    max-pool 2 -> conv2 (2x2) -> tanh -> linear -> [N, 3]; 91 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 2, 2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        return self.fc(torch.tanh(self.conv2(x)).flatten(1))


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_convnet(seed=0):
    torch.manual_seed(seed)
    model = TinyConvNet().double()
    with torch.no_grad():  # non-trivial running statistics, so eval != train mode
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


def _split(x, y, sizes):
    pieces, start = [], 0
    for size in sizes:
        pieces.append((x[start:start + size], y[start:start + size]))
        start += size
    return pieces


def mlp_data(seed=1, sizes: Sequence[int] = (7, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return _split(x, y, sizes)  # unequal batches


def conv_data(seed=1, sizes: Sequence[int] = (6, 4)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return _split(x, y, sizes)


@dataclass(frozen=True)
class Problem:
    """A tiny model, its data (a list of ``(inputs, targets)`` batches) and its loss."""

    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[..., list]
    loss_fn: Callable = field(default=CE)

    def build(self, device="cpu", dtype=torch.float64, **data_kwargs):
        """``(model, data)``, fresh each call, on ``device`` in ``dtype`` (``data_kwargs``: e.g.
        ``sizes=(4, 5, 3)``)."""
        model = self.make_model().to(device=device, dtype=dtype)
        data = [(x.to(device=device, dtype=dtype), y.to(device))
                for x, y in self.make_data(**data_kwargs)]
        return model, data


PROBLEMS = {
    "mlp": Problem("mlp", tiny_mlp, mlp_data),
    "conv": Problem("conv", tiny_convnet, conv_data),
}


def state_of(model):
    """The model's buffers (copied) and modes, to check that measuring changed neither."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    return buffers, modes


def assert_state_equal(model, state):
    """The model's buffers and modes equal ``state`` (from :func:`state_of`)."""
    buffers, modes = state
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert [m.training for m in model.modules()] == modes


def rel_error(a, b):
    """``||a - b|| / ||b||`` (Frobenius)."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


class TwoIdenticalRanks(Reduction):
    """Simulates two processes holding the same data: counts and sums double."""

    def __init__(self):
        self.sums = 0

    def total_examples(self, count):
        return 2 * count

    def sum(self, tensor):
        self.sums += 1
        return tensor * 2


# ----------------------------------------------------------------------------- the tiny zoo


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

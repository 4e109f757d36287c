"""A shared registry of tiny test problems: models, data (several unequal batches) and a
loss, in float64, small enough for dense references.

    from problems import PROBLEMS, tiny_mlp, mlp_data
    model, data = PROBLEMS["conv"].build()

- ``"mlp"``: 5 -> 4 (tanh) -> 3 MLP, 35 parameters; 12 examples in batches of 7 and 5.
- ``"conv"``: :class:`TinyConvNet` (grouped, strided, dilated conv, batch norm with
  non-trivial running statistics, max-pool, conv, linear), 91 parameters; 10 examples
  [N, 2, 8, 8] in batches of 6 and 4.
Every problem uses ``nn.CrossEntropyLoss()`` over 3 classes unless it says otherwise.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerhessians.curvature import Reduction

CE = nn.CrossEntropyLoss()


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

    def build(self, **data_kwargs):
        """``(model, data)``, fresh each call (``data_kwargs``: e.g. ``sizes=(4, 5, 3)``)."""
        return self.make_model(), self.make_data(**data_kwargs)


PROBLEMS = {
    "mlp": Problem("mlp", tiny_mlp, mlp_data),
    "conv": Problem("conv", tiny_convnet, conv_data),
}


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

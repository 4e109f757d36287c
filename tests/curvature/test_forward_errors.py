"""A forward pass that fails on the data is one line naming the inputs, on every route
(issue 22 item 12: inputs of the wrong width gave a RuntimeError traceback)."""

import pytest
import torch
from torch import nn

from layerhessians.curvature import hessian_operator
from layerhessians.errors import UserError
from layerhessians.spectra import layer_spectra, slq

CE = nn.CrossEntropyLoss()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()


def wrong_width():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,),
                                                                              generator=g)


@pytest.mark.parametrize("route", ["exact", "slq", "operator", "ef"])
def test_inputs_of_the_wrong_width_are_one_line(route):
    model, data = mlp(), wrong_width()
    with pytest.raises(UserError, match=r"forward pass fails on the data \(inputs \(\d+, 6\)\): mat1"):
        if route in ("exact", "slq"):
            layer_spectra(model, CE, data, iterations=4, layer_method=route)
        elif route == "operator":
            slq(hessian_operator(model, CE, data), iterations=4)
        else:
            slq(hessian_operator(model, CE, data, kind="ef"), iterations=4)


def test_an_integer_loss_is_refused_on_the_exact_route():
    model = mlp()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    with pytest.raises(UserError, match="floating-point scalar"):
        layer_spectra(model, lambda o, t: (o.argmax(1) == t).sum(), (x, y), iterations=4)


def test_the_models_own_errors_still_reach_the_user_in_one_line():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x):
            raise ValueError("my layer is not ready")

    with pytest.raises(UserError, match="my layer is not ready"):
        layer_spectra(Broken(), CE, (torch.randn(4, 5, dtype=torch.float64),
                                      torch.tensor([0, 1, 2, 0])), iterations=2)

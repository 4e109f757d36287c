"""The lean double backward through convolutions (curvature.conv_double_backward) against
PyTorch's own, float64: a squared gradient norm differentiated again, with and without the
unfolded first layer, with plain and batched (``is_grads_batched``) first backward passes."""

import pytest
import torch
import torch.nn.functional as F

from layerhessians.curvature.conv_double_backward import conv_double_backward


def _second_order(mode, unfold, batched):
    """d/dtheta of ||J^T v||^2 for a two-convolution net (the first on data)."""
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, 7, 7, generator=g, dtype=torch.float64)
    params = [w1, b1, w2]
    with conv_double_backward(mode, **({"unfold": unfold} if mode == "lean" else {})):
        out = F.conv2d(torch.tanh(F.conv2d(x, w1, b1, padding=1)), w2, stride=2)
    shape = (5, *out.shape) if batched else out.shape
    v = torch.randn(shape, generator=g, dtype=torch.float64) * out  # v depends on theta too
    grads = torch.autograd.grad(out, params, grad_outputs=v, create_graph=True,
                                is_grads_batched=batched)
    value = sum((t * t).sum() for t in grads)
    return [value.detach(), *torch.autograd.grad(value, params)]


@pytest.mark.parametrize("unfold", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_lean_double_backward_equals_native(unfold, batched):
    lean = _second_order("lean", unfold, batched)
    native = _second_order("native", unfold, batched)
    for a, b in zip(lean, native):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)

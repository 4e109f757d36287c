"""Leaner second-order products through 2-D convolutions.

Used while a first-order graph is built, when ``conv_double_backward="lean"`` (the default of
:class:`~layerhessians.curvature.graph.CurvatureGraph`; ``"native"`` keeps PyTorch's own). PyTorch's double backward
of a convolution (``_convolution_double_backward``) computes every term whether or not the
product needs it: the input term ``convT(dY, V)`` of a weight gradient even when the input is
data, and a weight term for every convolution a layer-block product passes through, though
only the block's own weight is wanted. Inside :func:`conv_double_backward` ``("lean")`` every ``conv2d`` is
recorded as :class:`_Conv2d`, whose backward is made of separate differentiable pieces
(:class:`_ConvInputGrad`, :class:`_ConvWeightGrad`) that compute only the terms the current
backward pass will use (asked of the autograd engine per edge; the weight enters through a
non-leaf alias so that the engine can answer). For a first layer on data, with ``unfold=True``
(the curvature graph's, whose many products share one unfolding), the weight gradient and its
derivative are single matrix products with the unfolded input, ``dW = dY [O, N*L] @ cols
[N*L, K]`` and ``cols @ V^T`` (oneDNN's weight gradient is slow for few input channels); a
single product (the trace penalty's) does better without: unfolding a LeNet batch of 256 costs
about 8 of oneDNN's weight gradients. Same ATen kernels otherwise: values agree to rounding.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CONV_DOUBLE_BACKWARDS", "UNFOLD_LIMIT_BYTES", "conv_double_backward"]

#: ``"lean"``: record conv2d as :class:`_Conv2d`; ``"native"``: PyTorch's double backward
CONV_DOUBLE_BACKWARDS = ("lean", "native")

UNFOLD_LIMIT_BYTES = 512 * 2**20  # largest unfolded first-layer input kept for the GEMM form

_conv_backward = torch.ops.aten.convolution_backward.default
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_functorch = getattr(torch._C, "_functorch", None)
_batched_checks = [getattr(_functorch, name) for name in ("is_batchedtensor",
                                                          "is_legacy_batchedtensor")
                   if hasattr(_functorch, name)]


def _pair_list(value) -> list[int]:
    return [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]


def _needed(ctx, index: int) -> bool:
    """Whether the running backward pass uses the gradient of input ``index``."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    if _will_execute is None:
        return True
    try:
        return bool(_will_execute(node))
    except RuntimeError:  # a leaf under autograd.grad: the engine cannot say
        return True


class _ConvWeightGrad(torch.autograd.Function):
    """``dW = conv_weight_grad(dY, x)`` (or ``dY [O, N*L] @ cols`` for unfolded data)."""

    @staticmethod
    def forward(ctx, grad_output, inputs, weight_shape, conf, columns):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(grad_output, inputs)
        ctx.conf, ctx.columns = conf, columns
        if columns is not None:
            flat = grad_output.transpose(0, 1).reshape(grad_output.shape[1], -1)
            return (flat @ columns).view(weight_shape)
        holder = grad_output.new_empty(weight_shape)
        return _conv_backward(grad_output, inputs, holder, None, stride, padding, dilation,
                              False, [0, 0], groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx, vector):
        grad_output, inputs = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        d_grad_output = d_inputs = None
        if _needed(ctx, 0):  # d(dW . V)/d(dY) = conv(x, V)
            if ctx.columns is not None:
                n, o, h, w = grad_output.shape
                product = ctx.columns @ vector.reshape(o, -1).t()  # [N*L, O]
                d_grad_output = product.view(n, h, w, o).permute(0, 3, 1, 2).contiguous()
            else:
                d_grad_output = F.conv2d(inputs, vector, None, stride, padding, dilation, groups)
        if _needed(ctx, 1):  # d(dW . V)/dx = convT(dY, V)
            d_inputs = _conv_backward(grad_output, inputs, vector, None, stride, padding,
                                      dilation, False, [0, 0], groups, [True, False, False])[0]
        return d_grad_output, d_inputs, None, None, None


class _ConvInputGrad(torch.autograd.Function):
    """``dx = convT(dY, W)``."""

    @staticmethod
    def forward(ctx, grad_output, weight, inputs_like, conf):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(grad_output, weight, inputs_like)
        ctx.conf = conf
        return _conv_backward(grad_output, inputs_like, weight, None, stride, padding, dilation,
                              False, [0, 0], groups, [True, False, False])[0]

    @staticmethod
    def backward(ctx, vector):
        grad_output, weight, inputs_like = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        d_grad_output = d_weight = None
        if _needed(ctx, 0):  # d(dx . V)/d(dY) = conv(V, W)
            d_grad_output = F.conv2d(vector, weight, None, stride, padding, dilation, groups)
        if _needed(ctx, 1):  # d(dx . V)/dW = conv_weight_grad(dY, V)
            d_weight = _conv_backward(grad_output, vector, weight, None, stride, padding,
                                      dilation, False, [0, 0], groups, [False, True, False])[1]
        return d_grad_output, d_weight, None, None


class _Conv2d(torch.autograd.Function):
    """``conv2d`` whose backward computes, as differentiable pieces, only what is used."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, conf, columns):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(inputs, weight)
        ctx.conf, ctx.columns = conf, columns
        return F.conv2d(inputs, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        if _is_batched(grad_output):  # a vmapped backward: the pieces' derivatives would be
            return _native_backward(ctx, grad_output, inputs, weight)  # wrong, use PyTorch's
        d_inputs = d_weight = d_bias = None
        if _needed(ctx, 0):
            d_inputs = _ConvInputGrad.apply(grad_output, weight, inputs.detach(), ctx.conf)
        if _needed(ctx, 1):
            d_weight = _ConvWeightGrad.apply(grad_output, inputs, weight.shape, ctx.conf,
                                             ctx.columns)
        if _needed(ctx, 2):
            d_bias = grad_output.sum((0, 2, 3))
        return d_inputs, d_weight, d_bias, None, None


def _is_batched(tensor) -> bool:
    """Whether ``tensor`` carries a vmap batch dimension (``is_grads_batched``'s legacy one
    included), which shapes inside a backward do not show."""
    return any(check(tensor) for check in _batched_checks)


def _native_backward(ctx, grad_output, inputs, weight):
    """PyTorch's convolution backward (differentiable by its own double backward)."""
    stride, padding, dilation, groups = ctx.conf
    mask = [bool(ctx.needs_input_grad[i]) for i in range(3)]
    d_inputs, d_weight, d_bias = _conv_backward(
        grad_output, inputs, weight, [weight.shape[0]] if mask[2] else None, stride, padding,
        dilation, False, [0, 0], groups, mask)
    return d_inputs, d_weight, d_bias, None, None


def _columns(inputs, weight, stride, padding, dilation, groups):
    """The unfolded input [N*L, K] of a first layer on data, or None (too big, grouped)."""
    if inputs.requires_grad or groups != 1:
        return None
    kh, kw = weight.shape[2:]
    out_h = (inputs.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (inputs.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if inputs.shape[0] * out_h * out_w * weight[0].numel() * inputs.element_size() > \
            UNFOLD_LIMIT_BYTES:
        return None
    columns = F.unfold(inputs, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _lean_conv2d(unfold, inputs, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str) or inputs.dim() != 4 or _will_execute is None:
        return F.conv2d(inputs, weight, bias, stride, padding, dilation, groups)
    conf = (_pair_list(stride), _pair_list(padding), _pair_list(dilation), int(groups))
    columns = _columns(inputs, weight, *conf) if unfold and weight.requires_grad else None
    # non-leaf aliases, so that the engine can tell whether a backward pass reaches them
    weight = weight.view_as(weight) if weight.requires_grad else weight
    bias = bias.view_as(bias) if bias is not None and bias.requires_grad else bias
    return _Conv2d.apply(inputs, weight, bias, conf, columns)


class _LeanMode(TorchFunctionMode):
    def __init__(self, unfold: bool):
        super().__init__()
        self.unfold = unfold

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            return _lean_conv2d(self.unfold, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def conv_double_backward(mode: str = "lean", *, unfold: bool = True):
    """Within this context, ``conv2d`` calls record the double backward ``mode``:
    ``"lean"`` (this module's, see the module docstring) or ``"native"`` (PyTorch's).
    ``unfold``: a first layer on data keeps its unfolded input for the products (worth it
    when many products share the graph)."""
    if mode not in CONV_DOUBLE_BACKWARDS:
        raise ValueError(f"conv_double_backward must be one of {CONV_DOUBLE_BACKWARDS}")
    if mode == "native":
        yield
        return
    with _LeanMode(unfold):
        yield

"""Per-example squared gradient norms from one backward pass, for the ggn penalty's
per-example form.

For a ``Linear`` or ``Conv2d`` layer called once per forward, example ``n``'s gradient of a
scalar ``sum_n c_n . f_n`` is a product of what the layer sees: with ``a_n`` its input
(``Conv2d``: unfolded, ``[K, L]``) and ``g_n`` the gradient at its output (``[O, L]``),
``dW_n = g_n a_n^T`` and ``db_n = g_n 1``, so ``||dW_n||^2 = ||g_n||^2 ||a_n||^2`` for a
single position (``L = 1``) and ``||g_n a_n^T||_F^2`` otherwise (a batched product). One
backward pass to the layers' outputs (``create_graph``, so the result is differentiable)
gives every example's ``g_n``, where :func:`torch.func.vmap` would run the network once per
example (the same numbers: BackPACK's and Opacus's per-sample gradient rule). Every chosen
parameter must be the weight or bias of such a layer; :func:`plan` says why not otherwise,
and the caller falls back to vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LayerCapture", "plan", "squared_norms"]


def plan(model: nn.Module, params) -> tuple[list, str | None]:
    """``(layers, None)``: the ``Linear``/``Conv2d`` modules owning ``params`` (each a weight
    or bias of one of them), or ``([], reason)`` when the rule does not apply."""
    owners = {}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            if any(p is q for p in module.parameters(recurse=False) for q in params):
                return [], f"{type(module).__name__} holds a penalised parameter"
            continue
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    layers = []
    for p in params:
        found = owners.get(id(p), [])
        if len(found) != 1:
            return [], "a penalised parameter is shared or outside Linear/Conv2d layers"
        if found[0] not in layers:
            layers.append(found[0])
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)
                                             or layer.padding_mode != "zeros"):
            return [], "a grouped, 'same'-padded or non-zero-padded convolution"
    return layers, None


class LayerCapture:
    """Forward hooks recording each layer's input and output (clones, so that in-place
    operations after the layer cannot change them) and how often it ran."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.inputs, self.outputs, self.calls = {}, {}, {id(m): 0 for m in self.layers}
        self._handles = []

    def __enter__(self):
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module, args):
        self.calls[id(module)] += 1
        captured = args[0].clone()
        self.inputs[id(module)] = captured
        return (captured, *args[1:])

    def _post(self, module, args, output):
        self.outputs[id(module)] = output
        return output.clone()

    def usable(self) -> bool:
        """Each layer ran exactly once, on a per-example input (Linear: ``[N, D]`` or
        ``[N, T, D]``)."""
        return all(self.calls[id(m)] == 1 and (not isinstance(m, nn.Linear)
                                               or self.inputs[id(m)].ndim in (2, 3))
                   for m in self.layers)


def _per_example(layer: nn.Module, a: Tensor, g: Tensor, params) -> Tensor:
    """``[N]``: the squared norm of example ``n``'s gradient for ``layer``'s parameters
    among ``params``, from its input ``a`` and output gradient ``g``."""
    chosen = {id(p) for p in params}
    n = a.shape[0]
    total = a.new_zeros(n)
    if isinstance(layer, nn.Linear):
        if a.ndim == 2:  # one position: ||g a^T||^2 = ||g||^2 ||a||^2
            g2 = (g * g).sum(1)
            if id(layer.weight) in chosen:
                total = total + g2 * (a * a).sum(1)
            if layer.bias is not None and id(layer.bias) in chosen:
                total = total + g2
            return total
        cols, grads = a.transpose(1, 2), g.transpose(1, 2)  # [N, D, T], [N, O, T]
    else:
        cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # [N, K, L]
        grads = g.reshape(n, g.shape[1], -1)  # [N, O, L]
    if id(layer.weight) in chosen:
        weight = torch.bmm(grads, cols.transpose(1, 2))  # [N, O, K]
        total = total + (weight * weight).sum((1, 2))
    if layer.bias is not None and id(layer.bias) in chosen:
        bias = grads.sum(2)
        total = total + (bias * bias).sum(1)
    return total


def squared_norms(capture: LayerCapture, model_outputs: Tensor, cotangent: Tensor,
                  params) -> Tensor:
    """``[N]``: ``||J_n^T c_n||^2`` over ``params`` for every example, differentiable, from
    one backward pass of ``model_outputs`` with the cotangent ``c`` (``[N, ...]``)."""
    layers = capture.layers
    outs = [capture.outputs[id(m)] for m in layers]
    grads = torch.autograd.grad(model_outputs, outs, grad_outputs=cotangent,
                                create_graph=True, retain_graph=True, allow_unused=True)
    total = None
    for layer, g in zip(layers, grads):
        if g is None:
            continue
        term = _per_example(layer, capture.inputs[id(layer)], g, params)
        total = term if total is None else total + term
    return total if total is not None else model_outputs.new_zeros(model_outputs.shape[0])

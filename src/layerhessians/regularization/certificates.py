"""Where the ggn penalty's trace is the Hessian's: a run-time certificate per penalty block.

The ``ggn`` and ``exact`` estimators estimate ``tr G_BB``; it equals ``tr H_BB`` where every
parameter tensor of the blocks has ``H = G`` on its diagonal block (the trace of a union of
tensors is the sum of their diagonal blocks' traces). That holds when the network's outputs
are piecewise linear in the tensor (ReLU, max-pooling, eval-mode batch norm after it; see
:mod:`~layerhessians.curvature.certify`), and the probe of
:func:`~layerhessians.curvature.certify.certify_blocks` (``||H v - G v||`` to rounding, one
Gaussian vector per tensor) tells it at the current parameters, in the penalty's batch-norm
mode.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from layerhessians.curvature.certify import certify_blocks
from layerhessians.regularization.blocks import resolve_blocks

__all__ = ["trace_certificates"]


def trace_certificates(model: nn.Module, loss_fn, data, blocks=None, bn_mode: str = "eval",
                       seed: int = 0) -> "OrderedDict[str, dict]":
    """Per penalty block, whether its GGN trace is its Hessian trace.

    Args:
        model: the network (left unchanged).
        loss_fn: the mean- or sum-reduced loss, as for
            :func:`~layerhessians.regularization.trace_penalty`.
        data: an ``(inputs, targets)`` pair or a list of pairs (the probe's data).
        blocks: the penalty's blocks (:func:`~layerhessians.regularization.resolve_blocks`).
        bn_mode: the penalty's batch-norm mode.
        seed: seed of the probe vectors.

    Returns:
        ``{block: {"certified": bool, "tensors": int, "hessian_residual": float (the worst
        relative ``||H v - G v||`` over the block's tensors), "reason": str (the first
        failing tensor and why; "" when certified)}}``, in block order.

    Raises:
        UserError: as :func:`~layerhessians.curvature.certify.certify_blocks`.
    """
    chosen = resolve_blocks(model, blocks)
    names = {id(p): name for name, p in model.named_parameters()}
    tensors = OrderedDict((names[id(p)], p) for params in chosen.values() for p in params)
    found = certify_blocks(model, loss_fn, data, tensors, seed=seed, kind="hessian",
                           bn_mode=bn_mode)
    out = OrderedDict()
    for block, params in chosen.items():
        residuals = [(names[id(p)], found[names[id(p)]].hessian_residual) for p in params]
        tolerance = found[residuals[0][0]].tolerance
        # H = G on the tensor's block (the Gram factors, which the probe also asks about, do
        # not matter here); NaN fails
        failed = [(name, r) for name, r in residuals if not r <= tolerance]
        worst = max((r for _, r in residuals), key=lambda r: (r != r, r))
        out[block] = {
            "certified": not failed, "tensors": len(residuals), "hessian_residual": worst,
            "reason": (f"{failed[0][0]}: Hessian block != GGN block (relative residual "
                       f"{failed[0][1]:.2g} > {tolerance:.2g})") if failed else ""}
    return out

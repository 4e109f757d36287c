"""The Hessian ``H = d^2 L / dtheta^2`` of the mean loss (Hessian-vector products by double
backward, Pearlmutter 1994)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.graph import GRADIENT, BatchGraph, differentiable

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    """Products with the Hessian block ``H_PP`` of the mean loss.

    Per batch, ``H_PP v_P = d(g_P . v_P)/dtheta_P`` with the kept gradient ``g`` (one
    backward pass through the first-order graph, no forward pass). See
    :class:`~layerhessians.curvature.base.CurvatureOperator` for the arguments.
    """

    kind = "hessian"
    exact_route = True  # a certified layer block equals its GGN block V V^T
    needs = frozenset({GRADIENT})

    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        """The batch's term of the Hessian-vector product ``H_PP v_P`` (Pearlmutter's trick).

        A backward of ``<grad_P L, v_P>`` through the kept first-order graph.

        Args:
            batch: what the graph kept for one batch.
            parts: ``v_P`` as tensors shaped like the block's parameters (model dtype).

        Returns:
            One tensor per block parameter, shaped and typed like ``parts``, or ``None`` when the
            block's gradient is constant (a zero Hessian block).
        """
        outputs, grad_outputs = [], []
        for i, part in zip(self.indices, parts):
            if differentiable(batch.grads[i]):
                outputs.append(batch.grads[i])
                grad_outputs.append(part)
        if not outputs:
            return None  # the gradient of the block is constant: zero Hessian block
        return torch.autograd.grad(outputs, self.params, grad_outputs, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """``hessian(loss)`` of the flattened block at its value, float64 [dim, dim]."""
        hessian = problem.hessian_of(lambda flat: problem.loss(flat, x, y))(problem.flat0)
        return hessian.to(torch.float64)

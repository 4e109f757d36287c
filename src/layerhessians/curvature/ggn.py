"""The generalized Gauss-Newton matrix ``G = J^T H_f J`` of the mean loss (Schraudolph 2002):
``J = df/dtheta`` the Jacobian of the model outputs, ``H_f = d^2 loss / df^2`` the Hessian of
the loss in the outputs; exact for any loss (no closed form of ``H_f`` is assumed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.graph import OUTPUT_CURVATURE, BatchGraph, differentiable

__all__ = ["GGNOperator"]


class GGNOperator(CurvatureOperator):
    """Products with the GGN block ``G_PP = J_P^T H_f J_P``.

    Per batch, with the outputs ``f``, ``dL_b/df`` (``create_graph``) and ``w = J^T u`` for a
    dummy ``u`` kept in the graph: ``J v = d(w . v)/du``, then ``H_f (J v) =
    d(dL_b/df . Jv)/df``, then ``J^T z = d(f . z)/dtheta``: three backward passes, no
    forward pass. See :class:`~layerhessians.curvature.base.CurvatureOperator` for the
    arguments.
    """

    kind = "ggn"
    exact_route = True  # a certified layer block equals its GGN block V V^T
    needs = frozenset({OUTPUT_CURVATURE})

    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        """The batch's term of the GGN product ``J^T H_f J v_P``.

        ``J v`` by the double-backward trick on the kept ``J^T`` graph, ``H_f`` (the loss's
        Hessian w.r.t. the outputs) by a backward through the kept output gradient, ``J^T`` by a
        backward.

        Args:
            batch: what the graph kept for one batch.
            parts: ``v_P`` as tensors shaped like the block's parameters (model dtype).

        Returns:
            One tensor per block parameter, shaped and typed like ``parts``, or ``None`` when the
            outputs do not depend on the block or the loss is linear in them.
        """
        outputs, grad_outputs = [], []
        for i, part in zip(self.indices, parts):
            if differentiable(batch.jt_dummy[i]):
                outputs.append(batch.jt_dummy[i])
                grad_outputs.append(part)
        curved = [k for k, d in enumerate(batch.dloss_doutputs) if differentiable(d)]
        if not outputs or not curved:
            return None  # the outputs do not depend on P, or the loss is linear in them
        jvps = torch.autograd.grad(outputs, batch.dummy, grad_outputs, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        hjvps = torch.autograd.grad([batch.dloss_doutputs[k] for k in curved],
                                    batch.curvature_outputs,
                                    [jvps[k] for k in curved], retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        return torch.autograd.grad(batch.outputs, self.params, hjvps, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """``J^T H_f J`` with ``J = jacrev`` of the concatenated floating outputs and ``H_f =
        hessian`` of the batch's summed loss in them, float64 [dim, dim]."""
        out0 = problem.outputs(problem.flat0, x)
        flat_out0 = problem.flat_outputs(out0)
        jac = problem.jacobian_of(
            lambda flat: problem.flat_outputs(problem.outputs(flat, x)))(problem.flat0)
        jac = jac.reshape(-1, problem.dim)
        h_out = problem.hessian_of(
            lambda o: problem.batch_loss_fn(problem.unflat_outputs(o, out0), y))(flat_out0)
        h_out = h_out.reshape(flat_out0.numel(), flat_out0.numel())
        return (jac.T @ h_out @ jac).to(torch.float64)

"""The empirical Fisher of the mean loss ``L = (1/N) sum_n l_n``:
``EF = (1/N) sum_n grad l_n grad l_n^T``, the uncentred second moment of the per-example
gradients (e.g. Kunstner, Balles & Hennig, NeurIPS 2019, for its relation to the Fisher).

The per-example loss is ``l_n = loss_fn(model(x_n)[None], y_n[None])``: ``loss_fn`` must be
the mean of per-example losses over its batch (``reduction="mean"``, no class weights), which
the graph checks on every batch (:class:`UserError` otherwise). The per-example gradients
come from ``torch.func.vmap(torch.func.grad(...))`` over the examples of a batch and are kept
([n_b, dim] per batch), so each product is two matrix products per parameter and no
backward pass. Batch norm in ``bn_mode="train"`` couples the examples and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.graph import PER_EXAMPLE_GRADIENTS, BatchGraph

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(CurvatureOperator):
    """Products with the empirical Fisher block ``EF_PP = (1/N) sum_n g_{n,P} g_{n,P}^T``.

    Per batch, with the kept per-example gradients ``G_b`` [n_b, dim_P]:
    ``(scale / n_b) G_b^T (G_b v)`` with ``scale = n_b / N``, i.e. ``(1/N) sum_{n in b}
    g_n (g_n . v)``. See :class:`~layerhessians.curvature.base.CurvatureOperator` for the
    arguments.
    """

    kind = "ef"
    needs = frozenset({PER_EXAMPLE_GRADIENTS})

    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        grads = [batch.per_example_grads[i].reshape(batch.examples, -1) for i in self.indices]
        projections = sum(g @ part.reshape(-1) for g, part in zip(grads, parts))  # [n_b]
        projections = projections * (batch.scale / batch.examples)
        return tuple((projections @ g).view(part.shape) for g, part in zip(grads, parts))

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """``J^T J / n_b`` with ``J`` [n_b, dim] the Jacobian (``jacrev``) of the vector of
        per-example losses ``loss_fn(f(x)[n:n+1], y[n:n+1])``, float64 [dim, dim]."""
        def per_example_losses(flat):
            outputs = problem.outputs(flat, x)
            return torch.stack([problem.loss_fn(outputs[n:n + 1], y[n:n + 1]).reshape(())
                                for n in range(x.shape[0])])

        jac = problem.jacobian_of(per_example_losses)(problem.flat0).to(torch.float64)
        return jac.T @ jac / x.shape[0]

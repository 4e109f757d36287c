"""The empirical Fisher of the mean loss ``L = (1/N) sum_n l_n``:
``EF = (1/N) sum_n grad l_n grad l_n^T``, the uncentred second moment of the per-example
gradients (e.g. Kunstner, Balles & Hennig, NeurIPS 2019, for its relation to the Fisher).

The per-example loss is ``l_n = loss_fn(model(x_n)[None], y_n[None])``: ``loss_fn`` must be
the mean or the sum of per-example losses over its batch (no class weights with
``reduction="mean"``), which the graph checks on every batch (:class:`UserError` otherwise). The per-example gradients
come from ``torch.func.vmap(torch.func.grad(...))`` over the examples of a batch and are kept
([n_b, dim] per batch), so each product is two matrix products per parameter and no
backward pass. A batch-dependent model (batch norm using batch statistics, see
:func:`~layerhessians.curvature.coupling.batch_coupling`) couples the examples and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.batches import rows
from layerhessians.curvature.graph import PER_EXAMPLE_GRADIENTS, BatchGraph

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(CurvatureOperator):
    """Products with the empirical Fisher block ``EF_PP = (1/N) sum_n g_{n,P} g_{n,P}^T``.

    Per batch, with the kept per-example gradients ``G_b`` [n_b, dim_P]: ``G_b^T (G_b v) =
    sum_{n in b} g_n (g_n . v)``; the graph multiplies the sum over batches by ``1/N``. See :class:`~layerhessians.curvature.base.CurvatureOperator` for the
    arguments.
    """

    kind = "ef"
    needs = frozenset({PER_EXAMPLE_GRADIENTS})

    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        """The batch's term of the empirical Fisher product: ``sum_n g_n (g_n^T v_P)``.

        ``g_n`` is example ``n``'s gradient of the block (the per-example gradients the graph
        keeps); no second-order pass.

        Args:
            batch: what the graph kept for one batch.
            parts: ``v_P`` as tensors shaped like the block's parameters (model dtype).

        Returns:
            One tensor per block parameter, shaped and typed like ``parts``.
        """
        grads = [batch.per_example_grads[i].reshape(batch.examples, -1) for i in self.indices]
        projections = sum(g @ part.reshape(-1) for g, part in zip(grads, parts))  # [n_b]
        return tuple((projections @ g).view(part.shape) for g, part in zip(grads, parts))

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """``J^T J`` with ``J`` [n_b, dim] the Jacobian (``jacrev``) of the vector of
        per-example losses ``loss_fn(f(x)[n:n+1], y[n:n+1])``, float64 [dim, dim] (the SUM
        over the batch's examples)."""
        count = x.shape[0]

        def per_example_losses(flat):
            outputs = problem.outputs(flat, x)
            return torch.stack([problem.loss_fn(rows(outputs, slice(n, n + 1), count),
                                                rows(y, slice(n, n + 1), count)).reshape(())
                                for n in range(count)])

        jac = problem.jacobian_of(per_example_losses)(problem.flat0).to(torch.float64)
        return jac.T @ jac

"""The residual ``R = H - G`` of the mean loss: the Hessian minus the generalized
Gauss-Newton matrix (the part of the curvature from the model's own second derivatives,
weighted by ``dL/df``; Sankar et al., AAAI 2021 study its share of the spectrum)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from layerhessians.curvature.base import LinearCombination
from layerhessians.curvature.ggn import GGNOperator
from layerhessians.curvature.graph import CurvatureGraph
from layerhessians.curvature.hessian import HessianOperator

__all__ = ["ResidualOperator"]


class ResidualOperator(LinearCombination):
    """``H_PP - G_PP`` as the operator arithmetic ``HessianOperator - GGNOperator`` on one
    graph: one pass over the batches per product. See
    :class:`~layerhessians.curvature.base.CurvatureOperator` for the arguments."""

    kind = "residual"
    needs = HessianOperator.needs | GGNOperator.needs

    def __init__(self, graph: CurvatureGraph, indices: Sequence[int], names: Sequence[str],
                 name: str | None = None):
        hessian = HessianOperator(graph, indices, names, name)
        ggn = GGNOperator(graph, indices, names, name)
        super().__init__([(1.0, hessian), (-1.0, ggn)], name=hessian.name)

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """The Hessian's reference minus the GGN's, float64 [dim, dim]."""
        return HessianOperator.reference(problem, x, y) - GGNOperator.reference(problem, x, y)

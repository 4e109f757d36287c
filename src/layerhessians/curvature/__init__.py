"""Curvature operators of a model's mean loss: Hessian, GGN and residual products on one
shared first-order graph, dense float64 references, memory planning and layer blocks.

- :func:`hessian_operator` -> :class:`CurvatureOperator` (``.dim``, ``.matvec``, ``.matmat``)
- :func:`dense_matrix`, :func:`reference_matrix`: float64 references for small problems
- :func:`layer_blocks`: the weight of every Conv2d/Linear, the paper's "layers"
- :func:`plan_memory` -> :class:`MemoryPlan`, :func:`split_batches`
"""

from layerhessians.curvature.attention import math_attention
from layerhessians.curvature.blocks import (
    BLOCK_TYPES,
    LAYER_TYPES,
    block_dims,
    layer_blocks,
    select_blocks,
)
from layerhessians.curvature.dense import MAX_DENSE_DIM, dense_matrix, reference_matrix
from layerhessians.curvature.memory import (
    GraphCost,
    MemoryPlan,
    choose_reorthogonalize,
    measure_graph_cost,
    memory_budget,
    plan_memory,
    split_batches,
)
from layerhessians.curvature.operators import (
    BN_MODES,
    KINDS,
    CurvatureGraph,
    CurvatureOperator,
    MatrixOperator,
    Reduction,
    hessian_operator,
)

__all__ = [
    "BN_MODES",
    "KINDS",
    "LAYER_TYPES",
    "MAX_DENSE_DIM",
    "CurvatureGraph",
    "CurvatureOperator",
    "GraphCost",
    "MatrixOperator",
    "MemoryPlan",
    "Reduction",
    "choose_reorthogonalize",
    "dense_matrix",
    "hessian_operator",
    "layer_blocks",
    "measure_graph_cost",
    "memory_budget",
    "plan_memory",
    "reference_matrix",
    "split_batches",
]
__all__ += ["BLOCK_TYPES", "block_dims", "math_attention", "select_blocks"]  # blocks, attention

"""Curvature operators of a model's mean loss: the Hessian, the generalized Gauss-Newton
matrix (GGN), the residual H - G and the empirical Fisher, as linear operators on one shared
first-order graph; dense float64 references, memory planning and layer blocks.

- :func:`hessian_operator` -> a :class:`CurvatureOperator` of the chosen kind (:data:`KINDS`)
  with ``.dim``, ``.matvec``, ``.matmat``, ``@``, ``.to_scipy()`` and arithmetic (``H - G``)
- :class:`CurvatureGraph` (built for kinds by :func:`curvature_graph`), :class:`Reduction`,
  :class:`BatchLoss` (a loss ``fn(model, batch)``), :func:`batch_coupling` (whether splitting
  the data changes the operator), :class:`NonFiniteError`
- :func:`dense_matrix`, :func:`reference_matrix`: float64 references for small problems
- :func:`layer_blocks`: the weight of every Conv2d/Linear, the paper's "layers";
  :func:`select_blocks`: blocks by module type, name pattern or mapping (leaf parameters)
- :func:`math_attention`: the twice-differentiable attention path of every engine forward
- :func:`measure_graph_cost`, :func:`memory_budget`, :func:`split_batches` (the memory
  plan of a spectra computation is :func:`layerhessians.spectra.plan.plan_memory`)
"""

from layerhessians.curvature.attention import math_attention
from layerhessians.curvature.base import (
    CurvatureOperator,
    LinearCombination,
    SymmetricOperator,
)
from layerhessians.curvature.batches import BatchLoss, Reduction
from layerhessians.curvature.blocks import (
    BLOCK_TYPES,
    LAYER_TYPES,
    block_dims,
    layer_blocks,
    select_blocks,
)
from layerhessians.curvature.conv_double_backward import CONV_DOUBLE_BACKWARDS
from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.dense import MAX_DENSE_DIM, dense_matrix, reference_matrix
from layerhessians.curvature.ef import EmpiricalFisherOperator
from layerhessians.curvature.ggn import GGNOperator
from layerhessians.curvature.graph import CurvatureGraph, NonFiniteError
from layerhessians.curvature.hessian import HessianOperator
from layerhessians.curvature.kinds import (
    KIND_CLASSES,
    KINDS,
    curvature_graph,
    hessian_operator,
    kind_class,
)
from layerhessians.curvature.loss_reduction import LOSS_REDUCTIONS
from layerhessians.curvature.matrix import MatrixOperator
from layerhessians.curvature.memory import (
    GraphCost,
    measure_graph_cost,
    memory_budget,
    split_batches,
)
from layerhessians.curvature.residual import ResidualOperator
from layerhessians.vocabulary import BN_MODES

__all__ = [
    "BN_MODES",
    "BLOCK_TYPES",
    "LOSS_REDUCTIONS",
    "BatchLoss",
    "NonFiniteError",
    "batch_coupling",
    "as_batches",  # the next three: shared with layerhessians.regularization
    "engine_modes",
    "loss_reduction_of",
    "CONV_DOUBLE_BACKWARDS",
    "KINDS",
    "KIND_CLASSES",
    "LAYER_TYPES",
    "MAX_DENSE_DIM",
    "CurvatureGraph",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "GraphCost",
    "HessianOperator",
    "LinearCombination",
    "MatrixOperator",
    "Reduction",
    "ResidualOperator",
    "SymmetricOperator",
    "block_dims",
    "curvature_graph",
    "dense_matrix",
    "hessian_operator",
    "kind_class",
    "layer_blocks",
    "math_attention",
    "measure_graph_cost",
    "memory_budget",
    "reference_matrix",
    "select_blocks",
    "split_batches",
]

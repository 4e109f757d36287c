"""The spectra engine: Hessian / GGN / residual operators, stochastic Lanczos quadrature,
exact spectra, traces, top eigenvalues, and full + layer-wise spectra in one pass.

- :func:`hessian_operator` -> :class:`CurvatureOperator` (``.dim``, ``.matvec``, ``.matmat``)
- :func:`slq` -> :class:`SpectralMeasure` (``.nodes``, ``.weights``, ``.density()``)
- :func:`exact_spectrum`, :func:`dense_matrix` (float64 references for small operators)
- :func:`top_eigenvalues`, :func:`hessian_trace`
- :func:`layer_spectra` -> ``{"full": measure, layer: measure, ...}``
- :func:`plan_memory` -> :class:`MemoryPlan` (micro-batches, graph reuse, re-orthogonalisation
  within a memory budget), :func:`split_batches`
"""

from layerhessians.hessian.exact import MAX_DENSE_DIM, dense_matrix, exact_spectrum, reference_matrix
from layerhessians.hessian.lanczos import (
    DISTRIBUTIONS,
    LanczosRun,
    lanczos,
    slq,
    slq_many,
    start_vector,
)
from layerhessians.hessian.layers import layer_operators, layer_spectra, operator_dims
from layerhessians.hessian.memory import (
    GraphCost,
    MemoryPlan,
    choose_reorthogonalize,
    measure_graph_cost,
    memory_budget,
    plan_memory,
    split_batches,
)
from layerhessians.hessian.measure import SpectralMeasure, concatenate_rows, papyan_sigma
from layerhessians.hessian.operators import (
    BN_MODES,
    KINDS,
    CurvatureGraph,
    CurvatureOperator,
    MatrixOperator,
    Reduction,
    hessian_operator,
)
from layerhessians.hessian.trace import TraceEstimate, hessian_trace, top_eigenvalues

__all__ = [
    "BN_MODES",
    "DISTRIBUTIONS",
    "KINDS",
    "MAX_DENSE_DIM",
    "CurvatureGraph",
    "CurvatureOperator",
    "GraphCost",
    "LanczosRun",
    "MatrixOperator",
    "MemoryPlan",
    "Reduction",
    "SpectralMeasure",
    "TraceEstimate",
    "choose_reorthogonalize",
    "concatenate_rows",
    "dense_matrix",
    "exact_spectrum",
    "hessian_operator",
    "hessian_trace",
    "lanczos",
    "layer_operators",
    "layer_spectra",
    "measure_graph_cost",
    "memory_budget",
    "operator_dims",
    "papyan_sigma",
    "plan_memory",
    "reference_matrix",
    "slq",
    "slq_many",
    "split_batches",
    "start_vector",
    "top_eigenvalues",
]

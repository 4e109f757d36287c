"""Spectra of curvature operators: the Lanczos recurrence, stochastic Lanczos quadrature
(SLQ), spectral measures, exact spectra of small operators, trace and top-eigenvalue
estimators, and the full plus layer-wise spectra of a model in one pass.

- :func:`slq` -> :class:`SpectralMeasure` (``.nodes``, ``.weights``, ``.density()``)
- :class:`LanczosRecurrence`, :func:`lanczos` -> :class:`LanczosRun`
- :func:`exact_spectrum` (float64 ``eigvalsh`` of a small operator)
- :func:`top_eigenvalues`, :func:`hessian_trace`
- :func:`layer_spectra` -> ``{"full": measure, layer: measure, ...}``;
  :func:`measure_layer_spectra` (the same from a :class:`~layerhessians.settings.SpectraSettings`)
- :func:`plan_memory` -> :class:`MemoryPlan` (Lanczos bases and graphs in one budget)
- :func:`slq_fidelity` (SLQ's error on the exact layer blocks)
- :func:`exact_layer_spectra`, :func:`exact_ggn_spectrum`: the exact (Gram) route for
  layer blocks
"""

from layerhessians.spectra.estimators import (
    TraceEstimate,
    hessian_trace,
    top_eigenvalues,
)
from layerhessians.spectra.exact import exact_spectrum
from layerhessians.spectra.exact_layers import exact_ggn_spectrum, exact_layer_spectra
from layerhessians.spectra.fidelity import relative_w1, slq_fidelity
from layerhessians.spectra.lanczos import LanczosRecurrence, LanczosRun, lanczos
from layerhessians.spectra.layers import (
    layer_operators,
    layer_spectra,
    measure_layer_spectra,
    operator_dims,
)
from layerhessians.spectra.measure import (
    SpectralMeasure,
    concatenate_rows,
    papyan_sigma,
)
from layerhessians.spectra.plan import MemoryPlan, choose_reorthogonalize, plan_memory
from layerhessians.spectra.slq import (
    DEFAULT_DISTRIBUTION,
    DISTRIBUTIONS,
    slq,
    slq_many,
    start_vector,
)

__all__ = [
    "DEFAULT_DISTRIBUTION",
    "DISTRIBUTIONS",
    "LanczosRecurrence",
    "LanczosRun",
    "MemoryPlan",
    "SpectralMeasure",
    "TraceEstimate",
    "choose_reorthogonalize",
    "concatenate_rows",
    "exact_ggn_spectrum",
    "exact_layer_spectra",
    "exact_spectrum",
    "hessian_trace",
    "lanczos",
    "layer_operators",
    "layer_spectra",
    "measure_layer_spectra",
    "operator_dims",
    "papyan_sigma",
    "plan_memory",
    "relative_w1",
    "slq",
    "slq_fidelity",
    "slq_many",
    "start_vector",
    "top_eigenvalues",
]

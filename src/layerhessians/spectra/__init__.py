"""Spectra of curvature operators: the Lanczos recurrence, stochastic Lanczos quadrature
(SLQ), spectral measures, exact spectra of small operators, trace and top-eigenvalue
estimators, and the full plus layer-wise spectra of a model in one pass.

- :func:`slq` -> :class:`SpectralMeasure` (``.nodes``, ``.weights``, ``.density()``)
- :class:`LanczosRecurrence`, :func:`lanczos` -> :class:`LanczosRun`
- :func:`exact_spectrum` (float64 ``eigvalsh`` of a small operator)
- :func:`top_eigenvalues`, :func:`hessian_trace`
- :func:`layer_spectra` -> ``{"full": measure, layer: measure, ...}``
- :func:`exact_layer_spectra`, :func:`exact_ggn_spectrum`, :func:`slq_fidelity`: the exact
  (Gram) route for layer blocks, and SLQ's error against it
"""

from layerhessians.spectra.estimators import (
    TraceEstimate,
    hessian_trace,
    top_eigenvalues,
)
from layerhessians.spectra.exact import exact_spectrum
from layerhessians.spectra.exact_layers import (
    exact_ggn_spectrum,
    exact_layer_spectra,
    slq_fidelity,
)
from layerhessians.spectra.lanczos import LanczosRecurrence, LanczosRun, lanczos
from layerhessians.spectra.layers import layer_operators, layer_spectra, operator_dims
from layerhessians.spectra.measure import (
    SpectralMeasure,
    concatenate_rows,
    papyan_sigma,
)
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
    "SpectralMeasure",
    "TraceEstimate",
    "concatenate_rows",
    "exact_ggn_spectrum",
    "exact_layer_spectra",
    "exact_spectrum",
    "hessian_trace",
    "lanczos",
    "layer_operators",
    "layer_spectra",
    "operator_dims",
    "papyan_sigma",
    "slq",
    "slq_fidelity",
    "slq_many",
    "start_vector",
    "top_eigenvalues",
]

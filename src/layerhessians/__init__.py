"""LayerHessians: full and layer-wise Hessian eigenspectra of deep networks through training.

The public API is imported lazily so that ``layerhessians --version`` stays fast:

- models: :func:`build_model`; blocks: :func:`layer_blocks`, :func:`select_blocks`
- curvature: :func:`hessian_operator` (kinds :data:`KINDS`), :func:`math_attention`
- spectra: :func:`slq`, :func:`exact_spectrum`, :func:`top_eigenvalues`, :func:`hessian_trace`,
  :func:`layer_spectra`, :class:`SpectralMeasure`
- run store: :func:`load_run`
- your own loop: :class:`SpectraTracker`
- analysis: :data:`DISTANCES` (named distances between spectra), :func:`spectrum_distance`
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "build_model": "layerhessians.models",
    "layer_blocks": "layerhessians.models",
    "select_blocks": "layerhessians.curvature",
    "hessian_operator": "layerhessians.curvature",
    "KINDS": "layerhessians.curvature",
    "math_attention": "layerhessians.curvature",
    "slq": "layerhessians.spectra",
    "exact_spectrum": "layerhessians.spectra",
    "top_eigenvalues": "layerhessians.spectra",
    "hessian_trace": "layerhessians.spectra",
    "layer_spectra": "layerhessians.spectra",
    "SpectralMeasure": "layerhessians.spectra",
    "load_run": "layerhessians.store.reader",
    "SpectraTracker": "layerhessians.tracking",
    "DISTANCES": "layerhessians.analysis.distances",
    "spectrum_distance": "layerhessians.analysis.distances",
    "UserError": "layerhessians.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'layerhessians' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_API})

"""Spectra in your own training loop: :class:`SpectraTracker` (full and per-block spectra
of any model, recorded as a run directory that ``load_run``, ``plot`` and ``match`` read)
and the scalars it sends to loggers (:func:`spectra_scalars`)."""

from layerhessians.tracking.scalars import spectra_scalars, top_ritz_value
from layerhessians.tracking.tracker import UNITS, SpectraTracker

__all__ = ["UNITS", "SpectraTracker", "spectra_scalars", "top_ritz_value"]

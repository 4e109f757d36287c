"""The exact spectrum of a small operator: float64 ``eigvalsh`` of its dense matrix."""

from __future__ import annotations

import numpy as np
import torch

from layerhessians.curvature.dense import MAX_DENSE_DIM, dense_matrix
from layerhessians.spectra.lanczos import SYMMETRY_RTOL, check_symmetric
from layerhessians.spectra.measure import SpectralMeasure

__all__ = ["exact_spectrum"]


def exact_spectrum(op, max_dim: int = MAX_DENSE_DIM,
                   check_symmetry: bool = True) -> SpectralMeasure:
    """All eigenvalues of ``op`` (float64 ``eigvalsh`` of :func:`dense_matrix`), as a
    :class:`SpectralMeasure` with one row: nodes = the ``dim`` eigenvalues (ascending), each
    of weight ``1 / dim``. Interchangeable with an SLQ measure downstream.

    Like every estimator it first runs the symmetry and finiteness probe
    (:func:`~layerhessians.spectra.lanczos.check_symmetric`, two products; skipped with
    ``check_symmetry=False``).

    Raises:
        UserError: a non-symmetric operator (the message names what was detected), or
            ``dim > max_dim``.
        NonFiniteError: NaN or infinite entries.
    """
    if check_symmetry:
        check_symmetric([op])
    rtol = SYMMETRY_RTOL.get(getattr(op, "dtype", torch.float64), 5e-2) if check_symmetry \
        else float("inf")
    matrix = dense_matrix(op, max_dim=max_dim, symmetry_rtol=rtol)
    eigenvalues = torch.linalg.eigvalsh(matrix).cpu().numpy()
    dim = eigenvalues.size
    return SpectralMeasure(eigenvalues[None, :], np.full((1, dim), 1.0 / dim), dim=dim,
                            method="exact")

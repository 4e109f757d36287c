"""The spread and the baseline of a layer-to-full distance: how a measure is resampled
(:func:`spread_method`, :func:`resample`; see :mod:`layerhessians.analysis.matching` for
the bootstrap they serve) and the block-diagonal baseline (:func:`block_diagonal_mixture`:
the parameter-weighted mixture of the blocks' measures)."""

from __future__ import annotations

import numpy as np

from layerhessians.errors import UserError
from layerhessians.spectra.measure import SpectralMeasure

__all__ = ["BlockMixture", "block_diagonal_mixture", "resample", "spread_method"]


def spread_method(measure) -> str:
    """How :func:`resample` redraws ``measure``: ``"exact"``, ``"vectors(V)"``,
    ``"dirichlet"`` or ``"none"`` (see the module docstring)."""
    if getattr(measure, "method", "slq") == "exact":
        return "exact"
    if measure.num_vectors >= 2:
        return f"vectors({measure.num_vectors})"
    return "dirichlet" if getattr(measure, "dim", None) else "none"


def resample(measure, rng: np.random.Generator):
    """One bootstrap draw of ``measure`` (a :class:`SpectralMeasure`), by
    :func:`spread_method`: the measure itself if exact, a new measure otherwise, ``None``
    when there is no noise model."""
    how = spread_method(measure)
    if how == "exact":
        return measure
    if how == "none":
        return None
    if how != "dirichlet":
        rows = [measure.per_vector[i] for i in rng.integers(0, measure.num_vectors,
                                                           measure.num_vectors)]
        return SpectralMeasure([n for n, _ in rows], [w for _, w in rows], dim=measure.dim)
    nodes, weights = measure.per_vector[0]
    draw = rng.gamma(np.maximum(measure.dim * weights / 2.0, 1e-300))
    draw = np.maximum(draw, np.finfo(np.float64).tiny)  # keep every Ritz value in the support
    return SpectralMeasure(nodes, draw / draw.sum(), dim=measure.dim)


# ----------------------------------------------------------------------------- baseline
class BlockMixture(SpectralMeasure):
    """The mixture ``sum_b s_b mu_b`` of block measures (shares ``s_b`` summing to 1).

    ``nodes``/``weights`` are the components' concatenated with weights ``s_b * w``; its
    :meth:`density` is the same mixture of the components' densities (each with its own
    kernel width), so the paper's metric sees the mixture of the curves it would plot.
    """

    def __init__(self, components, shares, dim: int | None = None):
        shares = np.asarray(shares, np.float64)
        nodes = np.concatenate([c.nodes for c in components])
        weights = np.concatenate([s * c.weights for c, s in zip(components, shares)])
        super().__init__(nodes, weights / weights.sum(), dim=dim)
        self.components, self.shares = list(components), shares

    def density(self, points: int = 1024, sigma=None, grid=None, margin: float = 0.05):
        """Gaussian-smoothed density of the mixture: ``sum_b s_b`` times each component's density.

        Args:
            points: number of grid points (ignored when ``grid`` is given).
            sigma: kernel width in eigenvalue units for every component; ``None``: each component's
                own default width (:meth:`SpectralMeasure.density`).
            grid: explicit 1-D grid (eigenvalue units); default ``points`` points over the
                mixture's support widened by ``margin`` times its span on each side.
            margin: relative widening of the support for the default grid.

        Returns:
            ``(grid, density)``: float64 arrays [points] (or the given grid's length); the
            components' densities on the common grid are not renormalised.
        """
        if grid is None:
            low, high = self.support
            span = high - low if high > low else (abs(low) or 1.0)
            grid = np.linspace(low - margin * span, high + margin * span, int(points))
        grid = np.asarray(grid, np.float64)
        return grid, sum(s * c.density(grid=grid, sigma=sigma)[1]
                         for c, s in zip(self.components, self.shares))


def block_diagonal_mixture(measures, dims) -> BlockMixture:
    """Spectrum of the block-diagonal part of a Hessian from its blocks' spectra.

    For a symmetric matrix with diagonal blocks ``H_b`` of sizes ``d_b`` (``D = sum d_b``),
    the block-diagonal matrix ``diag(H_1, ..., H_B)`` has the eigenvalues of all blocks, so
    its spectral measure is ``sum_b (d_b / D) mu_b``.

    Args:
        measures: sequence of B spectral measures (``.nodes``, ``.weights``).
        dims: sequence of B positive block sizes (parameters per block).

    Returns:
        A :class:`BlockMixture` with ``dim = D``.

    Raises:
        UserError: lengths differ, no blocks, or a size is not positive.
    """
    measures, dims = list(measures), [int(d) for d in dims]
    if not measures or len(measures) != len(dims) or min(dims) <= 0:
        raise UserError("a block-diagonal mixture needs one positive size per block measure")
    total = sum(dims)
    return BlockMixture(measures, [d / total for d in dims], dim=total)

"""SpectralMeasure: a discrete spectral measure (eigenvalue nodes and weights), from SLQ or
from an exact eigen-decomposition, and its smoothed density."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from layerhessians.errors import UserError

__all__ = ["SpectralMeasure", "papyan_sigma", "w1"]

_WEIGHT_SUM_TOL = 1e-6
_KAPPA = 1.25  # Papyan's kernel constant: sigma = h / sqrt(8 ln kappa)


def papyan_sigma(steps: int, low: float, high: float) -> float:
    """Papyan's Gaussian width on the real axis, in eigenvalue units.

    The interval ``[low, high]`` is mapped to ``[-1, 1]``; there the width is
    ``h / sqrt(8 ln 1.25)`` with ``h = 2 / (steps - 1)`` (``steps`` = Lanczos steps, i.e. nodes
    per vector; ``h = 2`` for one step), mapped back by the factor ``(high - low) / 2``.
    """
    h = 2.0 / max(steps - 1, 1)
    return h / math.sqrt(8.0 * math.log(_KAPPA)) * (high - low) / 2.0


def _rows(values, what: str) -> list[np.ndarray]:
    if isinstance(values, np.ndarray) or np.isscalar(values):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim == 1:
            return [array]
        if array.ndim == 2:
            return [row for row in array]
        raise UserError(f"{what} must be 1-D, 2-D [vectors, nodes] or a list of 1-D arrays")
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    if rows and rows[0].ndim == 0:
        return [np.asarray(rows, dtype=np.float64)]
    if any(row.ndim != 1 for row in rows):
        raise UserError(f"{what} must be 1-D, 2-D [vectors, nodes] or a list of 1-D arrays")
    return rows


class SpectralMeasure:
    """A spectral measure: per random vector, eigenvalue nodes and weights summing to 1.

    Args:
        nodes: [V, K] array (or a list of V 1-D arrays, possibly of different lengths after a
            Lanczos breakdown; or one 1-D array for V = 1), eigenvalue locations.
        weights: same shapes, non-negative, each row summing to 1 (within 1e-6; rows are
            renormalised exactly). NaN nodes are allowed only with weight 0 (padding) and
            are dropped.
        dim: size of the operator (optional; gives :meth:`trace`).
        method: how it was computed (``"slq"``, ``"exact"``), or ``None`` when unknown.

    Attributes:
        nodes, weights: flattened float64 arrays of the averaged measure (row weights / V,
            so ``weights.sum() == 1``).
        per_vector: list of V ``(nodes, weights)`` pairs, each weight row summing to 1.
        dim: the operator's size or ``None``.
        method: how it was computed where known (``"slq"``, ``"exact"``), else ``None``.
    """

    method: str | None = None

    def __init__(self, nodes, weights, dim: int | None = None, method: str | None = None):
        node_rows, weight_rows = _rows(nodes, "nodes"), _rows(weights, "weights")
        if not node_rows or len(node_rows) != len(weight_rows):
            raise UserError("nodes and weights must have the same, non-zero number of rows")
        per_vector = []
        for node, weight in zip(node_rows, weight_rows):
            if node.shape != weight.shape:
                raise UserError("nodes and weights must have the same shape in every row")
            padding = np.isnan(node) & (weight == 0)
            node, weight = node[~padding], weight[~padding]
            if node.size == 0 or not np.all(np.isfinite(node)) or not np.all(np.isfinite(weight)):
                raise UserError("every row of a spectral measure needs finite nodes and weights")
            if np.any(weight < -_WEIGHT_SUM_TOL):
                raise UserError("spectral measure weights must be non-negative")
            weight = np.clip(weight, 0.0, None)
            total = weight.sum()
            if abs(total - 1.0) > _WEIGHT_SUM_TOL:
                raise UserError(f"the weights of each vector must sum to 1; got {total:.6g}")
            per_vector.append((node.copy(), weight / total))
        self.per_vector = per_vector
        self.dim = None if dim is None else int(dim)
        self.method = None if method is None else str(method)
        count = len(per_vector)
        self.nodes = np.concatenate([n for n, _ in per_vector])
        self.weights = np.concatenate([w for _, w in per_vector]) / count

    # -- summaries
    @property
    def num_vectors(self) -> int:
        """Number of random start vectors (rows of ``per_vector``)."""
        return len(self.per_vector)

    @property
    def steps(self) -> int:
        """Most nodes in one row (the number of Lanczos steps for an SLQ measure)."""
        return max(n.size for n, _ in self.per_vector)

    @property
    def support(self) -> tuple[float, float]:
        """(smallest node, largest node)."""
        return float(self.nodes.min()), float(self.nodes.max())

    def mean(self) -> float:
        """First moment ``sum w * lambda``: an estimate of ``trace / dim``."""
        return float(np.dot(self.weights, self.nodes))

    def moments(self, k: int) -> np.ndarray:
        """Raw moments: array [k + 1] with ``m[j] = sum w * lambda**j`` (``m[0] = 1``)."""
        if k < 0:
            raise UserError("moments(k) needs k >= 0")
        return np.array([np.dot(self.weights, self.nodes ** j) for j in range(k + 1)])

    def trace(self) -> float:
        """``dim * mean()``: the trace estimate (needs ``dim``)."""
        if self.dim is None:
            raise UserError("this spectral measure has no dim; pass dim= to compute a trace")
        return self.dim * self.mean()

    # -- density
    def density(self, points: int = 1024, sigma: float | None = None, grid=None,
                margin: float = 0.05, normalize: bool | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-smoothed density on the real eigenvalue axis (Papyan's smoothing).

        Args:
            points: number of grid points (ignored when ``grid`` is given).
            sigma: kernel width in eigenvalue units. Default (Papyan's rule, as in the
                original code): map ``[lo, hi]`` = support widened by ``margin * (max - min)``
                on each side to ``[-1, 1]``; there ``sigma = h / sqrt(8 ln 1.25)`` with
                ``h = 2 / (K - 1)`` and ``K`` = :attr:`steps`; map back (times
                ``(hi - lo) / 2``). A measure whose nodes all coincide uses a span of
                ``|node|`` (or 1 for 0) in place of ``max - min``.
            grid: explicit 1-D grid (eigenvalue units); default ``linspace(lo, hi, points)``.
            margin: relative widening of the support for the default grid and sigma.
            normalize: divide by the trapezoid integral over the returned grid, so the
                density integrates to 1 there. Default: ``True`` for the default grid,
                ``False`` for an explicit ``grid`` (values as given by the formula below;
                mass outside it is lost). Needs a strictly increasing grid of >= 2 points.

        Returns:
            ``(grid, density)``: float64 arrays [points]; ``density = c * sum_i w_i
            N(grid; node_i, sigma^2)`` with ``c = 1`` or, when normalising, ``c`` = one over
            the trapezoid integral of the sum over the grid. With few nodes Papyan's width
            is wide (for ``K = 2``, 0.75 of the widened support), so a large part of the
            Gaussians' mass lies outside ``[lo, hi]``; one constant folds it back, which
            leaves the curve's shape, and so the paper's matching distance, unchanged.

        Raises:
            UserError: ``sigma <= 0``, fewer than 2 points, or ``normalize`` on a grid that
                is not strictly increasing or has no mass.
        """
        low, high = self.support
        span = high - low
        if span <= 0:
            span = abs(low) if low != 0 else 1.0
        low, high = low - margin * span, high + margin * span
        if sigma is None:
            sigma = papyan_sigma(self.steps, low, high)
        if not sigma > 0:
            raise UserError(f"sigma must be positive; got {sigma!r}")
        if normalize is None:
            normalize = grid is None
        if grid is None:
            if int(points) < 2:
                raise UserError("density needs at least 2 grid points")
            grid = np.linspace(low, high, int(points))
        grid = np.asarray(grid, dtype=np.float64).reshape(-1)
        density = np.zeros_like(grid)
        norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
        chunk = max(1, 2_000_000 // max(grid.size, 1))
        for start in range(0, self.nodes.size, chunk):
            nodes = self.nodes[start:start + chunk]
            weights = self.weights[start:start + chunk]
            z = (grid[:, None] - nodes[None, :]) / sigma
            density += np.exp(-0.5 * z * z) @ weights
        density *= norm
        if normalize:
            if grid.size < 2 or not np.all(np.diff(grid) > 0):
                raise UserError("normalize=True needs a strictly increasing grid of at least "
                                "2 points")
            mass = float(np.trapezoid(density, grid))
            if not mass > 0:
                raise UserError("the density has no mass on this grid: widen the grid or "
                                "pass normalize=False")
            density /= mass
        return grid, density

    # -- tables
    def to_frame(self) -> pd.DataFrame:
        """Long table with columns ``vector`` (int), ``node``, ``weight`` (within the vector,
        summing to 1 per vector); :meth:`from_frame` inverts it."""
        parts = [pd.DataFrame({"vector": np.full(n.size, v, dtype=np.int64), "node": n,
                               "weight": w}) for v, (n, w) in enumerate(self.per_vector)]
        return pd.concat(parts, ignore_index=True)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, dim: int | None = None) -> "SpectralMeasure":
        """The measure stored by :meth:`to_frame` (vectors in increasing ``vector`` order)."""
        missing = {"vector", "node", "weight"} - set(frame.columns)
        if missing:
            raise UserError(f"a spectral table needs columns vector, node, weight; "
                            f"missing {', '.join(sorted(missing))}")
        if len(frame) == 0:
            raise UserError("the spectral table is empty")
        groups = [g for _, g in frame.groupby("vector", sort=True)]
        return cls([g["node"].to_numpy(np.float64) for g in groups],
                   [g["weight"].to_numpy(np.float64) for g in groups], dim=dim)

    def __repr__(self) -> str:
        low, high = self.support
        return (f"SpectralMeasure(vectors={self.num_vectors}, steps={self.steps}, "
                f"support=[{low:.4g}, {high:.4g}], dim={self.dim})")


def concatenate_rows(measures: Sequence[SpectralMeasure]) -> SpectralMeasure:
    """One measure with the vector rows of all ``measures`` (e.g. runs with more vectors)."""
    rows = [row for m in measures for row in m.per_vector]
    dims = {m.dim for m in measures}
    methods = {m.method for m in measures}
    return SpectralMeasure([n for n, _ in rows], [w for _, w in rows],
                           dim=dims.pop() if len(dims) == 1 else None,
                           method=methods.pop() if len(methods) == 1 else None)


def w1(nodes_a, weights_a, nodes_b, weights_b) -> float:
    """The 1-Wasserstein distance ``int |F_a(x) - F_b(x)| dx`` between two weighted point
    sets (e.g. spectral measures' nodes and quadrature weights; any shape, flattened), by
    :func:`scipy.stats.wasserstein_distance`: the one W1 of the package. Unit: the nodes'."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.ravel(nodes_a), np.ravel(nodes_b), np.ravel(weights_a),
                                      np.ravel(weights_b)))

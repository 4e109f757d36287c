"""Bootstrap draws of spectral measures held as one weight matrix, and the distances of all
draws at once.

A measure resampled by Dirichlet weights at fixed Ritz values (``spread_method ==
"dirichlet"``), an exact measure (not resampled) and their block mixtures keep their
nodes from draw to draw: only the weights change. :class:`Draws` holds such a measure's
``B`` draws as nodes ``[n]`` and weights ``[n, B]`` (one column per draw; ``[n, 1]`` for a
measure that is the same in every draw), so that a distance of all draws is a few array
operations instead of ``B`` calls (:func:`batched_distance`):

- the paper metric's densities are one matrix product ``K @ W`` with the Gaussian kernel
  matrix ``K [points, n]`` of the measure's grid and width (the grid, the width and so ``K``
  depend on the nodes only), its transform works on all columns, and the 1-Wasserstein
  distance of two equal-size unweighted samples is the mean absolute difference of the
  sorted samples;
- the W1 entries sort the union of the two node sets once and take the cumulative weights of
  all columns together.

Each column gives the number the per-draw computation
(:meth:`~layerhessians.spectra.measure.SpectralMeasure.density`,
:func:`~layerhessians.analysis.distances.paper_transform`,
``scipy.stats.wasserstein_distance``) gives for that draw's measure, up to rounding (a test
compares them). Distances without a batched form return ``None`` (the caller loops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from layerhessians.analysis.distances import PAPER_POINTS, ZERO_TOL, normalize_nodes
from layerhessians.spectra.measure import papyan_sigma

#: W1 registry entries with a batched form: name -> (axis, nonzero part only)
W1_ENTRIES = {"w1-maxabs": ("maxabs", False), "w1-maxabs-nonzero": ("maxabs", True),
              "w1-minmax": ("minmax", False), "w1-raw": ("none", False)}


@dataclass
class Draws:
    """``B`` draws of a measure with fixed nodes.

    Attributes:
        nodes: float64 [n] (every node of the measure, as ``SpectralMeasure.nodes``).
        weights: float64 [n, B] or [n, 1]; each column sums to 1.
        steps: nodes per SLQ vector (the kernel width's ``K``, as ``SpectralMeasure.steps``).
        components: for a block mixture, ``[(Draws, share)]`` (its density is the shares'
            mixture of the components' own densities, as ``BlockMixture.density``).
    """

    nodes: np.ndarray
    weights: np.ndarray
    steps: int
    components: list = field(default_factory=list)

    @property
    def support(self) -> tuple:
        """(smallest node, largest node), as ``SpectralMeasure.support``."""
        return float(self.nodes.min()), float(self.nodes.max())


def fixed_draws(measure) -> Draws:
    """The draws of a measure that is not resampled (an exact spectrum): one column."""
    return Draws(np.asarray(measure.nodes, np.float64),
                 np.asarray(measure.weights, np.float64)[:, None], measure.steps)


def mixture_draws(parts, dims) -> Draws:
    """The block-diagonal mixture (shares ``d_b / D``) of the parts' draws, column by column
    (:func:`~layerhessians.analysis.matching.block_diagonal_mixture`)."""
    dims = np.asarray([int(d) for d in dims], np.float64)
    shares = dims / dims.sum()
    count = max(p.weights.shape[1] for p in parts)
    nodes = np.concatenate([p.nodes for p in parts])
    weights = np.vstack([s * np.broadcast_to(p.weights, (p.nodes.size, count))
                         for p, s in zip(parts, shares)])
    weights = weights / weights.sum(axis=0, keepdims=True)
    return Draws(nodes, weights, max(p.steps for p in parts), list(zip(parts, shares)))


# ----------------------------------------------------------------------------- densities
#: |z| beyond which exp(-z^2 / 2) is exactly 0.0 in float64 (underflow below 5e-324)
_Z_ZERO = 38.7


def _kernel(draws: Draws, grid, sigma=None):
    """``norm * exp(-z^2 / 2)`` [n, points] of ``draws``' nodes on the uniform ``grid`` (its
    own width): dense, or sparse (scipy CSR) when most entries underflow to exactly 0 (a
    narrow width: many nodes), holding every entry that does not."""
    if sigma is None:
        low, high = draws.support
        span = high - low
        if span <= 0:
            span = abs(low) if low != 0 else 1.0
        sigma = papyan_sigma(draws.steps, low - 0.05 * span, high + 0.05 * span)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    nodes, count = draws.nodes, grid.size
    step = (grid[-1] - grid[0]) / (count - 1) if count > 1 else 0.0
    band = 2 * _Z_ZERO * sigma / step + 3 if step > 0 else count
    if band > 0.3 * count:
        z = (grid[None, :] - nodes[:, None]) / sigma
        return np.exp(-0.5 * z * z) * norm
    from scipy.sparse import csr_matrix

    first = np.clip(np.floor((nodes - _Z_ZERO * sigma - grid[0]) / step).astype(np.int64) - 1,
                    0, count)
    last = np.clip(np.ceil((nodes + _Z_ZERO * sigma - grid[0]) / step).astype(np.int64) + 2,
                   0, count)
    sizes = last - first
    rows = np.repeat(np.arange(nodes.size), sizes)
    starts = np.repeat(first - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    cols = starts + np.arange(rows.size)
    z = (grid[cols] - nodes[rows]) / sigma
    return csr_matrix((np.exp(-0.5 * z * z) * norm, (rows, cols)), shape=(nodes.size, count))


def _product(weights, kernel):
    """``weights.T @ kernel`` [B, points] for a dense or sparse ``kernel`` [n, points]."""
    if isinstance(kernel, np.ndarray):
        return weights.T @ kernel
    return np.asarray((kernel.T @ weights).T)


def _grid(draws: Draws, points: int):
    low, high = draws.support
    span = high - low
    if span <= 0:
        span = abs(low) if low != 0 else 1.0
    return np.linspace(low - 0.05 * span, high + 0.05 * span, int(points))


def densities(draws: Draws, points: int = PAPER_POINTS, normalize: bool = True) -> np.ndarray:
    """Each draw's density on the measure's default grid [B, points] (as
    ``SpectralMeasure.density(points)``, normalised by the trapezoid rule unless
    ``normalize`` is false (the paper's transform ignores a constant factor); a mixture's
    as ``BlockMixture.density(points)``, the components' own widths, not normalised)."""
    grid = _grid(draws, points)
    if draws.components:
        return sum(s * _product(c.weights, _kernel(c, grid)) for c, s in draws.components)
    density = _product(draws.weights, _kernel(draws, grid))
    if not normalize:
        return density
    return density / np.trapezoid(density, grid, axis=1)[:, None]


def paper_transforms(density) -> np.ndarray:
    """:func:`~layerhessians.analysis.distances.paper_transform` of every row [B, P]."""
    d = np.asarray(density, np.float64)
    if not (d > 0).all():  # zeros -> the row's smallest positive value
        positive = np.where(d > 0, d, np.inf).min(axis=1, keepdims=True)
        d = np.where(d == 0, positive, d)
    p = np.log(d)
    lo, hi = p.min(axis=1, keepdims=True), p.max(axis=1, keepdims=True)
    flat = (hi == lo)[:, 0]
    p -= lo
    p /= np.where(hi > lo, hi - lo, 1.0)
    p /= np.where(flat, 1.0, p.sum(axis=1))[:, None]
    p[flat] = 1.0 / p.shape[1]
    return p


# ----------------------------------------------------------------------------- distances
def _w1_sorted(u, v) -> np.ndarray:
    """W1 of equal-size unweighted samples given sorted rows [B, P] (broadcast)."""
    return np.mean(np.abs(u - v), axis=1)


def _w1_weighted(u_nodes, u_weights, v_nodes, v_weights) -> np.ndarray:
    """``int |F_u - F_v|`` for every column of the weight matrices (broadcast to [., B])."""
    count = max(u_weights.shape[1], v_weights.shape[1])
    values = np.concatenate([u_nodes, v_nodes])
    order = np.argsort(values, kind="mergesort")
    deltas = np.diff(values[order])
    signed = np.vstack([np.broadcast_to(u_weights, (u_nodes.size, count)),
                        -np.broadcast_to(v_weights, (v_nodes.size, count))])[order]
    gap = np.cumsum(signed, axis=0)[:-1]
    return np.abs(gap).T @ deltas


def _w1_side(draws: Draws, axis: str, nonzero: bool):
    nodes, weights = draws.nodes, draws.weights
    keep = weights.max(axis=1) > 0  # as_measure drops zero-weight nodes
    nodes, weights = nodes[keep], weights[keep]
    if nonzero:
        small = np.abs(nodes) <= ZERO_TOL * np.abs(nodes).max()
        if small.all():
            return np.zeros(1), np.ones((1, 1))
        nodes, weights = nodes[~small], weights[~small]
    weights = weights / weights.sum(axis=0, keepdims=True)
    return normalize_nodes(nodes, axis), weights


def batched_distance(name: str, full: Draws, other: Draws, points: int = PAPER_POINTS,
                     cache: dict | None = None):
    """The distance ``name`` between every draw of ``full`` and of ``other`` (columns paired;
    a one-column side is the same in every draw).

    Args:
        name: a registry name (:data:`W1_ENTRIES` or ``"paper"``).
        full: the full spectrum's draws.
        other: a layer's (or the mixture's) draws.
        points: the paper metric's density grid.
        cache: optional dict reused across calls with the same ``full`` (its transform).

    Returns:
        float64 [B], or ``None`` when ``name`` has no batched form.
    """
    cache = {} if cache is None else cache
    if name == "paper":
        def transformed(draws):
            key = ("paper", id(draws), points)
            if key not in cache:
                cache[key] = (draws, np.sort(paper_transforms(densities(draws, points, False)),
                                              axis=1))
            return cache[key][1]

        return _w1_sorted(transformed(full), transformed(other))
    if name in W1_ENTRIES:
        axis, nonzero = W1_ENTRIES[name]
        key = ("w1", id(full), name)
        if key not in cache:
            cache[key] = (full, _w1_side(full, axis, nonzero))
        u_nodes, u_weights = cache[key][1]
        v_nodes, v_weights = _w1_side(other, axis, nonzero)
        return _w1_weighted(u_nodes, u_weights, v_nodes, v_weights)
    return None

"""Distances between spectral measures: a registry of named distances and its default.

A spectrum here is anything with ``.nodes`` and ``.weights`` (1-D float arrays, weights >= 0
summing to 1): a :class:`~layerhessians.spectra.SpectralMeasure` from SLQ (Ritz values and
quadrature weights) or an exact spectrum (every eigenvalue, or a zero atom plus the nonzero
ones). Each entry of :data:`DISTANCES` is a :class:`Distance`: a ``normalize`` step (measure
-> what is compared; the normalisation the distance needs) and a ``function`` on two
normalised measures. ``spectrum_distance(a, b, metric)`` applies one.

The default, ``"w1-maxabs"``, was chosen for these properties (each one is a test in
``tests/test_distances.py``):

- it compares **probability measures on the eigenvalue axis** (the 1-Wasserstein distance
  ``int |F_a - F_b| d lambda`` of the two cumulative distribution functions), not density
  values on a grid;
- it compares **shapes, not scales**: each spectrum is divided by its own largest
  ``|eigenvalue|`` (axis ``[-1, 1]``), so a positively scaled copy of a spectrum is at
  distance 0; the sign and the position of 0 are kept (eigenvalue 0 = flat direction,
  negative = non-convex direction), so a shift or a reflection is *not* free;
- it **depends on the layer**: against one full spectrum, measures built closer to it rank
  closer (for mixtures ``(1 - t) mu + t nu`` with the same largest ``|eigenvalue|`` the
  distance is exactly ``t * W1(mu, nu)``);
- it does **not** collapse for positive semi-definite layers against an indefinite full
  spectrum (the failure of the former default ``"w1-minmax"``, see below);
- the **mass at zero is part of the measure**: a block of dimension d measured on N
  examples and C classes has at least ``1 - N C / d`` of its mass at eigenvalue 0, and the
  default compares that mass like any other (a layer with more of its mass at 0 than the
  full spectrum is farther from it). SLQ cannot separate exact zeros from a cluster of tiny
  eigenvalues (the cluster becomes one Ritz value near 0, e.g. 2e-5 next to a largest
  eigenvalue of 21), and W1 is continuous in node positions, so no threshold is needed.
  ``"w1-maxabs-nonzero"`` compares the nonzero parts only (nodes with ``|lambda| <=``
  :data:`ZERO_TOL` ``* max |lambda|`` dropped, the rest renormalised): it answers "do the
  nonzero eigenvalues have the same shape", independent of the blocks' ranks, at the price
  of that threshold.

The other entries:

``"w1-minmax"`` (the former default; **degenerate**, kept to reproduce earlier output)
    W1 after mapping each measure's own support ``[min, max]`` to ``[0, 1]``. For a positive
    semi-definite layer (min ~0) against a full spectrum with negative eigenvalues, the
    large mass at 0 goes to 0 for the layer but to ``-lambda_min / (lambda_max -
    lambda_min)`` for the full spectrum, and that shift dominates W1: every layer gets
    (nearly) the same distance, a number set by the full spectrum alone.
``"w1-raw"``
    W1 on the raw eigenvalue axis (eigenvalue units): scale matters.
``"paper"``
    The original ``match_distros.py`` computation, reproduced exactly: each spectrum's
    density curve on 1024 grid points is log-transformed, min-max scaled and normalised to
    sum 1 (:func:`paper_transform`), and the two 1024-vectors are compared by
    ``scipy.stats.wasserstein_distance`` *as unweighted samples*. This ignores the
    eigenvalue axis (the grid), so it is not a distance between spectra; it is kept to show
    the original's numbers side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import wasserstein_distance

from layerhessians.errors import UserError

NORMALIZATIONS = ("minmax", "joint", "maxabs", "none")
PAPER_POINTS = 1024  # the original's density grid
ZERO_TOL = 1e-4  # "w1-maxabs-nonzero": |lambda| <= ZERO_TOL * max|lambda| counts as zero
DEFAULT_DISTANCE = "w1-maxabs"


# ----------------------------------------------------------------------------- measures
def as_measure(measure):
    """``(nodes, weights)`` float64 1-D arrays of a measure, zero-weight nodes dropped and
    the weights renormalised to sum 1.

    Raises:
        TypeError: ``measure`` has no ``.nodes``/``.weights``.
        ValueError: shapes differ, no nodes, non-finite values, or negative/zero weights.
    """
    try:
        nodes = np.asarray(measure.nodes, dtype=np.float64).ravel()
        weights = np.asarray(measure.weights, dtype=np.float64).ravel()
    except AttributeError:
        raise TypeError(f"expected a spectral measure with .nodes and .weights, got "
                        f"{type(measure).__name__}") from None
    if nodes.shape != weights.shape or nodes.size == 0:
        raise ValueError(f"a measure needs as many nodes as weights (>0), got {nodes.size} "
                         f"nodes and {weights.size} weights")
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        raise ValueError("a measure's nodes and weights must be finite")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("a measure's weights must be >= 0 with a positive sum")
    keep = weights > 0
    return nodes[keep], weights[keep] / weights[keep].sum()


def _affine_to_unit(nodes, lo, hi):
    """Map ``[lo, hi]`` -> ``[0, 1]``; a single point (``hi == lo``) goes to 0.5."""
    width = hi - lo
    if width <= 0:
        return np.full_like(nodes, 0.5)
    return (nodes - lo) / width


def normalize_nodes(nodes, how: str = "maxabs", reference=None) -> np.ndarray:
    """The eigenvalue axis of ``nodes`` mapped by the normalisation ``how``.

    - ``"minmax"``: ``(x - min) / (max - min)`` over ``nodes`` itself -> ``[0, 1]``;
    - ``"joint"``: the same with min/max taken over ``reference`` (the nodes of both
      measures being compared) so both share one map;
    - ``"maxabs"``: ``x / max|x|`` -> ``[-1, 1]`` (keeps 0 and the sign);
    - ``"none"``: unchanged (raw eigenvalues).

    Degenerate supports never divide by zero: with ``max == min`` ("minmax"/"joint") every
    node maps to 0.5, the middle of [0, 1]; with all nodes 0 ("maxabs") they stay at 0.

    Raises:
        UserError: unknown ``how``.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    if how == "minmax":
        return _affine_to_unit(nodes, nodes.min(), nodes.max())
    if how == "joint":
        ref = nodes if reference is None else np.asarray(reference, dtype=np.float64)
        return _affine_to_unit(nodes, ref.min(), ref.max())
    if how == "maxabs":
        scale = np.abs(nodes).max()
        return nodes / scale if scale > 0 else nodes.copy()
    if how == "none":
        return nodes.copy()
    raise UserError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALIZATIONS)}")


def wasserstein(p, q, normalize: str = "maxabs") -> float:
    """1-Wasserstein distance between spectral measures ``p`` and ``q``.

    Each measure's eigenvalue nodes are first mapped by :func:`normalize_nodes`
    (``normalize``); the distance is then ``int |F_p(x) - F_q(x)| dx`` of the two
    cumulative distribution functions (``scipy.stats.wasserstein_distance`` with the
    quadrature weights). Unit: the normalised eigenvalue axis.
    """
    p_nodes, p_weights = as_measure(p)
    q_nodes, q_weights = as_measure(q)
    union = np.concatenate([p_nodes, q_nodes])
    u = normalize_nodes(p_nodes, normalize, reference=union)
    v = normalize_nodes(q_nodes, normalize, reference=union)
    return w1(u, p_weights, v, q_weights)


def nonzero_part(nodes, weights, tol: float = ZERO_TOL):
    """The measure restricted to ``|node| > tol * max|node|``, renormalised; a measure with
    no such node is returned as one atom at 0 (all its mass is at zero)."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    keep = np.abs(nodes) > tol * np.abs(nodes).max()
    if not keep.any():
        return np.zeros(1), np.ones(1)
    return nodes[keep], weights[keep] / weights[keep].sum()


# ----------------------------------------------------------------------------- the original
def paper_transform(density) -> np.ndarray:
    """The original's density transform: density values -> a vector summing to 1.

    For a density curve ``d`` (shape ``[P]``, values >= 0, e.g. P = 1024 grid points):
    zeros are replaced by the smallest positive value ``d_min`` (``d + eps`` with
    ``eps_i = d_min`` where ``d_i == 0``), then ``p = log(d + eps)`` is min-max scaled to
    [0, 1] and divided by its sum. The grid (eigenvalue axis) plays no part. If ``log d``
    is constant (0/0 in the original, giving NaN) this returns the uniform vector ``1/P``.
    The result does not change when ``d`` is multiplied by a positive constant.

    Raises:
        ValueError: empty, non-finite or negative ``density``, or no positive value.
    """
    d = np.asarray(density, dtype=np.float64).ravel()
    if d.size == 0 or not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("a density for the paper metric must be a non-empty, finite, "
                         "non-negative array")
    positive = d[d > 0]
    if positive.size == 0:
        raise ValueError("a density for the paper metric needs at least one positive value")
    p = np.log(np.where(d == 0, positive.min(), d))
    lo, hi = p.min(), p.max()
    if hi == lo:
        return np.full_like(p, 1.0 / p.size)
    p = (p - lo) / (hi - lo)
    return p / p.sum()


def paper_distance(density_p, density_q) -> float:
    """The original ``match_distros.py`` distance between two density curves.

    ``scipy.stats.wasserstein_distance(paper_transform(d_p), paper_transform(d_q))``: the
    transformed density values are treated as two unweighted samples.
    """
    return float(wasserstein_distance(paper_transform(density_p), paper_transform(density_q)))


def paper_metric(p, q, points: int = PAPER_POINTS) -> float:
    """:func:`paper_distance` of two measures' densities (``measure.density(points)``),
    standing in for the original's 1024-point Papyan densities."""
    return paper_distance(p.density(points=points)[1], q.density(points=points)[1])


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Distance:
    """One named distance between spectra.

    Attributes:
        name: registry key (``--metric`` value).
        label: short axis/legend label.
        normalize: the normalisation the distance needs: measure -> the object ``function``
            compares (e.g. ``(nodes / max|nodes|, weights)``); applied to each side alone.
        function: ``(normalised a, normalised b) -> float``.
        description: one line for ``--help`` and the README.
        axis: the normalisation's short name for tables (``"maxabs"``, ``"minmax"``, ...;
            empty for the paper metric, which has no eigenvalue axis).
    """

    name: str
    label: str
    normalize: Callable
    function: Callable
    description: str
    axis: str = ""

    def __call__(self, a, b) -> float:
        """The distance between measures ``a`` and ``b``."""
        return float(self.function(self.normalize(a), self.normalize(b)))


def _axis(how: str, nonzero: bool = False):
    def normalize(measure):
        nodes, weights = as_measure(measure)
        if nonzero:
            nodes, weights = nonzero_part(nodes, weights)
        return normalize_nodes(nodes, how), weights
    return normalize


def w1(nodes_a, weights_a, nodes_b, weights_b) -> float:
    """:func:`layerhessians.spectra.measure.w1` (the package's one W1), imported when called:
    the registry is read by ``match --help``, which starts without torch."""
    from layerhessians.spectra.measure import w1 as measure_w1

    return measure_w1(nodes_a, weights_a, nodes_b, weights_b)


def _w1(a, b) -> float:
    return w1(a[0], a[1], b[0], b[1])


def _paper_normalize(measure):
    return paper_transform(measure.density(points=PAPER_POINTS)[1])


DISTANCES = {d.name: d for d in (
    Distance("w1-maxabs", "$W_1$ on $\\lambda / \\max|\\lambda|$", _axis("maxabs"), _w1,
             "W1 between spectral measures after dividing each by its own largest "
             "|eigenvalue| (default: shape, sign and zero mass compared; scale ignored)",
             "maxabs"),
    Distance("w1-maxabs-nonzero", "$W_1$ on $\\lambda / \\max|\\lambda|$, nonzero part",
             _axis("maxabs", nonzero=True), _w1,
             f"as w1-maxabs on the nonzero eigenvalues only (|lambda| > {ZERO_TOL:g} max "
             "|lambda|), renormalised: ignores the blocks' ranks", "maxabs, nonzero"),
    Distance("w1-minmax", "$W_1$, each support $\\to$ [0, 1] (degenerate)", _axis("minmax"),
             _w1, "W1 after mapping each support to [0, 1]: the former default; degenerate "
                  "for PSD layers against an indefinite full spectrum", "minmax"),
    Distance("w1-raw", "$W_1$ on the eigenvalue axis", _axis("none"), _w1,
             "W1 between spectral measures in eigenvalue units (scale matters)", "none"),
    Distance("paper", "original metric (log-density values)", _paper_normalize,
             wasserstein_distance, "the original match_distros.py: W1 between transformed "
                                   "1024-point log-density values as samples (no axis)"),
)}
#: every registered name (the choices of ``match --metric``)
METRICS = tuple(DISTANCES)
#: the former ``--metric wasserstein --normalize X``: W1 on the axis X
LEGACY_W1 = {"maxabs": "w1-maxabs", "minmax": "w1-minmax", "none": "w1-raw"}


def get_distance(metric: str | None = None) -> Distance:
    """The registry entry ``metric`` (default :data:`DEFAULT_DISTANCE`).

    Raises:
        UserError: unknown name.
    """
    name = DEFAULT_DISTANCE if metric is None else metric
    try:
        return DISTANCES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown metric {metric!r}; choose one of "
                        f"{', '.join(DISTANCES)}") from None


def spectrum_distance(a, b, metric: str | None = None) -> float:
    """Distance between two spectral measures by the registry entry ``metric``.

    Args:
        a: a spectral measure (``.nodes``, ``.weights``; ``.density`` for ``"paper"``).
        b: the other spectral measure, of the same form.
        metric: a name in :data:`DISTANCES`; ``None`` = :data:`DEFAULT_DISTANCE`.

    Returns:
        The distance (float, >= 0) in the entry's unit (the normalised eigenvalue axis for
        the W1 entries).

    Raises:
        UserError: unknown ``metric``.
    """
    return get_distance(metric)(a, b)


def resolve_metric(metric: str | None, normalize: str | None = None) -> str:
    """The registry name for ``metric`` (``None``: the default); the legacy name
    ``"wasserstein"`` means W1 on the axis ``normalize`` (default ``"maxabs"``).

    Raises:
        UserError: unknown metric or normalisation.
    """
    if metric == "wasserstein":
        how = normalize or "maxabs"
        if how not in LEGACY_W1:
            raise UserError(f"unknown normalisation {how!r} for --metric wasserstein; choose "
                            f"one of {', '.join(LEGACY_W1)}")
        return LEGACY_W1[how]
    return get_distance(metric).name


def resolve_metrics(requested, normalize: str = "maxabs") -> tuple:
    """Registry names for ``match --metric`` values, in order, without repeats: the one place
    that reads the command line's extra words (``both`` = the default and ``paper``;
    ``wasserstein`` = W1 on the ``normalize`` axis, :func:`resolve_metric`).

    Raises:
        UserError: an unknown metric or normalisation.
    """
    names = []
    for name in [requested] if isinstance(requested, str) else requested:
        expanded = ((DEFAULT_DISTANCE, "paper") if name == "both"
                    else (resolve_metric(name, normalize),))
        names += [n for n in expanded if n not in names]
    return tuple(names)

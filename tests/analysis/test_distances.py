"""The distance registry and the properties that chose its default (synthetic measures with
known answers), the old default's degenerate case, and the resampling behind the spread."""

import numpy as np
import pytest

import layerhessians
from layerhessians.analysis import distances as dist
from layerhessians.analysis import matching, spread
from layerhessians.errors import UserError
from layerhessians.spectra import SpectralMeasure


def M(nodes, weights=None, dim=None):
    nodes = np.asarray(nodes, float)
    if weights is None:
        weights = np.full(nodes.shape, 1.0 / nodes.size)
    return SpectralMeasure(nodes, np.asarray(weights, float) / np.sum(weights), dim=dim)


def w1_by_cdf(x, wx, y, wy):
    """Reference W1: integral of |F - G| over the union of atoms, in float64."""
    points = np.union1d(x, y)
    F = np.array([wx[x <= p].sum() for p in points])
    G = np.array([wy[y <= p].sum() for p in points])
    return float(np.sum(np.abs(F - G)[:-1] * np.diff(points)))


def zero_heavy(nonzero_nodes, nonzero_weights, zero_mass):
    """``zero_mass * delta_0 + (1 - zero_mass) * (nonzero part)``."""
    w = np.asarray(nonzero_weights, float)
    return M(np.r_[0.0, nonzero_nodes], np.r_[zero_mass, (1 - zero_mass) * w / w.sum()])


# ----------------------------------------------------------------------------- registry
def test_registry_entries_and_public_api():
    assert dist.DEFAULT_DISTANCE in dist.DISTANCES
    assert {"paper", "w1-minmax", "w1-maxabs", "w1-maxabs-nonzero"} <= set(dist.DISTANCES)
    for name, entry in dist.DISTANCES.items():
        assert entry.name == name and entry.label and entry.description
        assert callable(entry.normalize) and callable(entry.function)
    assert layerhessians.DISTANCES is dist.DISTANCES
    assert layerhessians.spectrum_distance is dist.spectrum_distance
    a, b = M([0.0, 1.0, 2.0]), M([-1.0, 0.5, 3.0], [0.2, 0.3, 0.5])
    assert dist.spectrum_distance(a, b) == dist.spectrum_distance(a, b, dist.DEFAULT_DISTANCE)
    with pytest.raises(UserError, match="unknown metric 'kl'"):
        dist.spectrum_distance(a, b, "kl")


def test_entries_equal_their_definitions():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=9), rng.gamma(2.0, size=13) - 0.5
    wx, wy = rng.dirichlet(np.ones(9)), rng.dirichlet(np.ones(13))
    a, b = M(x, wx), M(y, wy)
    # default: W1 of the CDFs after dividing each axis by its own max |lambda|
    ref = w1_by_cdf(x / np.abs(x).max(), wx, y / np.abs(y).max(), wy)
    assert dist.spectrum_distance(a, b, "w1-maxabs") == pytest.approx(ref, rel=1e-12)
    assert dist.spectrum_distance(a, b, "w1-raw") == pytest.approx(w1_by_cdf(x, wx, y, wy),
                                                                   rel=1e-12)
    # the old default and the paper's metric are computed exactly as before
    assert dist.spectrum_distance(a, b, "w1-minmax") == dist.wasserstein(a, b, "minmax")
    assert dist.spectrum_distance(a, b, "paper") == dist.paper_metric(a, b)
    assert not hasattr(matching, "paper_metric")  # one home: distances


# ----------------------------------------------------------------------------- properties
def test_default_compares_measures_on_the_eigenvalue_axis():
    # the same weights on other eigenvalues: a distance; the paper's metric sees density
    # values only, so two spectra whose densities are mirror images are at distance 0 there
    a = M([0.0, 1.0], [0.8, 0.2])
    b = M([0.0, 1.0], [0.2, 0.8])
    assert dist.spectrum_distance(a, b) == pytest.approx(0.6)
    assert dist.spectrum_distance(M([-1.0, 0.0]), M([0.0, 1.0])) == pytest.approx(1.0)
    mirror = M([-1.0, 0.0], [0.2, 0.8])
    assert dist.spectrum_distance(a, mirror) == pytest.approx(0.4)
    assert dist.spectrum_distance(a, mirror, "paper") < 1e-9  # blind to the axis


@pytest.mark.parametrize("scale", [1e-4, 0.3, 7.0, 2.5e4])
def test_default_ignores_a_positive_scale(scale):
    rng = np.random.default_rng(0)
    nodes = np.r_[rng.normal(0, 0.3, 20), 0.0, 12.0]
    weights = rng.dirichlet(np.ones(22))
    full = M(nodes, weights)
    assert dist.spectrum_distance(full, M(scale * nodes, weights)) < 1e-12
    # a reflection or a shift is a change of shape: not free
    assert dist.spectrum_distance(full, M(-scale * nodes, weights)) > 0.05
    assert dist.spectrum_distance(full, M(scale * (nodes + 3.0), weights)) > 0.05


def test_default_ranks_layers_by_how_close_they_were_built():
    full = M([-2.0, -0.5, 0.0, 0.3, 1.0, 4.0, 10.0], [0.02, 0.05, 0.6, 0.15, 0.1, 0.05, 0.03])
    other = M([0.0, 2.0, 5.0, 10.0], [0.3, 0.3, 0.3, 0.1])  # PSD, same max |lambda|
    base = dist.spectrum_distance(full, other)
    assert base > 0.1
    got = []
    for t in (0.05, 0.2, 0.5, 0.9):
        nodes = np.r_[full.nodes, other.nodes]
        weights = np.r_[(1 - t) * full.weights, t * other.weights]
        got.append(dist.spectrum_distance(full, M(nodes, weights)))
        # W1(mu, (1 - t) mu + t nu) = t W1(mu, nu): the CDF difference scales by t
        assert got[-1] == pytest.approx(t * base, rel=1e-10)
    assert got == sorted(got) and len(set(got)) == 4


def psd_layers_and_indefinite_full(zero_mass=0.99):
    """The measured failure: an indefinite full spectrum (lambda_min = -2, lambda_max = 20)
    and PSD layers of different shapes, all with most mass at 0."""
    full = zero_heavy([-2.0, -0.4, 0.5, 3.0, 20.0], [0.1, 0.3, 0.3, 0.2, 0.1], zero_mass)
    layers = {
        "flat": zero_heavy(np.linspace(0.1, 5.0, 8), np.ones(8), zero_mass),
        "top-heavy": zero_heavy([1.0, 8.0, 9.0], [0.1, 0.3, 0.6], zero_mass),
        "outlier": zero_heavy([0.01, 0.02, 30.0], [0.6, 0.39, 0.01], zero_mass),
        "bulk": zero_heavy([0.2, 0.4, 0.6, 40.0], [0.4, 0.3, 0.25, 0.05], zero_mass),
    }
    return full, layers


def test_old_default_ties_psd_layers_at_a_full_only_number():
    full, layers = psd_layers_and_indefinite_full(zero_mass=0.99)
    z = 2.0 / 22.0  # -lambda_min / (lambda_max - lambda_min) of the full spectrum
    old = {k: dist.spectrum_distance(full, m, "w1-minmax") for k, m in layers.items()}
    # the zero atom sits at z for the full spectrum and at 0 for every PSD layer: W1 is
    # z up to the nonzero mass, whatever the layer's shape
    bound = (1 - 0.99) * (1 + z)
    for value in old.values():
        assert abs(value - z) <= bound
    assert max(old.values()) - min(old.values()) < 0.2 * z


def test_default_separates_psd_layers_against_an_indefinite_full_spectrum():
    full, layers = psd_layers_and_indefinite_full(zero_mass=0.99)
    new = {k: dist.spectrum_distance(full, m) for k, m in layers.items()}
    values = sorted(new.values())
    assert all(b > 1.3 * a for a, b in zip(values, values[1:])), new
    # and the ranking follows shape: a layer whose bulk sits low (as the full one's does)
    # is closer than one with its mass near its top
    assert new["bulk"] < new["outlier"] < new["flat"] < new["top-heavy"]


def test_zero_mass_is_compared_by_default_and_dropped_by_the_nonzero_entry():
    nonzero = (np.array([0.25, 0.5, 1.0]), np.array([0.5, 0.3, 0.2]))
    mean = float(np.dot(*nonzero))
    rank_poor = zero_heavy(*nonzero, zero_mass=0.9)  # e.g. a large, rank-deficient block
    rank_rich = zero_heavy(*nonzero, zero_mass=0.5)
    # default: F_a - F_b = (0.9 - 0.5) (1 - F_nonzero) on [0, 1] -> 0.4 * mean
    assert dist.spectrum_distance(rank_poor, rank_rich) == pytest.approx(0.4 * mean, rel=1e-12)
    # nonzero parts only: the same shape -> 0, whatever the ranks
    assert dist.spectrum_distance(rank_poor, rank_rich, "w1-maxabs-nonzero") < 1e-12
    # SLQ's zero is a Ritz value near 0: the default is continuous in it, and the nonzero
    # entry treats |lambda| <= ZERO_TOL max|lambda| as zero
    blurred = M(np.r_[2e-6, nonzero[0]], np.r_[0.9, 0.1 * nonzero[1]])
    assert dist.spectrum_distance(blurred, rank_poor) == pytest.approx(0.9 * 2e-6, rel=1e-6)
    assert dist.spectrum_distance(blurred, rank_rich, "w1-maxabs-nonzero") < 1e-12
    # a measure with all its mass at zero
    assert dist.nonzero_part(np.zeros(3), np.ones(3) / 3)[0].tolist() == [0.0]


# ----------------------------------------------------------------------------- resampling
def test_exact_measures_are_not_resampled():
    exact = M([0.0, 1.0, 2.0], [0.7, 0.2, 0.1], dim=10)
    exact.method = "exact"
    rng = np.random.default_rng(0)
    again = spread.resample(exact, rng)
    assert again is exact
    assert spread.spread_method(exact) == "exact"


def test_vector_bootstrap_draws_whole_rows():
    rows = [np.array([0.0, 1.0]), np.array([0.0, 3.0]), np.array([0.5, 2.0])]
    m = SpectralMeasure(rows, [np.array([0.5, 0.5])] * 3, dim=100)
    assert spread.spread_method(m) == "vectors(3)"
    rng = np.random.default_rng(1)
    for _ in range(20):
        r = spread.resample(m, rng)
        assert r.num_vectors == 3
        assert all(any(np.array_equal(n, row) for row in rows) for n, _ in r.per_vector)


def test_one_vector_resampling_has_the_variance_of_a_gaussian_start_vector():
    # a diagonal "Hessian" of size D with three eigenvalues of multiplicities m: SLQ with one
    # Gaussian vector (enough steps) has Ritz values = the eigenvalues and weights
    # (sum of v_i^2 over each eigenspace) / |v|^2. Simulate that directly, in float64.
    D, mult, eig = 200, np.array([150, 40, 10]), np.array([0.0, 1.0, 5.0])
    rng = np.random.default_rng(0)
    v2 = rng.standard_normal((4000, D)) ** 2
    groups = np.repeat(np.arange(3), mult)
    slq = np.stack([v2[:, groups == g].sum(1) for g in range(3)], 1) / v2.sum(1, keepdims=True)
    m = M(eig, mult / D, dim=D)
    assert spread.spread_method(m) == "dirichlet"
    draws = np.stack([spread.resample(m, rng).weights for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(0), mult / D, rtol=0.02)
    np.testing.assert_allclose(draws.var(0), slq.var(0), rtol=0.12)
    # without the operator's size there is no model for the noise: no resampling
    assert spread.spread_method(M(eig, mult / D)) == "none"
    assert spread.resample(M(eig, mult / D), rng) is None

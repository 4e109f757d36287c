"""SpectralMeasure: weights, tables, density (Papyan's width), moments."""

import math

import numpy as np
import pandas as pd
import pytest

from layerhessians.errors import UserError
from layerhessians.spectra import SpectralMeasure, concatenate_rows, papyan_sigma


def ragged():
    return SpectralMeasure([np.array([-1.0, 0.0, 2.0]), np.array([0.5, 3.0])],
                           [np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.4])], dim=10)


def test_flattened_weights_average_over_vectors():
    m = ragged()
    assert m.num_vectors == 2 and m.steps == 3 and m.dim == 10
    np.testing.assert_allclose(m.nodes, [-1.0, 0.0, 2.0, 0.5, 3.0])
    np.testing.assert_allclose(m.weights, [0.1, 0.15, 0.25, 0.3, 0.2])
    assert m.weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert m.support == (-1.0, 3.0)
    mean = (0.2 * -1 + 0.5 * 2) / 2 + (0.6 * 0.5 + 0.4 * 3) / 2
    assert m.mean() == pytest.approx(mean)
    assert m.trace() == pytest.approx(10 * mean)
    moments = m.moments(3)
    assert moments[0] == pytest.approx(1.0)
    assert moments[2] == pytest.approx(np.dot(m.weights, m.nodes ** 2))


def test_two_dimensional_input_and_nan_padding():
    m = SpectralMeasure(np.array([[1.0, 2.0], [3.0, np.nan]]),
                        np.array([[0.5, 0.5], [1.0, 0.0]]))
    assert m.per_vector[1][0].tolist() == [3.0]
    assert SpectralMeasure(np.array([4.0]), np.array([1.0])).nodes.tolist() == [4.0]


def test_frame_round_trip():
    m = ragged()
    frame = m.to_frame()
    assert list(frame.columns) == ["vector", "node", "weight"]
    assert frame.groupby("vector")["weight"].sum().tolist() == pytest.approx([1.0, 1.0])
    back = SpectralMeasure.from_frame(frame.sample(frac=1.0, random_state=0)
                                      .sort_values("vector", kind="stable"), dim=10)
    for (n1, w1), (n2, w2) in zip(m.per_vector, back.per_vector):
        np.testing.assert_array_equal(np.sort(n1), np.sort(n2))
        np.testing.assert_allclose(w1[np.argsort(n1)], w2[np.argsort(n2)])
    with pytest.raises(UserError, match="columns"):
        SpectralMeasure.from_frame(pd.DataFrame({"node": [1.0]}))


def test_density_is_papyan_smoothing():
    m = ragged()
    grid, density = m.density(points=4001)
    span = 4.0
    low, high = -1.0 - 0.05 * span, 3.0 + 0.05 * span
    assert grid[0] == pytest.approx(low) and grid[-1] == pytest.approx(high)
    # Papyan: width h / sqrt(8 ln 1.25), h = 2 / (K - 1), on [-1, 1]; times (high - low) / 2
    sigma = (2 / (3 - 1)) / math.sqrt(8 * math.log(1.25)) * (high - low) / 2
    assert papyan_sigma(3, low, high) == pytest.approx(sigma)
    x = 0.7
    expected = sum(w * math.exp(-0.5 * ((x - n) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
                   for n, w in zip(m.nodes, m.weights))
    _, at_x = m.density(grid=[x])
    assert at_x[0] == pytest.approx(expected, rel=1e-12)
    # a narrow kernel integrates to ~1 over the default grid
    grid, density = m.density(points=4001, sigma=0.01)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)


def test_density_of_a_point_mass():
    grid, density = SpectralMeasure([0.0], [1.0]).density(points=101)
    assert grid[0] < 0 < grid[-1] and density.argmax() == 50


def test_invalid_measures():
    with pytest.raises(UserError, match="sum to 1"):
        SpectralMeasure([1.0, 2.0], [0.5, 0.4])
    with pytest.raises(UserError, match="non-negative"):
        SpectralMeasure([1.0, 2.0], [1.5, -0.5])
    with pytest.raises(UserError, match="same shape"):
        SpectralMeasure([1.0, 2.0], [1.0])
    with pytest.raises(UserError, match="finite"):
        SpectralMeasure([np.nan], [1.0])
    with pytest.raises(UserError):
        ragged().density(sigma=-1.0)


def test_concatenate_rows():
    both = concatenate_rows([ragged(), SpectralMeasure([7.0], [1.0], dim=10)])
    assert both.num_vectors == 3 and both.dim == 10
    assert both.weights.sum() == pytest.approx(1.0)


FEW_NODE_MEASURES = {
    "one node": SpectralMeasure([2.5], [1.0]),
    "one zero node": SpectralMeasure([0.0], [1.0]),
    "two nodes": SpectralMeasure([-1.0, 3.0], [0.3, 0.7]),
    "three nodes": SpectralMeasure([0.0, 0.1, 5.0], [0.5, 0.25, 0.25]),
    "two vectors": SpectralMeasure([np.array([0.0, 1.0]), np.array([-2.0, 0.5, 4.0])],
                                   [np.array([0.9, 0.1]), np.array([0.2, 0.2, 0.6])]),
    # exact spectra: a big zero atom and a few non-zero eigenvalues
    "zero atom, 3 of 50": SpectralMeasure(np.r_[np.zeros(47), 0.4, 1.3, 7.0],
                                          np.full(50, 1 / 50), dim=50),
    "zero atom, 2 of 6": SpectralMeasure(np.r_[np.zeros(4), -0.2, 3.0], np.full(6, 1 / 6)),
    "zero atom, 1 of 4": SpectralMeasure(np.r_[np.zeros(3), 1.0], np.full(4, 0.25)),
}


@pytest.mark.parametrize("name", FEW_NODE_MEASURES)
def test_density_integrates_to_one_over_its_own_grid(name):
    m = FEW_NODE_MEASURES[name]
    for points in (101, 1024):
        grid, density = m.density(points=points)
        assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
        # the rule: Papyan's smoothing times one constant (the shape is unchanged)
        raw_grid, raw = m.density(points=points, normalize=False)
        np.testing.assert_array_equal(raw_grid, grid)
        ratio = density / raw
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
        assert ratio[0] >= 1.0


def test_few_node_densities_lose_mass_without_normalising():
    # what issue 11 reported: 0.42-0.93 of the mass on the grid for few nodes
    grid, raw = FEW_NODE_MEASURES["two nodes"].density(normalize=False)
    assert np.trapezoid(raw, grid) < 0.9


def test_density_normalize_on_an_explicit_grid():
    m = FEW_NODE_MEASURES["three nodes"]
    grid = np.linspace(-10.0, 15.0, 3001)
    _, raw = m.density(grid=grid)  # an explicit grid: the formula's values, no rescaling
    _, scaled = m.density(grid=grid, normalize=True)
    assert np.trapezoid(scaled, grid) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(raw, scaled * np.trapezoid(raw, grid), rtol=1e-12)
    with pytest.raises(UserError, match="strictly increasing"):
        m.density(grid=[0.5], normalize=True)
    with pytest.raises(UserError, match="no mass"):
        m.density(grid=[1e6, 1e6 + 1], sigma=0.01, normalize=True)

"""Lanczos / SLQ against exact eigen-decompositions (float64)."""

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from layerhessians.curvature import MatrixOperator, hessian_operator
from layerhessians.errors import UserError
from layerhessians.spectra import exact_spectrum, lanczos, slq, slq_many, start_vector


def matrix_with_spectrum(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q; returns (matrix, Q)."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return (q * values) @ q.T, q


def relative_w1(measure, exact):
    low, high = exact.support
    return wasserstein_distance(measure.nodes, exact.nodes, measure.weights,
                                exact.weights) / (high - low)


def test_full_run_recovers_exact_eigenvalues_and_weights():
    eigenvalues = np.linspace(-2.0, 5.0, 30) + np.random.default_rng(0).uniform(0, 0.05, 30)
    matrix, q = matrix_with_spectrum(eigenvalues)
    op = MatrixOperator(matrix)
    measure = slq(op, iterations=40, seed=3)  # iterations > dim: stops at dim
    assert measure.steps == 30
    nodes, weights = measure.per_vector[0]
    np.testing.assert_allclose(nodes, np.sort(eigenvalues), rtol=0, atol=1e-10)
    v = start_vector(30, 3, 0, "matrix")
    exact_weights = ((q.T @ v) ** 2).numpy()[np.argsort(eigenvalues)]
    np.testing.assert_allclose(weights, exact_weights, rtol=0, atol=1e-10)


def test_breakdown_gives_exact_quadrature_on_repeated_eigenvalues():
    eigenvalues = np.repeat([-1.0, 0.5, 3.0], [10, 5, 15])
    matrix, q = matrix_with_spectrum(eigenvalues, seed=1)
    op = MatrixOperator(matrix)
    (run,) = lanczos([op], [start_vector(30, 0, 0, "x")], iterations=20)
    assert run.breakdown and run.steps == 3
    nodes, weights = run.quadrature()
    np.testing.assert_allclose(nodes, [-1.0, 0.5, 3.0], atol=1e-10)
    v = start_vector(30, 0, 0, "x")
    projected = (q.T @ v).numpy() ** 2
    expected = [projected[eigenvalues == e].sum() for e in (-1.0, 0.5, 3.0)]
    np.testing.assert_allclose(weights, expected, atol=1e-10)


def test_zero_operator_breaks_down_at_once():
    measure = slq(MatrixOperator(torch.zeros(7, 7, dtype=torch.float64)), iterations=5)
    assert measure.steps == 1 and measure.nodes.tolist() == [0.0]


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_quadrature_matches_moments(reorthogonalize):
    """Gauss quadrature with m nodes integrates lambda^j exactly for j <= 2m - 1."""
    eigenvalues = np.random.default_rng(2).normal(size=50)
    matrix, _ = matrix_with_spectrum(eigenvalues, seed=2)
    v = start_vector(50, 1, 0, "m")
    (run,) = lanczos([MatrixOperator(matrix)], [v], iterations=6,
                     reorthogonalize=reorthogonalize)
    nodes, weights = run.quadrature()
    power = v.clone()
    for j in range(12):
        assert np.dot(weights, nodes ** j) == pytest.approx(float(v @ power), abs=1e-10)
        power = matrix @ power


def test_lockstep_equals_separate_runs():
    a, _ = matrix_with_spectrum(np.linspace(0, 1, 20), seed=3)
    b, _ = matrix_with_spectrum(np.linspace(-3, 1, 12) ** 3, seed=4)
    ops = [MatrixOperator(a, "a"), MatrixOperator(b, "b")]
    together = slq_many(ops, ["a", "b"], iterations=8, vectors=2, seed=5)
    for op, measure in zip(ops, together):
        alone = slq(op, iterations=8, vectors=2, seed=5)
        np.testing.assert_array_equal(alone.nodes, measure.nodes)
        np.testing.assert_array_equal(alone.weights, measure.weights)


def test_slq_on_hessian_converges_with_more_vectors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 4)).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (40,), generator=g))
    op = hessian_operator(model, torch.nn.CrossEntropyLoss(), data)
    exact = exact_spectrum(op)
    # full run: the nodes are the exact eigenvalues (those the start vector sees)
    full = slq(op, iterations=op.dim)
    for node in full.nodes:
        assert np.min(np.abs(exact.nodes - node)) < 1e-9
    errors = {}
    for vectors in (1, 16):
        errors[vectors] = np.mean([relative_w1(slq(op, iterations=10, vectors=vectors, seed=s),
                                               exact) for s in range(4)])
    assert errors[1] < 0.05
    assert errors[16] < 0.6 * errors[1]


def test_seeds_and_distributions():
    matrix, _ = matrix_with_spectrum(np.linspace(-1, 1, 25), seed=6)
    op = MatrixOperator(matrix)
    a = slq(op, iterations=6, vectors=2, seed=1, distribution="rademacher")
    b = slq(op, iterations=6, vectors=2, seed=1, distribution="rademacher")
    c = slq(op, iterations=6, vectors=2, seed=2, distribution="rademacher")
    d = slq(op, iterations=6, vectors=2, seed=1, distribution="gaussian")
    np.testing.assert_array_equal(a.nodes, b.nodes)
    assert not np.allclose(a.nodes, c.nodes) and not np.allclose(a.nodes, d.nodes)
    rademacher = start_vector(25, 1, 0, "m", "rademacher", normalize=False)
    assert set(rademacher.tolist()) == {-1.0, 1.0}
    assert torch.linalg.vector_norm(start_vector(25, 1, 0, "m")) == pytest.approx(1.0)


def test_bad_arguments():
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    for kwargs in ({"iterations": 0}, {"vectors": 0}, {"iterations": 2.5},
                   {"distribution": "uniform"}, {"seed": -1}):
        with pytest.raises(UserError):
            slq(op, **kwargs)


def test_basis_too_big_for_memory_is_refused(monkeypatch):
    import importlib

    memory_module = importlib.import_module("layerhessians.spectra.plan")

    op = MatrixOperator(torch.eye(50, dtype=torch.float64))
    monkeypatch.setattr(memory_module, "available_memory", lambda device: 1000)
    with pytest.raises(UserError, match="reorthogonalize=False"):
        slq(op, iterations=10)
    assert slq(op, iterations=10, reorthogonalize=False).nodes == pytest.approx([1.0])


def test_lanczos_shares_products_through_the_public_product_group():
    """Any operator (not only the engine's) can be stepped in lockstep by declaring a
    product_group and joint_products_save_passes; the Ritz values are unchanged."""
    from layerhessians.spectra.lanczos import lanczos

    class Group:
        calls = 0

        def products(self, operators, vectors, outs=None):
            self.calls += 1
            outs = outs or [None] * len(operators)
            return [MatrixOperator.matvec(op, v, out) for op, v, out in
                    zip(operators, vectors, outs)]

    class Grouped(MatrixOperator):
        group = Group()
        product_group = property(lambda self: self.group)
        joint_products_save_passes = True

    rng = torch.Generator().manual_seed(0)
    mats = [torch.randn(6, 6, dtype=torch.float64, generator=rng) for _ in range(2)]
    mats = [m + m.T for m in mats]
    ops = [Grouped(m, name=f"m{i}") for i, m in enumerate(mats)]
    starts = [torch.ones(6, dtype=torch.float64)] * 2
    runs = lanczos(ops, starts, 6)
    assert Grouped.group.calls >= 6 + 1  # lockstep steps + one symmetry probe pass
    for run, m in zip(runs, mats):
        assert np.allclose(np.sort(run.ritz()[0]), torch.linalg.eigvalsh(m).numpy(), atol=1e-8)

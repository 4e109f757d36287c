"""Top eigenvalues and Hutchinson traces against exact float64 answers."""

import numpy as np
import pytest
import torch
from torch import nn

from layerhessians.curvature import MatrixOperator, dense_matrix, hessian_operator
from layerhessians.errors import UserError
from layerhessians.spectra import hessian_trace, slq, start_vector, top_eigenvalues


def small_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(20, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (20,), generator=g))
    return hessian_operator(model, nn.CrossEntropyLoss(), data)


def test_top_eigenvalues_and_vectors_match_dense():
    op = small_hessian()
    matrix = dense_matrix(op)
    exact = np.sort(torch.linalg.eigvalsh(matrix).numpy())[::-1]
    values, vectors = top_eigenvalues(op, k=3, return_vectors=True, tol=1e-10)
    np.testing.assert_allclose(values, exact[:3], rtol=1e-8)
    assert vectors.shape == (op.dim, 3)
    for i in range(3):
        residual = matrix @ vectors[:, i] - values[i] * vectors[:, i]
        assert torch.linalg.norm(residual) < 1e-6 * abs(exact[0])
    np.testing.assert_allclose(top_eigenvalues(op, k=1), exact[:1], rtol=1e-6)


def test_top_eigenvalues_descending_algebraic_and_restart_after_breakdown():
    # two distinct eigenvalues, the top one with multiplicity: breakdown after 2 steps
    matrix = torch.diag(torch.tensor([4.0, 4.0, -7.0, -7.0, -7.0], dtype=torch.float64))
    values = top_eigenvalues(MatrixOperator(matrix), k=3)
    np.testing.assert_allclose(values, [4.0, 4.0, -7.0], atol=1e-10)
    with pytest.raises(UserError):
        top_eigenvalues(MatrixOperator(matrix), k=6)


def test_top_eigenvalues_warns_when_not_converged():
    rng = np.random.default_rng(0)
    matrix = torch.as_tensor(np.diag(rng.uniform(0, 1, 200)))
    with pytest.warns(RuntimeWarning, match="converge"):
        top_eigenvalues(MatrixOperator(matrix), k=2, iterations=3)


def test_hutchinson_exact_on_diagonal_and_unbiased_on_hessian():
    diagonal = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
    estimate = hessian_trace(diagonal, samples=3)
    assert estimate.estimate == pytest.approx(55.0) and estimate.stderr == pytest.approx(0.0)
    op = small_hessian()
    exact = float(torch.trace(dense_matrix(op)))
    result = hessian_trace(op, samples=300, seed=1)
    assert abs(result.estimate - exact) < 4 * result.stderr
    assert result.stderr < 0.2 * abs(exact)
    again = hessian_trace(op, samples=300, seed=1)
    assert again.estimate == result.estimate
    value, stderr = result
    assert value == result.estimate and result.samples == 300


def test_slq_measure_trace_is_the_hutchinson_sample_of_its_start_vector():
    """dim * sum(w * theta) = dim * q^T A q = v^T A v for the Rademacher v = sqrt(dim) q."""
    op = small_hessian()
    matrix = dense_matrix(op)
    measure = slq(op, iterations=5, seed=2, distribution="rademacher")
    v = start_vector(op.dim, 2, 0, "full", "rademacher", normalize=False)
    assert measure.trace() == pytest.approx(float(v @ matrix @ v), rel=1e-10)


def test_bad_arguments():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(UserError):
        hessian_trace(op, samples=0)
    with pytest.raises(UserError):
        top_eigenvalues(op, k=0)
    with pytest.raises(UserError):
        top_eigenvalues(op, k=4)


def with_spectrum(values, seed=0):
    """A dense symmetric float64 matrix with the given eigenvalues, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    values = torch.as_tensor(values, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=g,
                                       dtype=torch.float64))
    return (q * values) @ q.T


def test_top_eigenvalues_find_repeated_eigenvalues():
    # issue 11 kind 6: single-vector Lanczos gave [0.8976, 0.7971, 0.4242, 0.3480]
    # (it converged to the top 4 distinct values before rounding errors showed the copies)
    rng = np.random.default_rng(1)
    rest = rng.uniform(-0.6, 0.3, 24)
    values = np.r_[0.8976, 0.8976, 0.7971, 0.7971, 0.4242, 0.3480, rest]
    for matrix in (torch.diag(torch.as_tensor(values)), with_spectrum(values)):
        op = MatrixOperator(matrix)
        exact = np.sort(torch.linalg.eigvalsh(matrix).numpy())[::-1]
        for k in (1, 2, 3, 4, 6):
            top, vectors = top_eigenvalues(op, k=k, return_vectors=True, tol=1e-10)
            np.testing.assert_allclose(top, exact[:k], rtol=1e-9)
            # an orthonormal eigenbasis of the repeated eigenvalues, not one vector twice
            torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64),
                                       atol=1e-8, rtol=0)
            residual = matrix @ vectors - vectors * torch.as_tensor(top.copy())
            assert torch.linalg.norm(residual, dim=0).max() < 1e-8
    triple = with_spectrum(np.r_[2.0, 2.0, 2.0, -3.0, -3.0, rng.uniform(-1, 1.5, 30)], seed=3)
    np.testing.assert_allclose(top_eigenvalues(MatrixOperator(triple), k=5, tol=1e-10),
                               np.sort(torch.linalg.eigvalsh(triple).numpy())[::-1][:5],
                               rtol=1e-9)


def test_top_eigenvalues_of_a_hessian_block_with_repeated_eigenvalues():
    # least squares through Linear(12, 3): the weight's Hessian is I_3 (x) (2 / (3 N)) X^T X,
    # every eigenvalue three times (single-vector Lanczos was 0.2 off in the top 5)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    linear = nn.Sequential(nn.Linear(12, 3, bias=False)).double()
    for net, params in ((linear, None), (model, [model[0].weight])):
        op = hessian_operator(net, nn.MSELoss(), (x, y), params=params)
        exact = np.sort(torch.linalg.eigvalsh(dense_matrix(op)).numpy())[::-1]
        top = top_eigenvalues(op, k=5, tol=1e-10)
        np.testing.assert_allclose(top, exact[:5], rtol=1e-8)
    assert exact[0] != pytest.approx(exact[1])  # the nonlinear model: distinct values
    triples = top_eigenvalues(hessian_operator(linear, nn.MSELoss(), (x, y)), k=4, tol=1e-10)
    assert triples.shape == (4,)
    assert triples[0] == pytest.approx(triples[2], rel=1e-9) and triples[2] > triples[3]


def test_top_eigenvalues_refuse_non_finite_products_and_too_few_iterations():
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[1, 1] = float("nan")
    with pytest.raises(UserError, match="non-finite"):
        top_eigenvalues(MatrixOperator(matrix), k=2)
    with pytest.raises(UserError, match="iterations"):
        top_eigenvalues(MatrixOperator(torch.eye(4, dtype=torch.float64)), k=3, iterations=2)

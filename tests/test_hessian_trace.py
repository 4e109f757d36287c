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

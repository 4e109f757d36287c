"""Five public bug reports of other Hessian tools, re-created on LayerHessians (issue 21's
fresh hunt): each is a right value against an exact reference.

1. PyHessian PR #23: SLQ density weights must be the squared FIRST components of the Ritz
   vectors (it used the whole eigenvector matrix), and the nodes real.
2. PyHessian issue #17: the Ritz values of the tridiagonal matrix taken from a general
   (complex) eigen-solver; ours must be real and, with full Lanczos, the exact eigenvalues.
3. hessian-eff-dim issue #1: a Hessian-vector product that unflattens the vector in the
   wrong parameter order; ours must match the dense block for parameters given out of order.
4. nncf PR #2159: a trace estimate whose sign got lost (the absolute value of a negative
   average); ours must keep the sign of a negative-definite operator's trace.
5. pytorch-hessian-eigenthings issues #4/#17: eigenvalues that change with the data loader's
   batching and shuffling; ours must equal the dense Hessian's of all the data however it is
   batched or shuffled.
"""

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from layerhessians.curvature import MatrixOperator, dense_matrix, hessian_operator
from layerhessians.spectra import hessian_trace, slq, top_eigenvalues
from layerhessians.spectra.slq import start_vector
from problems import CE, mlp_data, rel_error, tiny_mlp
from references import dense_reference


def spd(dim, seed, sign=1.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    values = sign * torch.linspace(0.5, 4.0, dim, dtype=torch.float64)
    return q @ torch.diag(values) @ q.T, values


def test_slq_weights_are_squared_first_components():
    a, values = spd(12, 0)
    op = MatrixOperator(a)
    measure = slq(op, iterations=12, vectors=1, seed=3)
    nodes, weights = measure.per_vector[0]
    assert np.isrealobj(nodes) and np.allclose(np.sort(nodes), values.numpy(), atol=1e-10)
    # the weight of eigenvalue i is (u_i^T v)^2 for the unit start vector v
    v = start_vector(12, seed=3, vector=0, block=getattr(op, "name", "full"))
    eigvals, eigvecs = torch.linalg.eigh(a)
    expected = (eigvecs.T @ v) ** 2
    order = np.argsort(nodes)
    assert np.allclose(weights[order], expected.numpy(), atol=1e-10)
    # the measure's first moment is the Rayleigh quotient of the start vector
    assert abs(float(np.sum(weights * nodes)) - float(v @ a @ v)) < 1e-10


def test_out_of_order_parameter_block_matches_the_dense_block():
    model, data = tiny_mlp(), mlp_data()
    params = [model[2].bias, model[0].weight, model[2].weight]  # not model order
    op = hessian_operator(model, CE, data, params=params)
    reference = dense_reference(model, CE, data, "hessian", params, reduction="mean")
    assert rel_error(dense_matrix(op), reference) < 1e-10


def test_a_negative_trace_keeps_its_sign():
    a, values = spd(10, 1, sign=-1.0)
    estimate = hessian_trace(MatrixOperator(a), samples=400, seed=0)
    assert estimate.estimate < 0
    assert abs(estimate.estimate - float(values.sum())) < 4 * estimate.stderr + 1e-12


def test_eigenvalues_do_not_depend_on_batching_or_shuffling():
    model = tiny_mlp()
    x, y = torch.cat([b[0] for b in mlp_data()]), torch.cat([b[1] for b in mlp_data()])
    reference = torch.linalg.eigvalsh(dense_reference(model, CE, [(x, y)], "hessian",
                                                      reduction="mean"))
    for batch_size, shuffle in ((12, False), (5, False), (4, True), (64, True)):
        torch.manual_seed(batch_size)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
        op = hessian_operator(model, CE, loader)
        top = top_eigenvalues(op, 2)
        assert np.allclose(np.sort(np.asarray(top))[::-1], reference.flip(0)[:2].numpy(),
                           atol=1e-8), (batch_size, shuffle)
        assert rel_error(dense_matrix(op), dense_reference(
            model, CE, [(x, y)], "hessian", reduction="mean")) < 1e-10


def test_model_in_train_mode_with_dropout_is_measured_in_eval_mode():
    # eigenthings #17's noise source: a stochastic forward (dropout) makes every product
    # differ; the operator is taken in eval mode, as the README says
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    model.train()
    data = mlp_data()
    op = hessian_operator(model, CE, data)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.equal(op.matvec(v), op.matvec(v))
    model.eval()
    reference = dense_reference(model, CE, data, "hessian", reduction="mean")
    assert rel_error(dense_matrix(op), reference) < 1e-10
    assert model.training is False

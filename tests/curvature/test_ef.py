"""The empirical Fisher (kind "ef") against a dense float64 reference built here:
EF = (1/N) sum_n grad l_n grad l_n^T, per-example gradients by torch.func.grad, one example
at a time, outer products; several unequal batches."""

import copy

import pytest
import torch
from torch import nn

from layerhessians.curvature import (
    KINDS,
    EmpiricalFisherOperator,
    dense_matrix,
    hessian_operator,
    measure_graph_cost,
    reference_matrix,
)
from layerhessians.errors import UserError
from layerhessians.spectra import layer_operators
from problems import CE, PROBLEMS, TwoIdenticalRanks, rel_error
from references import dense_reference

RTOL = 1e-10
SIZES = (5, 3, 4)  # several unequal batches


def empirical_fisher(model, loss_fn, data):
    """Dense EF [dim, dim] over every trainable parameter: per-example gradients of
    loss_fn(model(x_n[None]), y_n[None]) in eval mode, one example at a time."""
    clone = copy.deepcopy(model).eval()
    named = {n: p.detach() for n, p in clone.named_parameters()}

    def example_loss(values, x, y):
        return loss_fn(torch.func.functional_call(clone, values, (x[None],)), y[None])

    rows = []
    for x, y in data:
        for n in range(x.shape[0]):
            grads = torch.func.grad(example_loss)(named, x[n], y[n])
            rows.append(torch.cat([grads[k].reshape(-1) for k in named]))
    g = torch.stack(rows).to(torch.float64)  # [N, dim]
    return sum(torch.outer(row, row) for row in g) / g.shape[0]


def offsets(model):
    result, start = {}, 0
    for n, p in model.named_parameters():
        result[n] = slice(start, start + p.numel())
        start += p.numel()
    return result


def test_ef_is_registered():
    assert KINDS == ("hessian", "ggn", "residual", "ef")


@pytest.mark.parametrize("problem", ["mlp", "conv"])
def test_ef_matches_dense_reference(problem):
    model, data = PROBLEMS[problem].build(sizes=SIZES)
    expected = empirical_fisher(model, CE, data)
    assert torch.linalg.norm(expected) > 0
    op = hessian_operator(model, CE, data, kind="ef")
    assert isinstance(op, EmpiricalFisherOperator) and op.kind == "ef" and op.name == "full"
    assert rel_error(dense_matrix(op), expected) < RTOL
    # the library's own reference (jacrev of the per-example losses) agrees
    assert rel_error(reference_matrix(model, CE, data, kind="ef"), expected) < RTOL
    # and the independent one of tests/references.py (nothing from layerhessians)
    independent = dense_reference(model, CE, data, "ef", reduction="mean")
    assert rel_error(dense_matrix(op), independent) < RTOL
    assert rel_error(independent, expected) < RTOL
    # the batches are weighted as one mean over all examples
    one = (torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
    assert rel_error(dense_matrix(hessian_operator(model, CE, one, kind="ef")), expected) < RTOL
    # every parameter as its own block, on one graph
    ops = layer_operators(model, CE, data, kind="ef",
                          layers={n: p for n, p in model.named_parameters()})
    for n, s in offsets(model).items():
        assert rel_error(dense_matrix(ops[n]), expected[s, s]) < RTOL, n
    assert ops["full"].graph.forward_passes == len(data)


def test_ef_rebuilt_graph_reduction_hook_and_float32():
    model, data = PROBLEMS["conv"].build(sizes=SIZES)
    expected = empirical_fisher(model, CE, data)
    naive = hessian_operator(model, CE, data, kind="ef", reuse_graph=False)
    assert rel_error(dense_matrix(naive), expected) < RTOL

    reduction = TwoIdenticalRanks()
    op = hessian_operator(model, CE, data, kind="ef", reduction=reduction)
    assert rel_error(dense_matrix(op), expected) < RTOL
    assert reduction.sums == op.dim
    op32 = hessian_operator(PROBLEMS["conv"].make_model().float(), CE, data, kind="ef")
    assert op32.dtype == torch.float32
    assert rel_error(dense_matrix(op32), expected) < 1e-5


def test_ef_with_mse_loss():
    model = PROBLEMS["mlp"].make_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    mse = nn.MSELoss()
    expected = empirical_fisher(model, mse, data)
    assert rel_error(dense_matrix(hessian_operator(model, mse, data, kind="ef")), expected) < RTOL
    independent = dense_reference(model, mse, data, "ef", reduction="mean")
    assert rel_error(dense_matrix(hessian_operator(model, mse, data, kind="ef")),
                     independent) < RTOL


def test_ef_refuses_what_it_cannot_define():
    model, data = PROBLEMS["conv"].build()
    with pytest.raises(UserError, match="bn_mode 'eval'"):
        hessian_operator(model, CE, data, kind="ef", bn_mode="train")
    with pytest.raises(UserError, match="bn_mode 'eval'"):
        reference_matrix(model, CE, data, kind="ef", bn_mode="train")
    # a summed loss has the same per-example losses: the same EF (the reduction is detected)
    summed = hessian_operator(model, nn.CrossEntropyLoss(reduction="sum"), data, kind="ef")
    assert rel_error(dense_matrix(summed), empirical_fisher(model, CE, data)) < RTOL
    independent = dense_reference(model, nn.CrossEntropyLoss(reduction="sum"), data, "ef",
                                  reduction="sum")
    assert rel_error(dense_matrix(summed), independent) < RTOL
    # class weights with reduction="mean" are neither a mean nor a sum: refused
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    op = hessian_operator(model, weighted, data, kind="ef")
    with pytest.raises(UserError, match="neither the mean nor the sum of its per-example"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    # a graph built for the Hessian cannot give EF products
    with pytest.raises(UserError, match="cannot give"):
        EmpiricalFisherOperator(hessian_operator(model, CE, data).graph, [0], ["conv1.weight"])


def test_ef_leaves_the_model_unchanged():
    model, data = PROBLEMS["conv"].build()
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    op = hessian_operator(model, CE, data, kind="ef")
    op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_ef_graph_cost_is_the_per_example_gradients():
    model, data = PROBLEMS["mlp"].build()
    x, y = data[0]
    cost = measure_graph_cost(model, CE, x, y, kind="ef")
    dim = sum(p.numel() for p in model.parameters())
    assert cost.per_batch == 0 and cost.per_example >= dim * 8

"""The operator base class: arithmetic on one graph (H - G is the residual kind), scipy
export, and the registry of kinds (every kind against its own dense reference)."""

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from layerhessians.curvature import (
    KIND_CLASSES,
    KINDS,
    CurvatureGraph,
    GGNOperator,
    HessianOperator,
    LinearCombination,
    MatrixOperator,
    ResidualOperator,
    curvature_graph,
    dense_matrix,
    hessian_operator,
    reference_matrix,
)
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError
from problems import CE, DEVICES, DTYPES, PROBLEMS, rel_error
from references import dense_reference

RTOL = 1e-10


def shared_graph(problem, kinds):
    model, data = PROBLEMS[problem].build()
    params, names = resolve_params(model)
    return model, data, curvature_graph(model, CE, data, params, kinds), names


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("problem", ["mlp", "conv"])
def test_every_kind_matches_its_dense_reference(problem, kind):
    model, data = PROBLEMS[problem].build()
    op = hessian_operator(model, CE, data, kind=kind)
    assert isinstance(op, KIND_CLASSES[kind]) and op.kind == kind
    reference = reference_matrix(model, CE, data, kind=kind)
    assert rel_error(dense_matrix(op), reference) < RTOL
    independent = dense_reference(model, CE, data, kind, reduction="mean")
    assert rel_error(dense_matrix(op), independent) < RTOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_on_every_device_and_dtype(kind, device, dtype):
    # the float64 CPU reference; float32 carries its own rounding (about 1e-7 per operation)
    model, data = PROBLEMS["conv"].build()
    reference = reference_matrix(model, CE, data, kind=kind)
    independent = dense_reference(model, CE, data, kind, reduction="mean")
    model, data = PROBLEMS["conv"].build(device=device, dtype=dtype)
    op = hessian_operator(model, CE, data, kind=kind)
    tolerance = RTOL if dtype == torch.float64 else 1e-4
    assert rel_error(dense_matrix(op).to("cpu", torch.float64), reference) < tolerance
    assert rel_error(dense_matrix(op).to("cpu", torch.float64), independent) < tolerance


@pytest.mark.parametrize("problem", ["mlp", "conv"])
def test_hessian_minus_ggn_is_the_residual_in_one_pass(problem):
    model, data, graph, names = shared_graph(problem, ["hessian", "ggn"])
    indices = range(len(names))
    h, g = HessianOperator(graph, indices, names), GGNOperator(graph, indices, names)
    difference = h - g
    assert isinstance(difference, LinearCombination) and difference.dim == h.dim
    residual = ResidualOperator(graph, indices, names)
    assert torch.equal(dense_matrix(difference), dense_matrix(residual))
    expected = reference_matrix(model, CE, data, kind="residual")
    assert rel_error(dense_matrix(difference), expected) < RTOL
    independent = dense_reference(model, CE, data, "residual", reduction="mean")
    assert rel_error(dense_matrix(difference), independent) < RTOL
    before = graph.forward_passes
    v = torch.randn(h.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hv, gv = h.matvec(v), g.matvec(v)
    assert rel_error((2.5 * h + g).matvec(v), 2.5 * hv + gv) < 1e-13
    assert rel_error((-(h * 0.5)).matvec(v), -0.5 * hv) < 1e-13
    assert rel_error((h - 3 * g - h).matvec(v), -3 * gv) < 1e-13
    assert graph.forward_passes == before  # kept graph: no forward pass for combinations


def test_combinations_refuse_other_problems_or_blocks():
    model, data, graph, names = shared_graph("mlp", ["hessian", "ggn"])
    h = HessianOperator(graph, range(len(names)), names)
    other_data = [(x + 1.0, y) for x, y in data]
    with pytest.raises(UserError, match="differ in the data.*kind='residual'"):
        h - hessian_operator(model, CE, other_data)
    with pytest.raises(UserError, match="differ in the model"):
        h - hessian_operator(PROBLEMS["mlp"].make_model(), CE, data)
    with pytest.raises(UserError, match="differ in the loss"):
        h - hessian_operator(model, torch.nn.CrossEntropyLoss(label_smoothing=0.1), data)
    block = HessianOperator(graph, [0], names[:1])
    with pytest.raises(UserError, match="one parameter block"):
        h + block
    with pytest.raises(TypeError):
        h * torch.ones(3)


@pytest.mark.parametrize("problem", ["mlp", "conv"])
def test_separately_built_operators_combine_on_equal_problems(problem):
    # the README's H - G: two hessian_operator calls on the same model, loss and (equal,
    # separately built) data give the residual, checked against its dense reference
    model, data = PROBLEMS[problem].build()
    h = hessian_operator(model, CE, data)
    g = hessian_operator(model, torch.nn.CrossEntropyLoss(), [(x.clone(), y.clone())
                                                             for x, y in data], kind="ggn")
    difference = h - g
    assert len({id(op.graph) for _, op in difference.terms}) == 1
    expected = reference_matrix(model, CE, data, kind="residual")
    assert rel_error(dense_matrix(difference), expected) < RTOL
    independent = dense_reference(model, CE, data, "residual", reduction="mean")
    assert rel_error(dense_matrix(difference), independent) < RTOL
    assert rel_error(dense_matrix(h), reference_matrix(model, CE, data)) < RTOL  # h unchanged
    assert rel_error(dense_matrix(h), dense_reference(model, CE, data, reduction="mean")) < RTOL
    block = dict(model.named_parameters())
    first = next(iter(block))
    hb = hessian_operator(model, CE, data, params={first: block[first]})
    gb = hessian_operator(model, CE, data, params={first: block[first]}, kind="ggn")
    expected = reference_matrix(model, CE, data, params=[block[first]], kind="residual")
    assert rel_error(dense_matrix(hb - gb), expected) < RTOL
    independent = dense_reference(model, CE, data, "residual", [block[first]], reduction="mean")
    assert rel_error(dense_matrix(hb - gb), independent) < RTOL


def test_a_graph_for_one_kind_refuses_another():
    model, data, graph, names = shared_graph("mlp", "hessian")
    with pytest.raises(UserError, match="cannot give"):
        GGNOperator(graph, range(len(names)), names)
    with pytest.raises(UserError, match="not a kind"):
        CurvatureGraph(model, CE, data, graph.params, "hessian")
    with pytest.raises(UserError, match="kind"):
        curvature_graph(model, CE, data, graph.params, "fisher")


@pytest.mark.parametrize("kind", KINDS)
def test_to_scipy_products_match(kind):
    model, data = PROBLEMS["conv"].build()
    op = hessian_operator(model, CE, data, kind=kind)
    linear = op.to_scipy()
    assert isinstance(linear, scipy.sparse.linalg.LinearOperator) and linear.shape == op.shape
    rng = np.random.default_rng(0)
    v, block = rng.standard_normal(op.dim), rng.standard_normal((op.dim, 3))
    expected = op.matvec(torch.from_numpy(v)).numpy()
    assert np.allclose(linear.matvec(v), expected, rtol=1e-13, atol=0)
    assert np.allclose(linear.rmatvec(v), expected, rtol=1e-13, atol=0)
    assert np.allclose(linear.matmat(block), op.matmat(torch.from_numpy(block)).numpy(),
                       rtol=1e-13, atol=0)
    # scipy's eigensolver on the export gives the dense top eigenvalue
    top = scipy.sparse.linalg.eigsh(linear, k=1, which="LA", return_eigenvectors=False)
    dense = torch.linalg.eigvalsh(dense_matrix(op)).max().item()
    assert abs(top[0] - dense) <= 1e-8 * abs(dense)


def test_matrix_operator_shares_the_base_interface():
    matrix = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    op = MatrixOperator(matrix)
    assert op.shape == (2, 2)
    assert np.allclose(op.to_scipy().matvec(np.array([1.0, -1.0])), [1.0, -2.0])
    with op as same:
        assert torch.equal(same @ torch.eye(2, dtype=torch.float64), matrix)

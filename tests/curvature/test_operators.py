"""Curvature operators against dense float64 references (torch.func), on tiny models."""

import pytest
import torch
from torch import nn

from layerhessians.curvature import (
    dense_matrix,
    hessian_operator,
    reference_matrix,
)
from layerhessians.errors import UserError
from layerhessians.spectra import layer_operators
from problems import (
    CE,
    TwoIdenticalRanks,
    assert_state_equal,
    conv_data,
    mlp_data,
    rel_error,
    state_of,
    tiny_convnet,
    tiny_mlp,
)
from references import dense_reference

RTOL = 1e-10


CASES = [
    ("mlp", tiny_mlp, mlp_data, "eval"),
    ("conv", tiny_convnet, conv_data, "eval"),
    # batch statistics couple the examples: the data come as one batch (several are refused)
    ("conv", tiny_convnet, lambda: conv_data(sizes=(10,)), "train"),
]


# conv1.bias before train-mode batch norm has a Hessian block that is zero up to rounding
@pytest.mark.filterwarnings("ignore:the operator is not symmetric")
@pytest.mark.parametrize("kind", ["hessian", "ggn", "residual"])
@pytest.mark.parametrize("name,make_model,make_data,bn_mode", CASES)
def test_full_and_block_products_match_torch_func(name, make_model, make_data, bn_mode, kind):
    model, data = make_model(), make_data()
    model.train()  # the caller's mode must survive
    state = state_of(model)
    reference = reference_matrix(model, CE, data, kind=kind, bn_mode=bn_mode)
    assert torch.linalg.norm(reference) > 0
    independent = dense_reference(model, CE, data, kind, reduction="mean", bn_mode=bn_mode)
    # full operator
    op = hessian_operator(model, CE, data, kind=kind, bn_mode=bn_mode)
    assert op.name == "full" and op.dim == reference.shape[0]
    assert rel_error(dense_matrix(op), reference) < RTOL
    assert rel_error(dense_matrix(op), independent) < RTOL
    # every parameter as its own block, and one two-parameter block, all on one graph
    ops = layer_operators(model, CE, data, kind=kind, bn_mode=bn_mode,
                          layers={n: p for n, p in model.named_parameters()})
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = slice(start, start + p.numel())
        start += p.numel()
    for n, block_op in ops.items():
        if n == "full":
            continue
        s = offsets[n]
        block_ref = reference[s, s]
        got = dense_matrix(block_op)
        # relative error, or roundoff level for blocks that vanish (residual of the last layer)
        tolerance = RTOL * torch.linalg.norm(block_ref) + 1e-14 * torch.linalg.norm(reference)
        assert torch.linalg.norm(got - block_ref) <= tolerance, n
        block_independent = independent[s, s]
        tolerance = (RTOL * torch.linalg.norm(block_independent)
                     + 1e-14 * torch.linalg.norm(independent))
        assert torch.linalg.norm(got - block_independent) <= tolerance, n
    assert ops["full"].graph.forward_passes == len(data)  # one shared graph, built once
    named = dict(model.named_parameters())
    names = [list(named)[-2], list(named)[0]]  # two weights, out of model order
    pair = hessian_operator(model, CE, data, params={n: named[n] for n in names}, kind=kind,
                            bn_mode=bn_mode)
    assert pair.name == "+".join(names)
    idx = torch.cat([torch.arange(offsets[n].start, offsets[n].stop) for n in names])
    assert rel_error(dense_matrix(pair), reference[idx][:, idx]) < RTOL
    assert rel_error(dense_matrix(pair), independent[idx][:, idx]) < RTOL
    pair_independent = dense_reference(model, CE, data, kind, [named[n] for n in names],
                                       reduction="mean", bn_mode=bn_mode)
    assert rel_error(dense_matrix(pair), pair_independent) < RTOL
    assert_state_equal(model, state)


def test_unequal_batches_weighted_as_one_mean():
    model = tiny_mlp()
    batches = mlp_data()
    one = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    a = dense_matrix(hessian_operator(model, CE, batches))
    b = dense_matrix(hessian_operator(model, CE, one))
    assert rel_error(a, b) < RTOL
    # a wrong (unweighted) average of the two batch Hessians differs clearly
    h0 = dense_matrix(hessian_operator(model, CE, batches[0]))
    h1 = dense_matrix(hessian_operator(model, CE, batches[1]))
    assert rel_error((h0 + h1) / 2, b) > 1e-3
    assert rel_error((7 * h0 + 5 * h1) / 12, b) < RTOL


def test_ggn_exact_for_mse_loss():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(9, 5, generator=g, dtype=torch.float64),
            torch.randn(9, 3, generator=g, dtype=torch.float64))
    mse = nn.MSELoss()
    for kind in ("ggn", "residual", "hessian"):
        op = hessian_operator(model, mse, data, kind=kind)
        assert rel_error(dense_matrix(op), reference_matrix(model, mse, data, kind=kind)) < RTOL
        independent = dense_reference(model, mse, data, kind, reduction="mean")
        assert rel_error(dense_matrix(op), independent) < RTOL


def test_matvec_contract_dtype_shape_and_no_grad():
    model = tiny_convnet()
    op = hessian_operator(model, CE, conv_data())
    v = torch.randn(op.dim, dtype=torch.float64)
    with torch.no_grad():
        hv = op.matvec(v)
    assert hv.shape == (op.dim,) and hv.dtype == torch.float64
    assert op.matvec(v.float()).dtype == torch.float32
    assert torch.allclose(op.matmat(torch.stack([v, 2 * v], 1))[:, 1], 2 * hv)
    assert torch.allclose(op @ v, hv)
    with pytest.raises(UserError):
        op.matvec(torch.zeros(op.dim + 1))


def test_float32_model_close_to_float64_reference():
    model64 = tiny_convnet()
    model32 = tiny_convnet().float()
    data = conv_data()
    reference = reference_matrix(model64, CE, data)
    op = hessian_operator(model32, CE, data)  # float64 inputs are cast to float32
    assert op.dtype == torch.float32
    assert rel_error(dense_matrix(op), reference) < 1e-5
    assert rel_error(dense_matrix(op), dense_reference(model64, CE, data, reduction="mean")) < 1e-5


def test_reuse_graph_off_gives_same_products_and_more_forwards():
    model, data = tiny_convnet(), conv_data()
    fast = hessian_operator(model, CE, data)
    naive = hessian_operator(model, CE, data, reuse_graph=False)
    v = torch.randn(fast.dim, dtype=torch.float64)
    for _ in range(3):
        assert rel_error(naive.matvec(v), fast.matvec(v)) < 1e-12
    assert fast.graph.forward_passes == 2 and naive.graph.forward_passes == 6


def test_parameters_must_not_change_while_graph_alive():
    model, data = tiny_mlp(), mlp_data()
    op = hessian_operator(model, CE, data)
    v = torch.randn(op.dim, dtype=torch.float64)
    before = op.matvec(v)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(UserError, match="release"):
        op.matvec(v)
    op.release()
    after = op.matvec(v)
    expected = dense_matrix(hessian_operator(model, CE, data)) @ v
    assert rel_error(after, expected) < RTOL and rel_error(after, before) > 1e-6
    with hessian_operator(model, CE, data) as op2:
        op2.matvec(v)
        assert op2.graph.built is not None
    assert op2.graph.built is None


def test_reduction_hook_routes_every_product():
    model, data = tiny_mlp(), mlp_data()
    reduction = TwoIdenticalRanks()
    op = hessian_operator(model, CE, data, reduction=reduction)
    reference = dense_matrix(hessian_operator(model, CE, data))
    assert rel_error(dense_matrix(op), reference) < RTOL
    assert reduction.sums == op.dim


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("caller_training", [True, False])
def test_batch_norm_state_and_modes_unchanged(bn_mode, caller_training):
    model = tiny_convnet()
    model.train(caller_training)
    model.fc.train(not caller_training)  # mixed modes survive too
    state = state_of(model)
    data = conv_data(sizes=(10,)) if bn_mode == "train" else conv_data()
    for kind in ("hessian", "ggn"):
        op = hessian_operator(model, CE, data, kind=kind, bn_mode=bn_mode)
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
        op.release()
        hessian_operator(model, CE, data, kind=kind, bn_mode=bn_mode,
                         reuse_graph=False).matvec(torch.ones(op.dim, dtype=torch.float64))
    assert_state_equal(model, state)


def test_bn_modes_differ():
    model, data = tiny_convnet(), conv_data(sizes=(10,))
    a = dense_matrix(hessian_operator(model, CE, data, bn_mode="eval"))
    b = dense_matrix(hessian_operator(model, CE, data, bn_mode="train"))
    assert rel_error(a, b) > 1e-3


def test_bad_input_raises_user_error():
    model, data = tiny_mlp(), mlp_data()
    with pytest.raises(UserError, match="empty"):
        hessian_operator(model, CE, [])
    with pytest.raises(UserError, match="no examples"):
        hessian_operator(model, CE, (torch.zeros(0, 5, dtype=torch.float64),
                                     torch.zeros(0, dtype=torch.long)))
    with pytest.raises(UserError, match="empty"):
        hessian_operator(model, CE, data, params=[])
    model[2].bias.requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        hessian_operator(model, CE, data, params=[model[2].bias])
    with pytest.raises(UserError, match="not a parameter"):
        hessian_operator(model, CE, data, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(UserError, match="kind"):
        hessian_operator(model, CE, data, kind="fisher")
    with pytest.raises(UserError, match="bn_mode"):
        hessian_operator(model, CE, data, bn_mode="training")
    with pytest.raises(UserError, match="scalar"):
        op = hessian_operator(model, nn.CrossEntropyLoss(reduction="none"), data)
        op.matvec(torch.zeros(op.dim, dtype=torch.float64))
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(UserError, match="no trainable"):
        hessian_operator(frozen, CE, data)


def test_train_mode_batch_norm_matches_central_differences():
    """An independent check of the train-mode products (torch.func is wrong there)."""
    model, data = tiny_convnet(), conv_data(sizes=(10,))
    op = hessian_operator(model, CE, data, bn_mode="train")
    params = list(model.parameters())

    def gradient():
        total = sum(x.shape[0] for x, _ in data)
        grads = [torch.zeros_like(p) for p in params]
        modes = [m.training for m in model.modules()]
        state = {k: v.clone() for k, v in model.named_buffers()}
        model.train()
        for x, y in data:
            for g, gb in zip(grads, torch.autograd.grad(CE(model(x), y), params)):
                g += gb * x.shape[0] / total
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        for k, v in model.named_buffers():
            v.copy_(state[k])
        return torch.cat([g.reshape(-1) for g in grads])

    g = torch.Generator().manual_seed(5)
    v = torch.randn(op.dim, generator=g, dtype=torch.float64)
    hv = op.matvec(v)
    op.release()
    eps = 1e-5
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    torch.nn.utils.vector_to_parameters(flat + eps * v, params)
    plus = gradient()
    torch.nn.utils.vector_to_parameters(flat - eps * v, params)
    minus = gradient()
    torch.nn.utils.vector_to_parameters(flat, params)
    assert rel_error((plus - minus) / (2 * eps), hv) < 1e-7


def _node_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_lean_convolutions_change_no_value(kind):
    """The lean convolution graph gives the native products (to rounding)."""
    model, data = tiny_convnet(), conv_data()
    lean = layer_operators(model, CE, data, kind=kind)
    lean["full"].graph.build()
    batch = lean["full"].graph.built[0]
    first = batch.grads[0] if kind == "hessian" else batch.jt_dummy[0]
    assert {"_ConvWeightGradBackward", "_ConvInputGradBackward"} <= _node_names(first)
    native = layer_operators(model, CE, data, kind=kind, conv_double_backward="native")
    native["full"].graph.build()
    assert "_ConvWeightGradBackward" not in _node_names(
        native["full"].graph.built[0].grads[0] if kind == "hessian"
        else native["full"].graph.built[0].jt_dummy[0])
    for name in lean:
        assert rel_error(dense_matrix(lean[name]), dense_matrix(native[name])) < 1e-13, name

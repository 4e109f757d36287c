"""math_attention: Hessian-vector products through a stock nn.TransformerEncoderLayer equal
a dense float64 Hessian, and the user's attention settings are restored."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from layerhessians.curvature.attention import math_attention

SDP_FLAGS = ("flash", "mem_efficient", "math", "cudnn")


def sdp_state():
    return {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in SDP_FLAGS}


class Classifier(nn.Module):
    """A stock encoder layer over a few tokens, mean-pooled, with a classification head."""

    def __init__(self, width=4, heads=2, hidden=6, classes=3):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def problem(seed=0):
    torch.manual_seed(seed)
    model = Classifier().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)  # batch 5, 3 tokens, width 4
    y = torch.tensor([0, 1, 2, 0, 1])
    return model, x, y


def flat_loss(model, x, y):
    """The mean cross-entropy as a function of all parameters, flattened in
    ``named_parameters()`` order, and the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss, flat


def dense_hessian(model, x, y):
    """float64 Hessian [dim, dim] by torch.autograd.functional.hessian (reverse over reverse).

    Not torch.func.hessian: in torch 2.13 its forward-over-reverse is wrong through an affine
    LayerNorm (the input-weight cross derivatives; 0.05 off here, against central
    differences of the gradient)."""
    loss, flat = flat_loss(model, x, y)
    return hessian(loss, flat)


def central_difference_columns(model, x, y, columns, step=1e-5):
    """Hessian columns by central differences of the gradient (first-order AD only)."""
    loss, flat = flat_loss(model, x, y)
    result = []
    for j in columns:
        e = torch.zeros_like(flat)
        e[j] = step
        result.append((grad(loss)(flat + e) - grad(loss)(flat - e)) / (2 * step))
    return torch.stack(result, dim=1)


def hvp(model, x, y, vector):
    """One Hessian-vector product by double backward (what the engine does)."""
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    parts = vector.split([p.numel() for p in params])
    dot = sum((g * v.view_as(g)).sum() for g, v in zip(grads, parts))
    return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hessian_vector_products_through_attention_equal_the_dense_hessian(mode):
    model, x, y = problem()
    getattr(model, mode)()
    with math_attention():
        matrix = dense_hessian(model, x, y)
        dim = matrix.shape[0]
        assert dim == sum(p.numel() for p in model.parameters()) == 169
        torch.testing.assert_close(matrix, matrix.T, rtol=1e-10, atol=1e-12)
        # the reference against first-order differences: attention, norms, head columns
        columns = [0, 50, 70, 140, 147, 160]
        torch.testing.assert_close(matrix[:, columns],
                                   central_difference_columns(model, x, y, columns),
                                   rtol=1e-5, atol=1e-7)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            v = torch.randn(dim, generator=generator, dtype=torch.float64)
            torch.testing.assert_close(hvp(model, x, y, v), matrix @ v, rtol=1e-9, atol=1e-11)
    assert matrix.abs().max() > 1e-3  # a non-trivial Hessian


def test_the_engine_operator_through_attention_equals_the_dense_hessian():
    from layerhessians.curvature import dense_matrix, hessian_operator

    model, x, y = problem(seed=2)
    with math_attention():
        reference = dense_hessian(model.eval(), x, y)
        op = hessian_operator(model, nn.CrossEntropyLoss(), [(x, y)])
        torch.testing.assert_close(dense_matrix(op), reference, rtol=1e-9, atol=1e-11)


def test_the_users_attention_settings_are_restored():
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        before = sdp_state()
        assert not before["math"]
        with math_attention():
            assert sdp_state() == {"flash": False, "mem_efficient": False, "math": True,
                                   "cudnn": False}
            assert not torch.backends.mha.get_fastpath_enabled()
        assert sdp_state() == before
        with pytest.raises(ZeroDivisionError), math_attention():
            raise ZeroDivisionError
        assert sdp_state() == before
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with math_attention():
            pass
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class FusedOps(TorchDispatchMode):
    """Records the fused attention kernels a forward pass dispatches to."""

    FUSED = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.seen.update(f for f in self.FUSED if f in name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True])
def test_no_fused_attention_kernel_runs_inside(grad):
    model, x, _ = problem()
    model.eval()
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    with torch.set_grad_enabled(grad), FusedOps() as outside:
        model(x)
        mha(x, x, x, need_weights=False)
    # PyTorch takes its fused inference path only without grad; with grad, fused SDPA
    assert outside.seen, "this torch runs no fused attention kernel: the test is moot"
    if grad:  # the fast path never sits on a differentiated path
        assert not outside.seen & {"_transformer_encoder_layer_fwd", "_native_multi_head_attention"}
    with math_attention(), torch.set_grad_enabled(grad), FusedOps() as inside:
        model(x)
        mha(x, x, x, need_weights=False)
    assert inside.seen == set()

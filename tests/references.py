"""Dense float64 curvature references for the tests, written from the definitions with
``torch.func.functional_call`` and plain ``torch.autograd`` only: this module imports NOTHING from ``layerhessians``, so a
bug in one of the engine's helpers (loss-reduction detection, batching, parameter selection,
its forward modes) cannot be on both sides of a comparison.

    from references import dense_reference
    H = dense_reference(model, CE, batches, "hessian", reduction="mean")

The loss. ``L(theta) = (1/N) sum_b c_b loss_fn(model(x_b), y_b)`` over the batches ``b`` of
``N`` examples in all, with ``c_b = n_b`` when ``loss_fn`` averages over its batch
(``reduction="mean"``, stated by the caller, never detected) and ``c_b = 1`` when it adds
(``"sum"``): the MEAN over all examples of the per-example losses. Every module runs in eval
mode; batch norm uses its running statistics (``bn_mode="eval"``) or each batch's own
(``"train"``, then ``L`` is the per-batch-weighted sum above, each batch normalised by its own
statistics, as the engine defines it for one batch). The block ``theta`` is a list of the
model's parameters (default: every trainable one), flattened in the order given; the others
stay at their values. Targets are indexed by example along their first dimension (the
empirical Fisher slices them ``y[n:n+1]``); forwards that draw random numbers are not
supported (the engine's seeded draw is its own).

- Hessian ``H = d^2 L / dtheta^2``: row ``i`` is the gradient of ``dL/dtheta_i`` (plain double
  backward, one row at a time, no vmap).
- GGN ``G = sum_b (c_b / N) J_b^T H_b J_b``: ``J_b`` the Jacobian (one backward per row) of
  the batch's floating outputs (flattened and concatenated), ``H_b`` the Hessian (as above) of
  ``loss_fn`` in them.
- Residual ``R = H - G``.
- Empirical Fisher ``EF = (1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of the per-example loss
  ``loss_fn(model(x[n:n+1]), y[n:n+1])`` (the model run on that example alone; undefined when
  batch norm uses batch statistics: refused).

Why not ``torch.func.hessian``: in torch 2.13 it (``jacfwd(jacrev(.))``), and
``jacrev(jacrev(.))``, are wrong through batch norm using batch statistics and through an
affine ``LayerNorm`` (relative errors 0.02-0.09 on the tiny problems), and ``jacfwd(grad(.))``
fails through ``nn.MSELoss`` ("ZeroTensors are immutable"); none of the ``torch.func``
transforms runs through ``torch.utils.checkpoint`` (saved tensor hooks). The plain backward
passes run everywhere the engine does. The row-by-row double backward is
checked against forward over reverse (``jacfwd(grad(.))``, a different AD mode) in
tests/curvature/test_dense_references.py.
"""

import copy

import torch
import torch.nn.attention
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

REFERENCE_KINDS = ("hessian", "ggn", "residual", "ef")
REDUCTIONS = ("mean", "sum")
BN_MODES = ("eval", "train")


def _batches(data):
    """A list of ``(inputs, targets)``; a single ``(Tensor, Tensor)`` pair is one batch."""
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        return [data]
    return list(data)


def _float64(t, device):
    return t.to(device=device, dtype=torch.float64 if t.is_floating_point() else None)


def _uses_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and (m.training or m.running_mean is None) for m in model.modules())


class Setup:
    """The model's float64 copy in the asked modes, the block and the batches."""

    def __init__(self, model, params, data, reduction, bn_mode):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, not {bn_mode!r}")
        named = dict(model.named_parameters())
        if params is None:
            params = [p for p in named.values() if p.requires_grad]
        elif isinstance(params, dict):
            params = list(params.values())
        by_id = {id(p): n for n, p in named.items()}
        self.names = [by_id[id(p)] for p in params]
        self.device = params[0].device
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        if bn_mode == "train":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    # plain torch's batch-statistics path, with nothing written to buffers
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        for m in self.model.modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                m.sparse = False  # the same function; dense gradients for the double backward
        copied = dict(self.model.named_parameters())
        self.shapes = [copied[n].shape for n in self.names]
        self.sizes = [copied[n].numel() for n in self.names]
        self.flat0 = torch.cat([copied[n].detach().reshape(-1) for n in self.names])
        self.batches = [(_float64(x, self.device), _float64(y, self.device))
                        for x, y in _batches(data)]
        self.total = sum(x.shape[0] for x, _ in self.batches)
        self.weights = [float(x.shape[0]) if reduction == "mean" else 1.0
                        for x, _ in self.batches]

    def outputs(self, flat: Tensor, x: Tensor):
        values = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes),
                                                   self.shapes)}
        return functional_call(self.model, values, (x,))


def _floating_leaves(outputs):
    return [t for t in tree_flatten(outputs)[0] if torch.is_tensor(t) and t.is_floating_point()]


def _flat(outputs) -> Tensor:
    return torch.cat([t.reshape(-1) for t in _floating_leaves(outputs)])


def _unflat(flat: Tensor, like):
    leaves, spec = tree_flatten(like)
    rebuilt, start = [], 0
    for t in leaves:
        if torch.is_tensor(t) and t.is_floating_point():
            rebuilt.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        else:
            rebuilt.append(t)
    return tree_unflatten(rebuilt, spec)


def jacobian_of(f, z: Tensor) -> Tensor:
    """The Jacobian [m, n] of the vector function ``f`` [m] at ``z`` [n]: row ``i`` is the
    gradient of ``f_i`` (one backward per row, no vmap)."""
    z = z.detach().requires_grad_(True)
    values = f(z)
    rows = []
    for i in range(values.numel()):
        row = None
        if values.requires_grad:
            (row,) = torch.autograd.grad(values[i], z, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(z) if row is None else row)
    return torch.stack(rows).detach()


def hessian_of(f, z: Tensor) -> Tensor:
    """The Hessian [n, n] of the scalar ``f`` at the vector ``z`` [n]: row ``i`` is the
    gradient of ``df/dz_i`` (double backward, one row at a time)."""
    def gradient(w):
        (g,) = torch.autograd.grad(f(w), w, create_graph=True, allow_unused=True,
                                   materialize_grads=True)
        return g

    return jacobian_of(gradient, z)


def mean_loss(setup: "Setup", loss_fn):
    """``L`` as a function of the flattened block [dim]."""
    def loss(flat):
        return sum(c * loss_fn(setup.outputs(flat, x), y)
                   for c, (x, y) in zip(setup.weights, setup.batches)) / setup.total

    return loss


def _hessian(setup: Setup, loss_fn) -> Tensor:
    return hessian_of(mean_loss(setup, loss_fn), setup.flat0)


def _ggn(setup: Setup, loss_fn) -> Tensor:
    result = torch.zeros(setup.flat0.numel(), setup.flat0.numel(), dtype=torch.float64,
                         device=setup.device)
    for c, (x, y) in zip(setup.weights, setup.batches):
        out0 = setup.outputs(setup.flat0, x)
        flat_out0 = _flat(out0).detach()
        jac = jacobian_of(lambda flat, x=x: _flat(setup.outputs(flat, x)), setup.flat0)
        h_out = hessian_of(lambda o, y=y, out0=out0: loss_fn(_unflat(o, out0), y), flat_out0)
        result += (c / setup.total) * (jac.T @ h_out @ jac)
    return result


def _empirical_fisher(setup: Setup, loss_fn) -> Tensor:
    if _uses_batch_statistics(setup.model):
        raise ValueError("the empirical Fisher needs per-example losses: undefined with "
                         "batch norm using batch statistics")
    rows = []
    for x, y in setup.batches:
        for n in range(x.shape[0]):
            def example_loss(flat, n=n, x=x, y=y):
                return loss_fn(setup.outputs(flat, x[n:n + 1]), y[n:n + 1])

            rows.append(jacobian_of(lambda flat, f=example_loss: f(flat).reshape(1),
                                    setup.flat0)[0])
    g = torch.stack(rows)  # [N, dim]
    return g.T @ g / setup.total


def dense_reference(model: nn.Module, loss_fn, data, kind: str = "hessian", params=None, *,
                    reduction: str, bn_mode: str = "eval") -> Tensor:
    """The dense float64 curvature matrix [dim, dim] (on the CPU) of the mean loss (above).

    Args:
        model: the network (unchanged: a float64 deep copy is differentiated).
        loss_fn: ``loss_fn(outputs, targets)``, the mean or the sum over its batch.
        data: a list of ``(inputs, targets)`` batches, or one pair.
        kind: ``"hessian"``, ``"ggn"``, ``"residual"`` (H - G) or ``"ef"``.
        params: a list (or ``{name: parameter}`` dict) of the model's parameters: the block;
            ``None`` for every trainable parameter.
        reduction: ``"mean"`` or ``"sum"``: what ``loss_fn`` does over its batch.
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (each batch's statistics).

    Raises:
        ValueError: an unknown kind, reduction or bn_mode; the empirical Fisher with batch
            statistics.
    """
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"kind must be one of {REFERENCE_KINDS}, not {kind!r}")
    setup = Setup(model, params, data, reduction, bn_mode)
    with torch.enable_grad(), torch.nn.attention.sdpa_kernel(
            torch.nn.attention.SDPBackend.MATH):
        if kind == "hessian":
            matrix = _hessian(setup, loss_fn)
        elif kind == "ggn":
            matrix = _ggn(setup, loss_fn)
        elif kind == "residual":
            matrix = _hessian(setup, loss_fn) - _ggn(setup, loss_fn)
        else:
            matrix = _empirical_fisher(setup, loss_fn)
    return matrix.detach().to("cpu", torch.float64)

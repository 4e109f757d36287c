"""A differentiable estimate of the trace of a model's curvature, to add to the loss.

:func:`trace_penalty` returns a 0-dim tensor with a graph back to the parameters, so that
``(loss + gamma * penalty).backward()`` trains with it. Its expectation over the probes is
the trace of the chosen diagonal block(s) of the curvature of the MEAN loss over the
examples of ``data``, defined as :func:`~layerhessians.curvature.hessian_operator` defines
it (per-example losses ``l_n``, the reduction of ``loss_fn`` detected; eval mode, batch norm
in ``bn_mode``; the model's buffers and modes are never changed).

Estimators (``B``: the union of the blocks; ``P``: probes; ``N``: examples):

- ``hutchinson`` (the original's): ``(1/P) sum_p v_p^T H_BB v_p`` with ``v_p`` in parameter
  space (Hutchinson, 1990). ``E = tr H_BB`` for any model and loss. One Hessian-vector
  product per probe; its gradient is a third-order derivative. Cross-block terms
  ``v_a^T H_ab v_b`` have mean zero and add variance.
- ``ggn``: probes in OUTPUT space. With ``S_n S_n^T`` the loss's Hessian in example ``n``'s
  outputs (:mod:`~layerhessians.regularization.output_curvature`, ``S_n`` kept in the
  graph so that the gradient is unbiased) and ``J_n = df_n/dtheta_B``:
  ``tr G_BB = (1/N) sum_n ||J_n^T S_n||_F^2``, and ``E ||J_n^T S_n z||^2 = tr(J_n^T S_n
  S_n^T J_n)`` for ``E[z z^T] = I``. Double backward only. Two forms:

  * ``per-example``: ``(1/(N P)) sum_{n,p} ||J_n^T S_n z_{np}||^2``; variance ``(2 /
    (N^2 P)) sum_n ||G_n||_F^2`` for Gaussian probes (``G_n = J_n^T S_n S_n^T J_n``). Where
    every penalised parameter is a weight or bias of a Linear/Conv2d layer run once, from
    one backward pass per probe and the layers' inputs
    (:mod:`~layerhessians.regularization.per_example_norms`); otherwise by
    ``torch.func.vmap`` over the examples (same probes, same numbers);
  * ``batched``: ``(1/(N P)) sum_p ||sum_n J_n^T S_n z_{np}||^2``, one vector-Jacobian
    product per probe; variance ``2 ||G||_F^2 / P`` (``G = (1/N) sum_n G_n``), larger by up
    to a factor ``N``, but cheaper, and the only form for batch-coupled models.

  ``form="auto"`` takes ``per-example`` where every example's outputs depend on that example
  alone and ``batched`` otherwise (train-mode batch norm:
  :func:`~layerhessians.curvature.batch_coupling`). ``E = tr G_BB``, which equals
  ``tr H_BB`` where every block's Hessian equals its GGN block: nets of linear, convolution,
  ReLU, max-pooling and eval-mode batch norm layers without shared weights (the residual
  ``H - G`` of a block vanishes when the outputs are piecewise linear in that block's
  parameters). With tanh, sigmoid or train-mode batch norm they differ.
- ``exact``: ``tr G_BB`` exactly (``S_n``'s every column: ``C`` products per example;
  ``N * C`` for a batch-coupled model), for small problems, tests and monitoring.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from layerhessians.curvature.attention import math_attention
from layerhessians.curvature.batches import BatchLoss, as_batches
from layerhessians.curvature.conv_double_backward import conv_double_backward
from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.loss_reduction import data_loss_reduction
from layerhessians.curvature.modes import call_model, engine_modes, mode_difference
from layerhessians.errors import UserError, check_choice
from layerhessians.regularization.blocks import block_parameters, resolve_blocks
from layerhessians.regularization.output_curvature import output_curvature
from layerhessians.regularization.per_example_norms import LayerCapture, plan, squared_norms
from layerhessians.regularization.settings import (
    ESTIMATORS,
    GGN_FORMS,
    PENALTY_BN_MODES,
    PROBE_DISTRIBUTIONS,
)

__all__ = ["penalty_forward_context", "trace_penalty"]

#: cotangents per batched backward pass of the exact estimator on a batch-coupled model
EXACT_CHUNK = 64


def trace_penalty(model: nn.Module, loss_fn, data, blocks=None, estimator: str = "ggn",
                  probes: int = 1, distribution: str = "gaussian",
                  generator: torch.Generator | None = None, *, form: str = "auto",
                  bn_mode: str = "eval", outputs: Tensor | None = None) -> Tensor:
    """An unbiased, differentiable estimate of the trace of the curvature of the mean loss.

    Args:
        model: the network (its parameters one floating dtype and device).
        loss_fn: ``loss_fn(outputs, targets)``, mean- or sum-reduced over examples; for
            ``ggn``/``exact`` cross-entropy or squared error. A
            :class:`~layerhessians.curvature.BatchLoss` with ``hutchinson`` only.
        data: an ``(inputs, targets)`` pair or a list of pairs (with a ``BatchLoss``: a list
            of batches); moved to the model's device.
        blocks: ``None`` (every trainable parameter: the full trace), a mapping ``{name:
            [parameters]}`` (as :func:`~layerhessians.curvature.layer_blocks` returns: the
            sum of those blocks' traces), or ``"layers"``, ``"middle"``, ``"paper-middle"``
            (:func:`~layerhessians.regularization.resolve_blocks`).
        estimator: ``"hutchinson"`` (E = tr H), ``"ggn"`` (E = tr G) or ``"exact"`` (tr G).
        probes: random probes averaged (ignored by ``exact``).
        distribution: the probes' law, ``"gaussian"`` or ``"rademacher"``.
        generator: a ``torch.Generator`` for the probes (reproducible); ``None``: torch's
            global generator.
        form: the ggn estimator's form: ``"auto"``, ``"per-example"`` or ``"batched"``
            (module docstring).
        bn_mode: batch norm's mode: ``"eval"`` (running statistics, as ``hessian_operator``)
            or ``"train"`` (the batch's statistics: the loss a training step minimises).
        outputs: the model's outputs on ``data``'s inputs (one batch) from the caller's own
            forward, with their graph, reused instead of the penalty's own forward (one
            forward saved: a training step computes them anyway). Accepted only where the
            caller's forward is the penalty's: the model's current modes compute what the
            engine's modes compute (:func:`~layerhessians.curvature.modes.mode_difference`;
            no dropout in train mode, batch norm in ``bn_mode``). Used by ``hutchinson`` and
            the batched form; the per-example form runs its own forward per example. Run
            the caller's forward inside :func:`penalty_forward_context` for the cheaper
            double backward through convolutions.

    Returns:
        A 0-dim tensor in the model's dtype, differentiable in the parameters. Units: loss
        per squared parameter unit (a sum of curvatures).

    Raises:
        UserError: an unknown choice, ``probes < 1``, an invalid block selection, a loss
            whose output Hessian ``ggn``/``exact`` does not know (use ``hutchinson``), a
            ``BatchLoss`` with ``ggn``/``exact``, a batch-coupled model on several batches
            or with ``form="per-example"``, no data; ``outputs`` with several batches, of
            another number of examples, without a graph, or from modes that differ from the
            penalty's.
    """
    check_choice(estimator, ESTIMATORS, "estimator")
    check_choice(distribution, PROBE_DISTRIBUTIONS, "distribution")
    check_choice(form, GGN_FORMS, "form")
    check_choice(bn_mode, PENALTY_BN_MODES, "bn_mode")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise UserError(f"probes must be an integer >= 1, got {probes!r}")
    if not callable(loss_fn):
        raise UserError("loss_fn must be callable as loss_fn(outputs, targets)")
    params = block_parameters(resolve_blocks(model, blocks))
    dtype, device = params[0].dtype, params[0].device
    if not dtype.is_floating_point or any(p.dtype != dtype or p.device != device
                                          for p in params):
        raise UserError("the block's parameters must share one floating dtype and device")
    if isinstance(loss_fn, BatchLoss):
        if estimator != "hutchinson":
            raise UserError("a BatchLoss gives the Hessian only: use estimator='hutchinson', "
                            "or loss_fn(outputs, targets) for the ggn and exact estimators")
        batches = as_batches(data, pairs=False)
        coupled = batch_coupling(model, bn_mode)
    else:
        batches = [(_to(x, dtype, device), _to(y, dtype, device)) for x, y in as_batches(data)]
        # probed (three small forwards) only where the answer matters: one batch in the
        # batched form or with hutchinson is the same computation either way
        needed = len(batches) > 1 or (estimator != "hutchinson" and form != "batched")
        coupled = batch_coupling(model, bn_mode, batches[0][0] if needed else None)
    if coupled and len(batches) > 1:
        raise UserError(f"the model's outputs depend on the batch ({coupled}): pass the data "
                        "as one batch, or bn_mode='eval'")
    if outputs is not None:
        _check_outputs(model, outputs, batches, bn_mode, isinstance(loss_fn, BatchLoss))
    draw = _Probes(distribution, generator, dtype, device)
    if estimator == "hutchinson":
        return _hutchinson(model, loss_fn, batches, params, probes, draw, bn_mode, outputs)
    curvature = output_curvature(loss_fn)
    if form == "per-example" and coupled:
        raise UserError(f"form='per-example' needs per-example outputs but {coupled}: use "
                        "form='batched' (or 'auto')")
    per_example = not coupled and form != "batched"
    total, count = None, 0
    for x, y in batches:
        if per_example:
            term = _per_example(model, curvature, x, y, params, probes, draw, bn_mode,
                                exact=estimator == "exact")
        else:
            term = _batched(model, curvature, x, y, params, probes, draw, bn_mode,
                            exact=estimator == "exact", outputs=outputs)
        total = term if total is None else total + term
        count += int(x.shape[0])
    return total / count


# ----------------------------------------------------------------------------- helpers
def _to(value, dtype, device):
    if not torch.is_tensor(value):
        return value
    return value.to(device=device, dtype=dtype if value.is_floating_point() else None)


class _Probes:
    """Draws probes of one law from one generator."""

    def __init__(self, distribution, generator, dtype, device):
        self.distribution, self.generator = distribution, generator
        self.dtype, self.device = dtype, device

    def __call__(self, shape) -> Tensor:
        where = self.generator.device if self.generator is not None else self.device
        if self.distribution == "gaussian":
            z = torch.randn(shape, generator=self.generator, dtype=self.dtype, device=where)
        else:
            z = torch.randint(0, 2, shape, generator=self.generator, device=where)
            z = (2 * z - 1).to(self.dtype)
        return z.to(self.device)


def _buffers(model: nn.Module) -> dict:
    # clones: batch norm in train mode updates them, and measuring must not change the model
    return {name: b.clone() for name, b in model.named_buffers()}


def penalty_forward_context():
    """The context of the penalty's forward passes: convolutions recorded with the lean double
    backward (no unfolding: one product per graph) and attention on its twice-differentiable
    path. A training step that passes its outputs to :func:`trace_penalty` runs its forward
    inside it (values unchanged)."""
    stack = contextlib.ExitStack()
    stack.enter_context(conv_double_backward("lean", unfold=False))
    stack.enter_context(math_attention())
    return stack


def _forward(model: nn.Module, x, bn_mode: str):
    with engine_modes(model, bn_mode), penalty_forward_context():
        buffers = _buffers(model)
        return (torch.func.functional_call(model, buffers, (x,)) if buffers
                else call_model(model, x))


def _check_outputs(model, outputs, batches, bn_mode: str, batch_loss: bool) -> None:
    if batch_loss or len(batches) != 1:
        raise UserError("outputs are reused for one (inputs, targets) batch only: pass the "
                        "data as one pair, or omit outputs")
    x = batches[0][0]
    if not torch.is_tensor(outputs) or not outputs.requires_grad or outputs.ndim == 0 or \
            (torch.is_tensor(x) and x.ndim and outputs.shape[0] != x.shape[0]):
        raise UserError("outputs must be the model's outputs on the data's inputs, one row per "
                        "example, with their graph (not detached, not under no_grad)")
    differs = mode_difference(model, bn_mode)
    if differs:
        raise UserError(f"outputs come from a forward the penalty's differs from: {differs}; "
                        f"omit outputs (the penalty then runs its own forward in eval mode, "
                        f"batch norm in {bn_mode} mode)")


def _squared_norm(tensors) -> Tensor:
    return sum((t * t).sum() for t in tensors if t is not None)


def _zero(params) -> Tensor:
    # no parameter of the block reaches the loss: the trace is 0, with a graph
    return sum((p * 0).sum() for p in params)


def _hutchinson(model, loss_fn, batches, params, probes, draw, bn_mode, shared) -> Tensor:
    total, count, reduction = None, 0, None
    for batch in batches:
        if isinstance(loss_fn, BatchLoss):
            swapped = [(m, name, b) for m in model.modules()
                       for name, b in m._buffers.items() if b is not None]
            with engine_modes(model, bn_mode), math_attention():
                try:
                    for m, name, b in swapped:
                        m._buffers[name] = b.clone()
                    loss, n = loss_fn(model, batch)
                finally:
                    for m, name, b in swapped:
                        m._buffers[name] = b
            term = loss * n
        else:
            x, y = batch
            outputs = shared if shared is not None else _forward(model, x, bn_mode)
            n = int(x.shape[0])
            if reduction is None:  # decided from all the data, however it is split
                reduction = data_loss_reduction(
                    loss_fn, lambda inputs: _forward(model, inputs, bn_mode), batches) or "mean"
            loss = loss_fn(outputs, y)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise UserError("loss_fn must return a scalar tensor (the batch's mean loss)")
            term = loss.reshape(()) * (1.0 if reduction == "sum" else float(n))
        total = term if total is None else total + term
        count += n
    mean_loss = total / count
    grads = torch.autograd.grad(mean_loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    if not pairs:
        return _zero(params)
    used, grads = [p for p, _ in pairs], [g for _, g in pairs]
    estimate = None
    for index in range(probes):
        vectors = [draw(p.shape) for p in used]
        products = torch.autograd.grad(grads, used, grad_outputs=vectors, create_graph=True,
                                       retain_graph=index < probes - 1 or None,
                                       allow_unused=True)
        value = sum((v * hv).sum() for v, hv in zip(vectors, products) if hv is not None)
        estimate = value if estimate is None else estimate + value
    estimate = estimate / probes
    return estimate if torch.is_tensor(estimate) else _zero(params)


def _batched(model, curvature, x, y, params, probes, draw, bn_mode, exact: bool,
             outputs=None) -> Tensor:
    """``sum_p ||sum_n J_n^T S_n z_{np}||^2 / P`` (``exact``: every (example, column)
    cotangent on its own, summed) over one batch (``outputs``: the caller's forward's)."""
    outputs = curvature.check(outputs if outputs is not None else _forward(model, x, bn_mode), y)
    if exact:
        n, width = outputs.shape[0], outputs[0].numel()
        basis = torch.eye(n * width, dtype=outputs.dtype, device=outputs.device)
        total = None
        for start in range(0, n * width, EXACT_CHUNK):
            z = basis[start:start + EXACT_CHUNK].reshape(-1, *outputs.shape)
            cotangents = curvature.apply(outputs, z)
            grads = torch.autograd.grad(outputs, params, grad_outputs=cotangents,
                                        create_graph=True, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            term = _squared_norm(grads)
            total = term if total is None else total + term
        return total if torch.is_tensor(total) else _zero(params)
    total = None
    for _ in range(probes):
        cotangent = curvature.apply(outputs, draw(outputs.shape))
        grads = torch.autograd.grad(outputs, params, grad_outputs=cotangent,
                                    create_graph=True, retain_graph=True, allow_unused=True)
        term = _squared_norm(grads)
        total = term if total is None else total + term
    return total / probes if torch.is_tensor(total) else _zero(params)


def _example_probes(outputs, count: int, probes: int, draw, exact: bool) -> Tensor:
    """``[P, N, 1, *output shape]``: each example's probes (``exact``: every output
    direction, the same for all examples)."""
    shape = outputs.shape[1:]
    if not exact:
        return draw((probes, count, 1, *shape))
    width = shape.numel()
    return torch.eye(width, dtype=outputs.dtype, device=outputs.device).reshape(
        width, 1, 1, *shape).expand(width, count, 1, *shape)


def _per_example(model, curvature, x, y, params, probes, draw, bn_mode,
                 exact: bool) -> Tensor:
    """``sum_n (1/P) sum_p ||J_n^T S_n z_{np}||^2`` (``exact``: ``||J_n^T S_n||_F^2``) over
    one batch: from one backward pass per probe where every penalised parameter sits in a
    Linear/Conv2d layer (:mod:`~layerhessians.regularization.per_example_norms`), else by
    ``torch.func.vmap`` over its examples (same probes, same numbers)."""
    layers, _ = plan(model, params)
    if layers:
        with LayerCapture(layers) as capture:
            outputs = curvature.check(_forward(model, x, bn_mode), y)
        if capture.usable():
            z = _example_probes(outputs, x.shape[0], probes, draw, exact)
            total = sum(squared_norms(capture, outputs, curvature.apply(outputs, zp[:, 0]),
                                      params).sum() for zp in z)
            return total if exact else total / probes
    names = {id(p): name for name, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    with engine_modes(model, bn_mode), math_attention():
        buffers = _buffers(model)
        first = curvature.check(torch.func.functional_call(model, buffers, (x[:1],)), y[:1]
                                if torch.is_tensor(y) else y)
        z = _example_probes(first, x.shape[0], probes, draw, exact)

        def one(xn, yn, zn):
            def outputs_of(*values):
                return torch.func.functional_call(model, {**buffers, **dict(zip(keys, values))},
                                                  (xn.unsqueeze(0),))

            outputs, pullback = torch.func.vjp(outputs_of, *params)
            cotangents = curvature.apply(outputs, zn)
            grads = torch.func.vmap(pullback)(cotangents)
            return _squared_norm(grads)

        try:
            values = torch.func.vmap(one, in_dims=(0, 0 if _rows(y, x) else None, 1))(x, y, z)
        except UserError:
            raise
        except RuntimeError as error:
            raise UserError(f"the per-example ggn estimator cannot vmap this model ({error}); "
                            "use form='batched'") from None
    total = values.sum()
    return total if exact else total / probes


def _rows(y, x) -> bool:
    return torch.is_tensor(y) and y.ndim > 0 and y.shape[0] == x.shape[0]


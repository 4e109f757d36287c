"""Per-example gradients ``grad l_n`` of a batch, ``l_n = loss_fn(f(x_n)[None], y_n[None])``
(the empirical Fisher's factors): ``torch.func.vmap(grad)`` over the examples, or one backward
pass per example where vmap cannot run the model (RNN/GRU/LSTM, checkpointed blocks,
data-dependent control flow). Called inside the engine's context (eval modes, cloned
buffers, seeded RNGs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from layerhessians.curvature.modes import call_model
from layerhessians.errors import UserError

__all__ = ["per_example_gradients"]


def per_example_gradients(model: nn.Module, loss_fn, params: Sequence[nn.Parameter],
                          names: Sequence[str], x: Tensor, y) -> tuple[tuple, Tensor, Tensor]:
    """The per-example gradients of a batch, their losses and the batch's loss.

    Args:
        model: the network (in the engine's modes).
        loss_fn: ``loss_fn(outputs, targets)`` (mean or sum over the batch).
        params: the parameters to differentiate, named ``names`` in ``model``.
        names: their qualified names.
        x: inputs [n, ...].
        y: targets [n, ...] (one row per example).

    Returns:
        ``(grads, losses, batch_loss)``: one detached tensor [n, *shape] per parameter,
        the per-example losses [n] and ``loss_fn(model(x), y)`` (no gradients).

    Raises:
        UserError: targets without one row per example, or a non-scalar loss.
    """
    if not torch.is_tensor(y) or y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise UserError("per-example gradients need targets with one row per example")
    values = {n: p.detach() for n, p in zip(names, params)}
    buffers = dict(model.named_buffers())

    def example_loss(vals, xn, yn):
        outputs = torch.func.functional_call(model, (vals, buffers), (xn.unsqueeze(0),))
        return loss_fn(outputs, yn.unsqueeze(0)).reshape(())

    try:
        grads, losses = torch.func.vmap(torch.func.grad_and_value(example_loss),
                                        in_dims=(None, 0, 0))(values, x, y)
        grads = tuple(grads[n] for n in names)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - vmap cannot run this model: loop over the examples
        grads, losses = _looped(model, loss_fn, params, x, y)
    with torch.no_grad():
        batch_loss = loss_fn(call_model(model, x), y)
    if not torch.is_tensor(batch_loss) or batch_loss.numel() != 1:
        raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
    return grads, losses, batch_loss


def _looped(model, loss_fn, params, x: Tensor, y) -> tuple[tuple, Tensor]:
    """``(grads [n, *shape] per parameter, losses [n])`` by one backward pass per example."""
    per_param = [[] for _ in params]
    losses = []
    for n in range(int(x.shape[0])):
        loss = loss_fn(model(x[n:n + 1]), y[n:n + 1]).reshape(())
        grads = torch.autograd.grad(loss, list(params), allow_unused=True,
                                    materialize_grads=True)
        for store, g in zip(per_param, grads):
            store.append(g.to_dense() if g.is_sparse else g)
        losses.append(loss.detach())
    return tuple(torch.stack(gs) for gs in per_param), torch.stack(losses)

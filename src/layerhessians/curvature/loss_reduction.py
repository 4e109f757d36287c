"""Loss-reduction detection: whether ``loss_fn`` is the mean or the sum of its per-example
losses over a batch (:func:`loss_reduction_of`, :func:`classify_reduction`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from layerhessians.curvature.batches import PROBE_ROWS, rows
from layerhessians.errors import UserError

__all__ = ["LOSS_REDUCTIONS", "classify_reduction", "loss_reduction_of"]

#: the operator's loss: the mean over all examples (default) or their sum
LOSS_REDUCTIONS = ("mean", "sum")


def loss_reduction_of(loss_fn, outputs, targets, count: int) -> str | None:
    """How ``loss_fn`` reduces over examples: ``"mean"`` or ``"sum"`` of the per-example
    losses ``loss_fn(rows(outputs, [n]), rows(targets, [n]))``, or ``None`` when it cannot
    matter or tell (fewer than 2 examples, or losses that vanish).

    Compares ``loss_fn`` on the first ``min(count, 8)`` examples with the mean and the sum
    of their per-example losses (no gradients; :func:`classify_reduction`); if both match
    (losses near 0), again at outputs moved by a fixed random step.

    Raises:
        UserError: ``loss_fn`` cannot be evaluated on one example, or is neither the mean
            nor the sum (class weights with ``reduction="mean"``, a per-batch term).
    """
    m = min(int(count), PROBE_ROWS)
    if m < 2:
        return None
    with torch.no_grad():
        outputs = rows(tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, outputs),
                       slice(0, m), count)
        targets = rows(targets, slice(0, m), count)
        generator = torch.Generator().manual_seed(0)
        for attempt in range(2):
            if attempt:  # away from zero losses
                outputs = tree_map(lambda t: t + torch.randn(
                    t.shape, generator=generator, dtype=torch.float64).to(t)
                    if torch.is_tensor(t) and t.is_floating_point() else t, outputs)
            try:
                batch = loss_fn(outputs, targets)
                each = torch.stack([torch.as_tensor(loss_fn(rows(outputs, slice(n, n + 1), m),
                                                            rows(targets, slice(n, n + 1), m)))
                                    .reshape(()) for n in range(m)]).to(torch.float64)
            except Exception as error:  # noqa: BLE001 - reported as the user's problem
                raise UserError(f"loss_fn cannot be evaluated on one example ({error}): the "
                                "engine needs targets with one row per example, or wrap the "
                                "loss in BatchLoss") from None
            if not torch.is_tensor(batch) or batch.numel() != 1:
                raise UserError("loss_fn must return a scalar tensor (the mean loss of the "
                                "batch)")
            found = classify_reduction(batch, each, _loss_dtype(outputs))
            if found is not None:
                return found
    return None


def classify_reduction(batch_loss, losses: Tensor, dtype: torch.dtype) -> str | None:
    """``"mean"`` or ``"sum"``: which of the per-example ``losses`` [m] the scalar
    ``batch_loss`` equals, to ``min(64 eps(dtype), 0.1)`` of ``sum |losses|``; ``None`` when it equals
    both (losses near 0, or ``m = 1``).

    Raises:
        UserError: it equals neither (e.g. class weights with ``reduction="mean"``).
    """
    batch = float(batch_loss)
    losses = losses.detach().to(torch.float64).reshape(-1)
    mean, total = float(losses.mean()), float(losses.sum())
    # at most 0.1: the mean and the sum of m >= 2 non-negative losses differ by >= half the sum
    rtol = min(64 * float(torch.finfo(dtype).eps), 0.1)
    tolerance = rtol * max(float(losses.abs().sum()), 1e-300)
    as_mean, as_sum = abs(batch - mean) <= tolerance, abs(batch - total) <= tolerance
    if as_mean and as_sum:
        return None
    if as_mean or as_sum:
        return "mean" if as_mean else "sum"
    raise UserError(f"loss_fn is neither the mean nor the sum of its per-example losses (on "
                    f"{losses.numel()} examples: {batch:.6g}, mean {mean:.6g}, sum "
                    f"{total:.6g}), e.g. class weights with reduction='mean' or padding "
                    "ignored in a mean: pass a mean- or sum-reduced loss without class "
                    "weights, or give it as BatchLoss(fn(model, batch) -> (mean, count))")


def _loss_dtype(outputs) -> torch.dtype:
    leaves = [t for t in tree_flatten(outputs)[0] if torch.is_tensor(t) and
              t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.float64

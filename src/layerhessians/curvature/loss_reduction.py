"""Loss-reduction detection: whether ``loss_fn`` is the mean or the sum of its per-example
losses over a batch (:func:`loss_reduction_of`, :func:`classify_reduction`)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from layerhessians.curvature.batches import PROBE_ROWS, rows
from layerhessians.curvature.modes import call_model
from layerhessians.errors import NonFiniteError, UserError

__all__ = ["LOSS_PROBE_ROWS", "LOSS_REDUCTIONS", "classify_reduction", "data_loss_reduction",
           "loss_reduction_of", "probe_examples"]

#: the operator's loss: the mean over all examples (default) or their sum
LOSS_REDUCTIONS = ("mean", "sum")
#: most examples the loss-reduction probe evaluates one by one
LOSS_PROBE_ROWS = 64


def _cat(trees):
    """The batches' trees concatenated along the first dimension (``None`` if they cannot
    be: non-tensor leaves that differ, or leaves without one row per example)."""
    flats = [tree_flatten(t) for t in trees]
    spec = flats[0][1]
    if any(s != spec for _, s in flats):
        return None
    leaves = []
    for column in zip(*(f for f, _ in flats)):
        if all(torch.is_tensor(t) and t.ndim for t in column):
            leaves.append(torch.cat(column))
        elif all(not torch.is_tensor(t) and t == column[0] for t in column):
            leaves.append(column[0])
        else:
            return None
    return tree_unflatten(leaves, spec)


def probe_examples(pairs, limit: int = LOSS_PROBE_ROWS):
    """Up to ``limit`` examples ``(inputs, targets)`` drawn from ALL the ``(inputs,
    targets)`` batches: first one example of each distinct target (so a loss whose
    normaliser depends on the targets, like class weights, is seen on several), then
    examples evenly spaced over the data. The choice depends on the data as a whole, not on
    how they are split into batches.

    Returns:
        ``(inputs, targets)`` with at most ``limit`` rows, or ``None`` when the batches
        cannot be concatenated (then each batch is probed on its own).
    """
    inputs = _cat([x for x, _ in pairs])
    targets = _cat([y for _, y in pairs])
    if inputs is None or targets is None or not torch.is_tensor(inputs):
        return None
    count = int(inputs.shape[0])
    chosen: list[int] = []
    if torch.is_tensor(targets) and targets.ndim and targets.shape[0] == count:
        keys = targets.detach().reshape(count, -1).cpu()
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), count, dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(count), reduce="amin")
        chosen = sorted(first.tolist())[:limit // 2] if first.numel() > 1 else []
    spaced = torch.linspace(0, count - 1, min(count, limit)).round().long().tolist()
    for i in spaced:
        if len(chosen) >= limit:
            break
        if i not in chosen:
            chosen.append(i)
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    return rows(inputs, index.to(inputs.device), count), \
        rows(targets, index.to(targets.device) if torch.is_tensor(targets) else index, count)


def data_loss_reduction(loss_fn, forward, pairs) -> str | None:
    """How ``loss_fn`` reduces over examples, decided from the data as a whole:
    :func:`loss_reduction_of` on :func:`probe_examples` of all ``pairs`` (their outputs from
    ``forward(inputs)``, no gradients), so the answer does not depend on how the data are
    split or ordered. Batches that cannot be concatenated are probed one by one, and must
    agree.

    Raises:
        UserError: as :func:`loss_reduction_of`, or batches that disagree.
    """
    probe = probe_examples(pairs)
    groups = [probe] if probe is not None else list(pairs)
    found = None
    for x, y in groups:
        count = int(x.shape[0]) if torch.is_tensor(x) and x.ndim else 0
        if count < 2:
            continue
        with torch.no_grad():
            outputs = call_model(forward, x)
        this = loss_reduction_of(loss_fn, outputs, y, count, rows_limit=LOSS_PROBE_ROWS)
        if found is None:
            found = this
        elif this not in (None, found):
            raise UserError(f"loss_fn is a {this} over the examples of one batch and a "
                            f"{found} over another's: pass one reduction")
    return found


def loss_reduction_of(loss_fn, outputs, targets, count: int,
                      rows_limit: int = PROBE_ROWS) -> str | None:
    """How ``loss_fn`` reduces over examples: ``"mean"`` or ``"sum"`` of the per-example
    losses ``loss_fn(rows(outputs, [n]), rows(targets, [n]))``, or ``None`` when it cannot
    matter or tell (fewer than 2 examples, or losses that vanish).

    Compares ``loss_fn`` on the first ``min(count, rows_limit)`` examples with the mean and the sum
    of their per-example losses (no gradients; :func:`classify_reduction`); if both match
    (losses near 0), again at outputs moved by a fixed random step.

    Raises:
        UserError: ``loss_fn`` cannot be evaluated on one example, or is neither the mean
            nor the sum (class weights with ``reduction="mean"``, a per-batch term).
    """
    m = min(int(count), int(rows_limit))
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
            if not torch.is_tensor(batch) or batch.numel() != 1 or \
                    not batch.is_floating_point():
                raise UserError("loss_fn must return a floating-point scalar tensor (the mean "
                                f"loss of the batch); got {type(batch).__name__} "
                                f"{getattr(batch, 'dtype', '')}".rstrip())
            if not (torch.isfinite(batch).all() and torch.isfinite(each).all()):
                raise NonFiniteError(f"the loss of the first {m} examples is NaN or infinite: "
                                     "the inputs or the model's weights hold NaN or inf (or "
                                     "the model diverged); check them before measuring")
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

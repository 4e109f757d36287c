"""The trainer's Hessian-trace regulariser (``--htr-*``) and top-5 accuracy.

:func:`epoch_regularizer` builds the epoch's
:class:`~layerhessians.regularization.TraceRegularizer` from ``config.regularizer``, its
probes drawn from a generator seeded by ``(seed, epoch)`` (so ``--resume`` reproduces an
uninterrupted run and the loop's own random streams are untouched); the steps it
regularises are counted from 0 in each epoch, as the original's ``batch_idx % freq``.
:func:`penalty_certificates` records, for the ggn and exact estimators, on which blocks the
penalty's GGN trace is the Hessian trace (config.json facts ``htr_trace_certificates``).
"""

from __future__ import annotations

import torch
from torch import nn

from layerhessians.errors import UserError
from layerhessians.training.distributed import SINGLE, Context
from layerhessians.training.seeding import derive_seed

TOP_K = 5
#: the config.json fact holding :func:`penalty_certificates`
CERTIFICATES_KEY = "htr_trace_certificates"


def epoch_regularizer(setup, epoch: int):
    """The regulariser of epoch ``epoch`` (1-based), or ``None`` when ``gamma`` is 0.

    Raises:
        UserError: a regulariser in a run over several processes (not supported).
    """
    settings = getattr(setup.config, "regularizer", None)
    if settings is None or not settings.active:
        return None
    if setup.dist.active:
        raise UserError("--htr-gamma runs in one process: drop torchrun or the regulariser")
    from layerhessians.regularization import TraceRegularizer

    generator = torch.Generator().manual_seed(derive_seed(setup.config.seed, epoch, "htr"))
    return TraceRegularizer(setup.model, setup.loss_fn, settings, generator=generator)


def penalty_certificates(setup) -> dict | None:
    """``{block: {"certified", "tensors", "hessian_residual", "reason"}}``
    (:func:`~layerhessians.regularization.trace_certificates` on the Hessian subset, in the
    penalty's batch-norm mode, once before training), or ``None``: no regulariser, or the
    ``hutchinson`` estimator (whose expectation is the Hessian trace everywhere)."""
    settings = getattr(setup.config, "regularizer", None)
    if settings is None or not settings.active or settings.estimator == "hutchinson":
        return None
    from layerhessians.regularization import trace_certificates

    found = trace_certificates(setup.model, setup.loss_fn, setup.hessian_batch, settings.blocks,
                               bn_mode=settings.bn_mode,
                               seed=derive_seed(setup.config.seed, 0, "certify"))
    return {block: dict(value) for block, value in found.items()}


def certificate_line(certificates: dict) -> str:
    """One log line: where the penalty's GGN trace is the Hessian trace, where not."""
    yes = [b for b, c in certificates.items() if c["certified"]]
    no = [f"{b} ({c['reason']})" for b, c in certificates.items() if not c["certified"]]
    text = "htr: the ggn penalty's trace is the Hessian trace (H = G certified) on " + (
        ", ".join(yes) if yes else "no block")
    return text + ("; only the GGN trace on " + "; ".join(no) if no else "")


@torch.no_grad()
def top5_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  dist: Context = SINGLE) -> float:
    """The fraction of ``x [N, ...]`` whose label ``y [N]`` is among the model's 5 highest
    logits (eval mode, restored; all classes when there are 5 or fewer)."""
    was_training = model.training
    model.eval()
    total = len(y)
    x, y = dist.shard(x), dist.shard(y)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        top = output.topk(min(TOP_K, output.shape[1]), dim=1).indices
        correct += (top == y[start:start + batch_size, None]).any(1).sum()
    model.train(was_training)
    _, correct = dist.sum_totals(torch.zeros((), dtype=torch.float64), correct)
    return correct / total

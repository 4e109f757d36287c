"""Dense references (float64): the matrix of a small operator, and the curvature matrix
of a model computed independently by ``torch.func`` (each kind gives its own, through the
registry of :mod:`~layerhessians.curvature.kinds`)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from layerhessians.curvature.batches import BatchLoss, as_batches
from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.graph import PER_EXAMPLE_GRADIENTS, NonFiniteError
from layerhessians.curvature.kinds import kind_class
from layerhessians.curvature.loss_reduction import LOSS_REDUCTIONS, data_loss_reduction
from layerhessians.curvature.modes import engine_context, reseed
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError, check_choice
from layerhessians.vocabulary import BN_MODES

__all__ = ["MAX_DENSE_DIM", "ReferenceProblem", "dense_matrix", "reference_matrix"]

MAX_DENSE_DIM = 20_000  # 20,000^2 float64 = 3.2 GB, and 20,000 products


def dense_matrix(op, max_dim: int = MAX_DENSE_DIM,
                 symmetry_rtol: float | None = None) -> torch.Tensor:
    """The operator as a dense symmetric float64 matrix [dim, dim] (``op.matmat(I)``).

    The result is symmetrised, ``(A + A^T) / 2``, after checking that
    ``max|A - A^T| <= symmetry_rtol * max|A|`` (default 1e-8 for a float64 operator, 1e-3
    otherwise); a RuntimeWarning says when it is not (a broken operator, or a block that is
    zero up to roundoff). Refuses operators with ``dim > max_dim`` (:class:`UserError`) and
    matrices with NaN or infinite entries (:class:`~layerhessians.curvature.graph.NonFiniteError`).
    """
    if symmetry_rtol is None:
        symmetry_rtol = 1e-8 if getattr(op, "dtype", torch.float64) == torch.float64 else 1e-3
    dim = int(op.dim)
    if dim > max_dim:
        raise UserError(
            f"the operator has dim {dim:,} > {max_dim:,}: too large to densify; "
            "use slq() for its spectrum or choose a smaller parameter block"
        )
    identity = torch.eye(dim, dtype=torch.float64, device=getattr(op, "device", None))
    matrix = op.matmat(identity).to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteError(f"the operator {getattr(op, 'name', '')!r} has NaN or infinite "
                             "entries: its spectrum is undefined")
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    asymmetry = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
    if asymmetry > symmetry_rtol * max(scale, np.finfo(np.float64).tiny):
        warnings.warn(f"the operator is not symmetric (max|A - A^T| = {asymmetry:.3g}, "
                      f"max|A| = {scale:.3g}); symmetrised", RuntimeWarning, stacklevel=2)
    return (matrix + matrix.T) / 2


class ReferenceProblem:
    """The helpers a kind's dense reference uses: the loss and outputs as functions of the
    flattened parameter block, and the differentiation routines.

    Attributes:
        flat0: the block's current value, flattened [dim] (model dtype).
        dim: its length.
        loss_fn: the loss ``loss_fn(outputs, targets)`` (mean or sum over its batch).
        weight: the current batch's weight ``c_b`` (``n_b`` for a mean-reduced loss, 1 for
            a sum), set by :func:`reference_matrix`; ``batch_loss_fn = c_b * loss_fn`` is the
            batch's sum of per-example losses.
        hessian_of, jacobian_of: the non-vectorised ``torch.autograd.functional`` versions.
            In torch 2.13 the vmapped ``torch.func.hessian`` is wrong through a batch-norm
            layer using batch statistics (relative error ~0.09 on a tiny conv net) and through
            an affine ``LayerNorm`` (mixed input-weight second derivatives), both against
            central differences; the plain double backward is right in both.
    """

    def __init__(self, model: nn.Module, loss_fn, params, names, bn_mode: str):
        self.loss_fn = loss_fn
        self.weight = 1.0
        self.names = list(names)
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dim = sum(self.sizes)
        self.flat0 = torch.cat([p.detach().reshape(-1) for p in params])
        self.model = copy.deepcopy(model).eval()  # nothing of the caller's model changes
        if bn_mode == "train":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
                    m.track_running_stats = False  # batch statistics, no buffer updates
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        self.hessian_of = _functional_hessian
        self.jacobian_of = _functional_jacobian

    def batch_loss_fn(self, outputs, y) -> Tensor:
        """``weight * loss_fn(outputs, y)``: the batch's sum of per-example losses."""
        return self.weight * self.loss_fn(outputs, y)

    @staticmethod
    def flat_outputs(outputs) -> Tensor:
        """The floating tensors of (possibly structured) ``outputs``, flattened and
        concatenated."""
        return torch.cat([t.reshape(-1) for t in tree_flatten(outputs)[0]
                          if torch.is_tensor(t) and t.is_floating_point()])

    @staticmethod
    def unflat_outputs(flat: Tensor, like):
        """The inverse of :meth:`flat_outputs`, shaped like the outputs ``like`` (their
        non-floating leaves kept)."""
        leaves, spec = tree_flatten(like)
        out, start = [], 0
        for t in leaves:
            if torch.is_tensor(t) and t.is_floating_point():
                out.append(flat[start:start + t.numel()].view(t.shape))
                start += t.numel()
            else:
                out.append(t)
        return tree_unflatten(out, spec)

    def outputs(self, flat: Tensor, x: Tensor):
        """The model's outputs on ``x`` with the block set to ``flat`` [dim]."""
        values = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes),
                                                   self.shapes)}
        reseed()  # the engine's draw, for a forward that draws random numbers
        return torch.func.functional_call(self.model, values, (x,))

    def loss(self, flat: Tensor, x: Tensor, y) -> Tensor:
        """The batch's sum of per-example losses on ``(x, y)`` with the block set to
        ``flat``."""
        return self.batch_loss_fn(self.outputs(flat, x), y)


def _functional_hessian(f):
    return lambda z: torch.autograd.functional.hessian(f, z)


def _functional_jacobian(f):
    return lambda z: torch.autograd.functional.jacobian(f, z)


def reference_matrix(model, loss_fn, data, params=None, kind: str = "hessian",
                     bn_mode: str = "eval", max_dim: int = 5_000,
                     loss_reduction: str = "mean") -> torch.Tensor:
    """The dense curvature matrix [dim, dim] (float64) by ``torch.func``, independently of
    the operators.

    Each batch's matrix is the kind's :meth:`~layerhessians.curvature.base.CurvatureOperator.reference`
    (Hessian: ``torch.func.hessian`` of the loss as a function of the flattened block; GGN:
    ``J^T H_f J``; residual: their difference; empirical Fisher: ``J_l^T J_l / n_b`` with
    ``J_l`` the Jacobian of the per-example losses), each of the batch's SUM of per-example
    losses (a mean-reduced ``loss_fn`` times ``n_b``, detected by
    :func:`~layerhessians.curvature.loss_reduction.loss_reduction_of`); the total divided by ``N``
    (``loss_reduction="mean"``) or not (``"sum"``); batch norm as in
    :func:`~layerhessians.curvature.kinds.hessian_operator` (on a deep copy of the model).
    Model outputs may be structured (tuples/lists/dicts of tensors). For tests and small
    problems.

    Raises:
        UserError: an unknown kind, ``bn_mode`` or ``loss_reduction``, ``dim > max_dim``,
            per-example gradients asked for a batch-dependent model, or a loss that is
            neither a mean nor a sum.
    """
    cls = kind_class(kind)
    if isinstance(loss_fn, BatchLoss):
        raise UserError("reference_matrix takes loss_fn(outputs, targets); for a BatchLoss "
                        "take torch.func.hessian of the mean loss over all batches")
    check_choice(bn_mode, BN_MODES, "bn_mode")
    check_choice(loss_reduction, LOSS_REDUCTIONS, "loss_reduction")
    chosen, names = resolve_params(model, params)
    dim = sum(p.numel() for p in chosen)
    if dim > max_dim:
        raise UserError(f"dim {dim:,} > {max_dim:,}: too large for a dense reference")
    if PER_EXAMPLE_GRADIENTS in cls.needs:
        reason = batch_coupling(model, bn_mode)
        if reason is not None:
            raise UserError(f"kind {kind!r} needs per-example losses, undefined with {reason}: "
                            "use bn_mode 'eval'")
    dtype, device = chosen[0].dtype, chosen[0].device
    problem = ReferenceProblem(model, loss_fn, chosen, names, bn_mode)
    pairs = [(x.to(device=device, dtype=dtype if x.is_floating_point() else None),
              y.to(device=device, dtype=dtype if y.is_floating_point() else None))
             for x, y in as_batches(data)]
    total_examples = sum(x.shape[0] for x, _ in pairs)
    result = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    with engine_context(problem.model, bn_mode):  # the engine's modes, seeds and attention
        reduction = data_loss_reduction(loss_fn, problem.model, pairs)
        for x, y in pairs:
            problem.weight = 1.0 if reduction == "sum" else float(x.shape[0])
            result += cls.reference(problem, x, y)
    return result / total_examples if loss_reduction == "mean" else result

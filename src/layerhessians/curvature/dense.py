"""Dense references (float64): the matrix of a small operator, and the curvature matrix
of a model computed independently by ``torch.func``."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from layerhessians.errors import UserError

__all__ = ["MAX_DENSE_DIM", "dense_matrix", "reference_matrix"]

MAX_DENSE_DIM = 20_000  # 20,000^2 float64 = 3.2 GB, and 20,000 products


def dense_matrix(op, max_dim: int = MAX_DENSE_DIM,
                 symmetry_rtol: float | None = None) -> torch.Tensor:
    """The operator as a dense symmetric float64 matrix [dim, dim] (``op.matmat(I)``).

    The result is symmetrised, ``(A + A^T) / 2``, after checking that
    ``max|A - A^T| <= symmetry_rtol * max|A|`` (default 1e-8 for a float64 operator, 1e-3
    otherwise); a RuntimeWarning says when it is not (a broken operator, or a block that is
    zero up to roundoff). Refuses operators with ``dim > max_dim`` (:class:`UserError`).
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
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    asymmetry = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
    if asymmetry > symmetry_rtol * max(scale, np.finfo(np.float64).tiny):
        warnings.warn(f"the operator is not symmetric (max|A - A^T| = {asymmetry:.3g}, "
                      f"max|A| = {scale:.3g}); symmetrised", RuntimeWarning, stacklevel=2)
    return (matrix + matrix.T) / 2


def reference_matrix(model, loss_fn, data, params=None, kind: str = "hessian",
                     bn_mode: str = "eval", max_dim: int = 5_000) -> torch.Tensor:
    """The dense curvature matrix [dim, dim] by ``torch.func``, independently of the operators.

    Hessian: ``torch.func.hessian`` of the loss as a function of the flattened block.
    GGN: ``J^T H_f J`` with ``J = jacrev(model outputs)`` and ``H_f = hessian(loss_fn)`` at
    the outputs. Residual: their difference. Batches weighted by ``n_b / N``; batch norm as
    in :func:`~layerhessians.spectra.hessian_operator` (a deep copy of the model is used, so
    nothing of ``model`` changes). For tests and small problems (``dim <= max_dim``).

    With ``bn_mode="train"`` the non-vectorised ``torch.autograd.functional`` versions are
    used instead: in torch 2.13, ``torch.func.hessian`` (and ``jacrev(jacrev)``) of a loss
    through a batch-norm layer using batch statistics is wrong (relative error ~0.09 on a
    tiny conv net, against central differences), the vmapped double backward of batch norm.
    """
    import copy

    from torch import nn

    from layerhessians.curvature.operators import (
        BN_MODES,
        KINDS,
        as_batches,
        resolve_params,
    )

    if kind not in KINDS or bn_mode not in BN_MODES:
        raise UserError(f"kind must be one of {KINDS} and bn_mode one of {BN_MODES}")
    chosen, names = resolve_params(model, params)
    dim = sum(p.numel() for p in chosen)
    if dim > max_dim:
        raise UserError(f"dim {dim:,} > {max_dim:,}: too large for a dense reference")
    dtype, device = chosen[0].dtype, chosen[0].device
    shapes = [p.shape for p in chosen]
    sizes = [p.numel() for p in chosen]
    flat0 = torch.cat([p.detach().reshape(-1) for p in chosen])
    clone = copy.deepcopy(model).eval()
    if bn_mode == "train":
        for m in clone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics, no buffer updates
                m.running_mean = m.running_var = m.num_batches_tracked = None

    def outputs(flat, x):
        values = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return torch.func.functional_call(clone, values, (x,))

    pairs = [(x.to(device=device, dtype=dtype if x.is_floating_point() else None),
              y.to(device=device, dtype=dtype if y.is_floating_point() else None))
             for x, y in as_batches(data)]
    total_examples = sum(x.shape[0] for x, _ in pairs)
    if bn_mode == "train":
        hessian_of = lambda f: lambda z: torch.autograd.functional.hessian(f, z)  # noqa: E731
        jacobian_of = lambda f: lambda z: torch.autograd.functional.jacobian(f, z)  # noqa: E731
    else:
        hessian_of, jacobian_of = torch.func.hessian, torch.func.jacrev
    result = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for x, y in pairs:
        weight = x.shape[0] / total_examples
        if kind in ("hessian", "residual"):
            hessian = hessian_of(lambda f: loss_fn(outputs(f, x), y))(flat0)
            result += weight * hessian.to(torch.float64)
        if kind in ("ggn", "residual"):
            out0 = outputs(flat0, x).detach()
            jac = jacobian_of(lambda f: outputs(f, x))(flat0).reshape(-1, dim)
            h_out = hessian_of(lambda o: loss_fn(o, y))(out0)
            h_out = h_out.reshape(out0.numel(), out0.numel())
            ggn = (jac.T @ h_out @ jac).to(torch.float64)
            result += (-weight if kind == "residual" else weight) * ggn
    return result

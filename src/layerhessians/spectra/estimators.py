"""Hutchinson trace estimates and the top eigenvalues (Lanczos) of a symmetric operator.

Both work on any operator with ``.dim`` and ``.matvec``: the full Hessian or a block from
:func:`~layerhessians.spectra.hessian_operator`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from layerhessians.curvature.graph import NonFiniteError
from layerhessians.curvature.memory import check_basis_fits
from layerhessians.errors import UserError
from layerhessians.spectra.lanczos import (
    LanczosRecurrence,
    check_count,
    tridiagonal_eigh,
)
from layerhessians.spectra.slq import start_vector
from layerhessians.vocabulary import FULL

__all__ = ["TraceEstimate", "hessian_trace", "top_eigenvalues"]


@dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson estimate of ``trace(A)``.

    Attributes:
        estimate: mean of ``v^T A v`` over the samples.
        stderr: its standard error, ``std(ddof=1) / sqrt(samples)`` (NaN for one sample).
        values: float64 [samples], each ``v^T A v``.
    """

    estimate: float
    stderr: float
    values: np.ndarray = field(repr=False)

    @property
    def samples(self) -> int:
        return int(self.values.size)

    def __iter__(self):  # allows ``estimate, stderr = hessian_trace(op)``
        return iter((self.estimate, self.stderr))


def hessian_trace(op, samples: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of ``trace(op)`` from ``samples`` Rademacher vectors.

    ``v`` has entries +-1 (seeded by ``(seed, sample index, "trace/" + op.name)``), so
    ``E[v^T A v] = trace(A)`` exactly; ``samples`` products. Returns a :class:`TraceEstimate`
    (unpacks as ``estimate, stderr``). Raises
    :class:`~layerhessians.curvature.graph.NonFiniteError` for a product with NaN/inf entries.
    """
    samples = check_count(samples, "samples")
    check_count(seed, "seed", minimum=0)
    name = "trace/" + str(getattr(op, "name", FULL))
    values = np.empty(samples)
    for i in range(samples):
        v = start_vector(op.dim, seed, i, name, "rademacher", normalize=False)
        v = v.to(getattr(op, "device", v.device))
        values[i] = float(torch.dot(op.matvec(v).to(torch.float64), v))
        if not math.isfinite(values[i]):
            raise NonFiniteError(f"hessian_trace sample {i + 1} on the operator "
                                 f"{getattr(op, 'name', '')!r}: the product has NaN or "
                                 "infinite entries, so the trace is undefined")
    stderr = float(values.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan
    return TraceEstimate(float(values.mean()), stderr, values)


def top_eigenvalues(op, k: int = 1, iterations: int | None = None, seed: int = 0,
                    return_vectors: bool = False, tol: float = 1e-6,
                    check_symmetry: bool = True):
    """The ``k`` algebraically largest eigenvalues of ``op`` (and eigenvectors), by Lanczos.

    Lanczos with full float64 re-orthogonalisation from a Gaussian start vector (seeded by
    ``(seed, "top/" + op.name)``) runs until the top ``k`` Ritz pairs have residual
    ``||A y - theta y|| <= tol * max|theta|`` (computed from the tridiagonal, no extra
    products), or ``iterations`` steps (default ``min(dim, max(100, 10 k))``; a warning says
    when they did not converge). On breakdown it continues from a fresh random vector
    orthogonal to the basis. A single-vector Krylov space holds one vector per
    eigenspace, so an eigenvalue repeated among the top ``k`` may be found only once.

    Returns:
        eigenvalues: float64 numpy [k], descending (largest algebraic first; a Hessian's
            most negative eigenvalues are not "top").
        vectors (only if ``return_vectors``): float64 tensor [dim, k], unit columns.
    """
    dim = int(op.dim)
    k = check_count(k, "k")
    if k > dim:
        raise UserError(f"k = {k} exceeds the operator's dim {dim}")
    check_count(seed, "seed", minimum=0)
    steps = check_count(iterations, "iterations") if iterations is not None else \
        min(dim, max(100, 10 * k))
    steps = min(steps, dim)
    check_basis_fits([op], steps)
    name = "top/" + str(getattr(op, "name", FULL))
    start = start_vector(dim, seed, 0, name, "gaussian")
    run = LanczosRecurrence(op, start, steps, reorthogonalize=True, keep_basis=True,
                      breakdown_rtol=1e-10, check_symmetry=check_symmetry)
    restarts = 0
    converged = False
    while True:
        run.step()
        m = len(run.alphas)
        if run.breakdown and m < run.max_steps:
            restarts += 1
            if _restart(run, dim, seed, name, restarts):
                continue
        if m >= k or run.done:
            values, vectors = tridiagonal_eigh(np.array(run.alphas), np.array(run.betas[: m - 1]))
            top = np.argsort(values)[::-1][:k]
            residuals = (0.0 if run.breakdown else run.residual) * np.abs(vectors[-1, top])
            scale = max(np.abs(values).max(), np.finfo(np.float64).tiny)
            converged = m >= k and bool(np.all(residuals <= tol * scale))
            if converged or run.done:
                break
    if not converged:
        if m < k:
            raise UserError(f"found only {m} eigenvalues of {k}: the operator has a "
                            "Krylov space smaller than k; ask for fewer")
        warnings.warn(f"top_eigenvalues: the top {k} Ritz values did not converge to "
                      f"tol={tol:g} in {m} steps; pass a larger iterations", RuntimeWarning,
                      stacklevel=2)
    eigenvalues = values[top]
    if not return_vectors:
        return eigenvalues
    coefficients = torch.as_tensor(np.ascontiguousarray(vectors[:, top]), dtype=torch.float64,
                                   device=run.basis.device)
    eigenvectors = run.basis[:m].T @ coefficients
    eigenvectors /= torch.linalg.vector_norm(eigenvectors, dim=0, keepdim=True)
    return eigenvalues, eigenvectors


def _restart(run: LanczosRecurrence, dim: int, seed: int, name: str, restarts: int) -> bool:
    """After a breakdown, continue ``run`` from a fresh vector orthogonal to its basis
    (coupling ``beta = 0``: the tridiagonal becomes block diagonal). False if none is left."""
    m = len(run.alphas)
    basis = run.basis[:m]
    w = start_vector(dim, seed, restarts, name, "gaussian").to(basis.device)
    for _ in range(2):
        w.sub_(basis.t().mv(basis.mv(w)))
    norm = float(torch.linalg.vector_norm(w))
    if norm <= 1e-8:
        return False
    run.restart(w.div_(norm))
    return True

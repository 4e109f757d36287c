"""Hutchinson trace estimates and the top eigenvalues (block Lanczos) of a symmetric operator.

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
from layerhessians.errors import UserError
from layerhessians.spectra.lanczos import check_count, check_symmetric
from layerhessians.spectra.plan import check_basis_fits
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
        """Number of Rademacher samples (products) behind the estimate."""
        return int(self.values.size)

    def __iter__(self):  # allows ``estimate, stderr = hessian_trace(op)``
        return iter((self.estimate, self.stderr))


def hessian_trace(op, samples: int = 100, seed: int = 0,
                  check_symmetry: bool = True) -> TraceEstimate:
    """Hutchinson's estimate of ``trace(op)`` from ``samples`` Rademacher vectors.

    ``v`` has entries +-1 (seeded by ``(seed, sample index, "trace/" + op.name)``), so
    ``E[v^T A v] = trace(A)`` exactly; ``samples`` products. Returns a :class:`TraceEstimate`
    (unpacks as ``estimate, stderr``). Like every estimator it first runs the symmetry and
    finiteness probe (:func:`~layerhessians.spectra.lanczos.check_symmetric`, two more products;
    ``check_symmetry=False`` skips it). Raises
    :class:`~layerhessians.curvature.graph.NonFiniteError` for a product with NaN/inf entries
    and :class:`UserError` for a non-symmetric operator.
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
    if check_symmetry:  # after the samples, so that a non-finite one is named first
        check_symmetric([op])
    stderr = float(values.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan
    return TraceEstimate(float(values.mean()), stderr, values)


def top_eigenvalues(op, k: int = 1, iterations: int | None = None, seed: int = 0,
                    return_vectors: bool = False, tol: float = 1e-6,
                    check_symmetry: bool = True):
    """The ``k`` algebraically largest eigenvalues of ``op`` (and eigenvectors), with their
    multiplicities, by block Lanczos.

    Block Lanczos (Golub and Underwood, 1977) with block size ``k`` and full float64
    re-orthogonalisation, from ``k`` Gaussian start vectors (seeded by
    ``(seed, index, "top/" + op.name)``): a block Krylov space holds up to ``k`` vectors of
    each eigenspace, so an eigenvalue repeated among the top ``k`` is found as often as it
    is repeated (single-vector Lanczos finds it once). It runs until the top ``k`` Ritz pairs
    have residual ``||A y - theta y|| <= tol * max|theta|`` (computed from the products, no
    extra ones), or ``iterations`` products (default ``min(dim, max(100, 30 k))``, rounded
    up to a multiple of ``k``; a warning says when they did not converge). A rank-deficient
    block (an invariant subspace found) is completed by fresh random vectors orthogonal to
    the basis. For ``k = 1`` this is single-vector Lanczos; for larger ``k`` it needs more
    products than single-vector Lanczos (counted by ``benchmarks/bench_top_eigenvalues.py``).
    The float64 basis grows with the products, at most ``iterations x dim x 8`` bytes.

    Args:
        op: a symmetric operator with ``.dim`` and ``.matvec`` (``.name``, ``.device``
            optional).
        k: number of eigenvalues (``1 <= k <= dim``).
        iterations: most operator products (``>= k``).
        seed: seed of the start vectors.
        return_vectors: also return the Ritz vectors.
        tol: relative residual tolerance.
        check_symmetry: first refuse a non-symmetric operator (two products; see
            :func:`~layerhessians.spectra.lanczos.check_symmetric`).

    Returns:
        eigenvalues: float64 numpy [k], descending (largest algebraic first; a Hessian's
            most negative eigenvalues are not "top").
        vectors (only if ``return_vectors``): float64 tensor [dim, k], orthonormal columns.

    Raises:
        UserError: bad ``k``/``iterations``/``seed``, a basis that does not fit in memory,
            or a non-finite product.
    """
    dim = int(op.dim)
    k = check_count(k, "k")
    if k > dim:
        raise UserError(f"k = {k} exceeds the operator's dim {dim}")
    check_count(seed, "seed", minimum=0)
    steps = check_count(iterations, "iterations") if iterations is not None else \
        min(dim, max(100, 30 * k))
    if steps < k:
        raise UserError(f"iterations = {steps} < k = {k}: pass iterations >= k")
    steps = min(dim, -(-steps // k) * k)  # whole blocks of k, at most the whole space
    check_basis_fits([op], steps)
    name = "top/" + str(getattr(op, "name", FULL))
    if check_symmetry:
        check_symmetric([op])
    values, ritz, basis, converged = _block_lanczos_top(op, k, steps, seed, name, tol)
    size = basis.shape[0]
    if not converged:
        warnings.warn(f"top_eigenvalues: the top {k} Ritz values did not converge to "
                      f"tol={tol:g} in {size} products; pass a larger iterations",
                      RuntimeWarning, stacklevel=2)
    if not return_vectors:
        return values
    coefficients = torch.as_tensor(np.ascontiguousarray(ritz), dtype=torch.float64,
                                   device=basis.device)
    eigenvectors = basis.T @ coefficients
    eigenvectors /= torch.linalg.vector_norm(eigenvectors, dim=0, keepdim=True)
    return values, eigenvectors


_RANK_RTOL = 1e-10  # a block direction below this (relative to max|theta|) is deflated


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rows of ``w`` minus their components in the rows of ``basis`` (twice: "twice is
    enough", Parlett)."""
    for _ in range(2):
        w = w - (w @ basis.T) @ basis
    return w


def _random_rows(count, dim, seed, name, first, basis, device):
    """``count`` seeded Gaussian rows orthonormal to each other and to ``basis``, or fewer
    if the space is exhausted; returns (rows [<= count, dim], next seed index)."""
    rows, index = [], first
    while len(rows) < count and index < first + 4 * count:
        w = start_vector(dim, seed, index, name, "gaussian").to(device)[None, :]
        index += 1
        w = _orthogonalize(w, torch.cat([basis, *rows]) if rows else basis)
        norm = float(torch.linalg.vector_norm(w))
        if norm > 1e-8:
            rows.append(w / norm)
    return (torch.cat(rows) if rows else basis.new_zeros(0, dim)), index


def _block_lanczos_top(op, k: int, steps: int, seed: int, name: str, tol: float):
    """Block Lanczos with block size ``k`` and full re-orthogonalisation, up to ``steps``
    basis vectors. Returns (top k Ritz values [k] descending, their coefficients in the
    basis [size, k], basis rows [size, dim] float64, converged)."""
    dim = int(op.dim)
    device = torch.device(getattr(op, "device", "cpu"))
    basis = torch.empty(min(steps, 8 * k), dim, dtype=torch.float64, device=device)
    block, index = _random_rows(k, dim, seed, name, 0, basis[:0], device)
    size, couplings, diagonals = 0, [], []
    while True:
        width = block.shape[0]
        if size + width > basis.shape[0]:  # grow the basis (doubling), up to steps rows
            grown = torch.empty(min(steps, 2 * basis.shape[0]), dim, dtype=torch.float64,
                                device=device)
            grown[:size] = basis[:size]
            basis = grown
        basis[size:size + width] = block
        size += width
        products = torch.stack([op.matvec(row).to(device, torch.float64) for row in block])
        if not bool(torch.isfinite(products).all()):
            raise UserError(f"top_eigenvalues: operator {getattr(op, 'name', FULL)!r} gave a "
                            "non-finite product (NaN or inf): its curvature is not finite "
                            "at these parameters and data")
        diagonal = block @ products.T
        diagonals.append((diagonal + diagonal.T) / 2)
        residual = _orthogonalize(products, basis[:size])  # rows: W = A Q - V V^T A Q
        matrix = _block_tridiagonal(diagonals, couplings).cpu().numpy()
        theta, vectors = np.linalg.eigh(matrix)
        top = np.argsort(theta)[::-1][:k]
        scale = max(float(np.abs(theta).max()), np.finfo(np.float64).tiny)
        # A y - theta y = W^T s_last for y = V s (full re-orthogonalisation)
        last = torch.as_tensor(vectors[size - width:, top], dtype=torch.float64, device=device)
        norms = torch.linalg.vector_norm(residual.T @ last, dim=0).cpu().numpy()
        converged = size >= k and bool(np.all(norms <= tol * scale))
        room = steps - size
        if converged or room == 0:
            return theta[top], vectors[:, top], basis[:size], converged
        # next block: the range of W, completed by random rows where W is rank-deficient
        left, singular, _ = torch.linalg.svd(residual.T, full_matrices=False)
        rank = int((singular > _RANK_RTOL * scale).sum())
        width_next = min(k, room)
        block = left[:, :min(rank, width_next)].T.contiguous()
        if block.shape[0] < width_next:
            extra, index = _random_rows(width_next - block.shape[0], dim, seed, name, index,
                                        torch.cat([basis[:size], block]), device)
            block = torch.cat([block, extra])
            if block.shape[0] == 0:  # the basis spans an invariant subspace and no more
                return theta[top], vectors[:, top], basis[:size], size >= k
        couplings.append(block @ residual.T)  # B = Q_next^T W, [next width, width]


def _block_tridiagonal(diagonals, couplings) -> torch.Tensor:
    """The symmetric block-tridiagonal matrix with diagonal blocks ``diagonals`` and
    sub-diagonal blocks ``couplings`` (``couplings[j]`` couples block j to block j + 1)."""
    sizes = [d.shape[0] for d in diagonals]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    matrix = diagonals[0].new_zeros(offsets[-1], offsets[-1])
    for j, d in enumerate(diagonals):
        matrix[offsets[j]:offsets[j + 1], offsets[j]:offsets[j + 1]] = d
    for j, b in enumerate(couplings):
        matrix[offsets[j + 1]:offsets[j + 2], offsets[j]:offsets[j + 1]] = b
        matrix[offsets[j]:offsets[j + 1], offsets[j + 1]:offsets[j + 2]] = b.T
    return matrix

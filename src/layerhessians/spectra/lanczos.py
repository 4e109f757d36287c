"""Lanczos iterations, advanced in lockstep over several operators, and stochastic Lanczos
quadrature (SLQ).

One Lanczos run from a unit start vector ``q`` builds the tridiagonal ``T_m`` (diagonal
``alphas``, off-diagonal ``betas``). Its eigenvalues (Ritz values) are the quadrature nodes and
the squared first components of its eigenvectors the weights: for a symmetric ``A`` with
eigenpairs ``(lambda_i, u_i)`` they approximate the measure ``sum_i (u_i . q)^2
delta(lambda_i)`` (exact moments up to degree ``2m - 1``). With Rademacher or Gaussian
``q``, the average over vectors estimates the spectral density ``(1/dim) sum_i
delta(lambda_i)``. The extreme Ritz values converge first and lie inside ``[lambda_min,
lambda_max]``, so the run itself gives the spectrum's support: no separate bounding run.

Numerics: the vectors and the stored basis are float64 whatever the operator's dtype.
``reorthogonalize=True`` (default) applies classical Gram-Schmidt against the whole basis at
each step, repeated once when the first pass cancelled much of the vector (the DGKS
criterion, "twice is enough"), so there are no spurious "ghost" copies of converged
eigenvalues; it stores the
basis: ``steps * dim * 8`` bytes per concurrent run (LeNet, 128 steps: 63 MB; ResNet18:
11.4 GB; VGG11_bn: 29 GB; twice that for full + layer spectra), so switch it off or use
fewer steps for big models; a run whose bases exceed 90% of the free memory is refused with
a :class:`UserError` saying so. ``reorthogonalize=False`` keeps two
vectors (``O(dim)`` memory), like the original method. A run stops early on breakdown
(``beta <= breakdown_rtol * ||T||``: the Krylov space is invariant and the quadrature is
exact) and never takes more than ``dim`` steps.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from layerhessians.errors import UserError
from layerhessians.progress import Progress
from layerhessians.spectra.measure import SpectralMeasure
from layerhessians.vocabulary import (
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
    DISTRIBUTIONS,
    FULL,
)

__all__ = ["DEFAULT_DISTRIBUTION", "DISTRIBUTIONS", "LanczosRun", "lanczos", "slq", "slq_many",
           "start_vector",           "check_count", "available_memory"]

BREAKDOWN_RTOL = 1e-10
_DGKS = 2 ** -0.5  # repeat Gram-Schmidt when it removed more than 1 - 1/sqrt(2) of the norm


def check_count(value, what: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def start_vector(dim: int, seed: int = 0, vector: int = 0, block: str = FULL,
                 distribution: str = DEFAULT_DISTRIBUTION, device=None,
                 normalize: bool = True) -> Tensor:
    """A random float64 vector [dim], reproducible from ``(seed, vector, block)``.

    Drawn on the CPU by a ``torch.Generator`` seeded from a hash of the three keys (so a
    block's vectors do not depend on which other blocks are computed), then moved to
    ``device``. Rademacher entries are +-1, Gaussian N(0, 1); ``normalize`` scales to unit norm.
    """
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}; "
                        f"got {distribution!r}")
    key = hashlib.sha256(f"{int(seed)}/{int(vector)}/{block}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    if distribution == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
    else:
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
    if normalize:
        v /= torch.linalg.vector_norm(v)
    return v.to(device) if device is not None else v


@dataclass
class LanczosRun:
    """The result of one Lanczos recurrence.

    Attributes:
        alphas: float64 [m], the diagonal of ``T_m``.
        betas: float64 [m - 1], its off-diagonal.
        residual: ``||r_m||``, the norm left after the last step (``beta_m``); Ritz pair ``i``
            has residual ``residual * |s_{m,i}|``.
        breakdown: the run stopped because the Krylov space became invariant.
        basis: float64 [m, dim] Lanczos vectors when kept, else ``None``.
    """

    alphas: np.ndarray
    betas: np.ndarray
    residual: float
    breakdown: bool
    basis: Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigen-decomposition of ``T_m``: values [m] ascending, vectors [m, m] (columns)."""
        return tridiagonal_eigh(self.alphas, self.betas)

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature nodes (Ritz values) [m] and weights [m] (sum 1)."""
        values, vectors = self.ritz()
        return values, vectors[0] ** 2


def tridiagonal_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix."""
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    if alphas.size == 1:
        return alphas.copy(), np.ones((1, 1))
    try:
        return scipy.linalg.eigh_tridiagonal(alphas, betas)
    except (np.linalg.LinAlgError, ValueError):
        dense = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        return np.linalg.eigh(dense)


class _Recurrence:
    """One Lanczos recurrence for ``op`` from ``start``, advanced one product per ``step()``."""

    def __init__(self, op, start: Tensor, steps: int, reorthogonalize: bool, keep_basis: bool,
                 breakdown_rtol: float):
        self.op = op
        dim = int(op.dim)
        self.max_steps = min(int(steps), dim)
        device = getattr(op, "device", start.device)
        q = start.to(device=device, dtype=torch.float64).reshape(-1)
        if q.shape[0] != dim:
            raise UserError(f"start vector has length {q.shape[0]}, the operator dim {dim}")
        norm = torch.linalg.vector_norm(q)
        if not norm > 0:
            raise UserError("the Lanczos start vector is zero")
        self.reorthogonalize = reorthogonalize
        self.basis = None
        # reused buffers: fresh multi-megabyte tensors each step would cost page faults
        self.accepts_out = bool(getattr(op, "matvec_accepts_out", False))
        self.spare = [torch.empty(dim, dtype=torch.float64, device=device)]
        if reorthogonalize or keep_basis:
            self.basis = torch.empty(self.max_steps, dim, dtype=torch.float64, device=device)
            self.basis[0].copy_(q).div_(norm)
            self.q = self.basis[0]
        else:
            self.q = torch.empty(dim, dtype=torch.float64, device=device).copy_(q).div_(norm)
            self.spare.append(torch.empty(dim, dtype=torch.float64, device=device))
        self.q_prev, self.beta_prev = None, 0.0
        self.alphas, self.betas = [], []
        self.scale = 0.0  # Gershgorin bound on ||T||, for the breakdown test
        self.rtol = breakdown_rtol
        self.done, self.breakdown, self.residual = False, False, math.nan

    def step(self, product: Tensor | None = None) -> None:
        """One Lanczos step; ``product``: ``A q`` already computed into ``self.spare[0]``."""
        j = len(self.alphas)
        if product is not None:
            w = product
        elif self.accepts_out:
            w = self.op.matvec(self.q, out=self.spare[0])
        else:  # a foreign operator may return a tensor it keeps: work on a copy
            w = self.spare[0].copy_(torch.as_tensor(self.op.matvec(self.q)))
        alpha = float(torch.dot(w, self.q))
        w.sub_(self.q, alpha=alpha)
        if self.q_prev is not None:
            w.sub_(self.q_prev, alpha=self.beta_prev)
        beta = float(torch.linalg.vector_norm(w))
        if self.reorthogonalize:
            basis = self.basis[: j + 1]
            for _ in range(2):  # classical Gram-Schmidt; a second pass only if needed (DGKS)
                w.addmv_(basis.t(), basis.mv(w), alpha=-1.0)
                before, beta = beta, float(torch.linalg.vector_norm(w))
                if beta > _DGKS * before:
                    break
        self.alphas.append(alpha)
        self.scale = max(self.scale, abs(alpha) + self.beta_prev + beta)
        self.residual = beta
        if beta <= self.rtol * self.scale:
            self.done = self.breakdown = True
        if j + 1 >= self.max_steps:
            self.done = True
        if self.done:
            return
        self.betas.append(beta)
        w.div_(beta)
        if self.basis is not None:
            self.basis[j + 1].copy_(w)  # the buffer w stays spare
            w = self.basis[j + 1]
        else:  # rotate buffers: q_prev's memory becomes the next spare
            self.spare[0] = self.q_prev if self.q_prev is not None else self.spare.pop()
        self.q_prev, self.q, self.beta_prev = self.q, w, beta

    def result(self, keep_basis: bool) -> LanczosRun:
        m = len(self.alphas)
        basis = self.basis[:m] if keep_basis and self.basis is not None else None
        return LanczosRun(np.array(self.alphas), np.array(self.betas), self.residual,
                          self.breakdown, basis)


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), or None."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def _check_basis_memory(operators: Sequence, iterations: int) -> None:
    """Refuse (UserError) Lanczos bases that cannot fit in the free memory."""
    needed = {}
    for op in operators:
        device = torch.device(getattr(op, "device", "cpu"))
        needed[device] = needed.get(device, 0) + min(iterations, int(op.dim)) * int(op.dim) * 8
    for device, size in needed.items():
        free = available_memory(device)
        if free is not None and size > 0.9 * free:
            raise UserError(
                f"full re-orthogonalisation needs {size / 2**30:.1f} GiB for the Lanczos "
                f"bases (steps x parameters x 8 bytes) but {device} has {free / 2**30:.1f} "
                "GiB free: pass reorthogonalize=False or fewer iterations"
            )


def _step_all(runs: Sequence[_Recurrence]) -> None:
    """One step of every run. Runs whose operators share a graph that is rebuilt for every
    product (``reuse_graph=False``) get their products from one pass over its batches
    (:meth:`~layerhessians.curvature.operators.CurvatureGraph.products`)."""
    shared = {}
    for run in runs:
        graph = getattr(run.op, "graph", None)
        if run.accepts_out and graph is not None and hasattr(graph, "products") \
                and not getattr(graph, "reuse_graph", True):
            shared.setdefault(id(graph), (graph, []))[1].append(run)
        else:
            run.step()
    for graph, group in shared.values():
        products = graph.products([r.op for r in group], [r.q for r in group],
                                  [r.spare[0] for r in group])
        for run, product in zip(group, products):
            run.step(product)


def lanczos(operators: Sequence, starts: Sequence[Tensor], iterations: int,
            reorthogonalize: bool = True, keep_basis: bool = False, progress: bool = False,
            breakdown_rtol: float = BREAKDOWN_RTOL, description: str | None = None
            ) -> list[LanczosRun]:
    """Run one Lanczos recurrence per operator, all advanced together step by step.

    Operators that share a :class:`~layerhessians.curvature.operators.CurvatureGraph` share
    its first-order graph, so a step costs one product per operator and no forward pass.

    Args:
        operators: objects with ``.dim`` and ``.matvec`` (1-D in and out).
        starts: one start vector per operator (any scale; normalised here).
        iterations: maximum number of steps (products) per recurrence; each stops early on
            breakdown and after ``dim`` steps.
        reorthogonalize: full re-orthogonalisation (float64 basis) or none.
        keep_basis: return the Lanczos basis (needs its memory even without re-orth.).
        progress: report progress over the steps: a tqdm bar on a terminal, otherwise a log
            line every 30 s (:class:`~layerhessians.progress.Progress`).

    Returns:
        One :class:`LanczosRun` per operator, in order.
    """
    iterations = check_count(iterations, "iterations")
    if len(operators) != len(starts):
        raise UserError("lanczos needs one start vector per operator")
    if reorthogonalize or keep_basis:
        _check_basis_memory(operators, iterations)
    runs = [_Recurrence(op, s, iterations, reorthogonalize, keep_basis, breakdown_rtol)
            for op, s in zip(operators, starts)]
    total = max(r.max_steps for r in runs)
    with Progress(total=total, desc=description or "Lanczos", unit="step", disable=not progress) as bar:
        for _ in range(total):
            _step_all([run for run in runs if not run.done])
            bar.update()
            if all(r.done for r in runs):
                break
    return [r.result(keep_basis) for r in runs]


def slq_many(operators: Sequence, names: Sequence[str], iterations: int = DEFAULT_ITERATIONS,
             vectors: int = DEFAULT_VECTORS, seed: int = 0,
             distribution: str = DEFAULT_DISTRIBUTION, reorthogonalize: bool = True,
             progress: bool = False) -> list[SpectralMeasure]:
    """SLQ for several operators at once: for each random vector index, one lockstep
    Lanczos run over all operators (start vectors seeded by ``(seed, vector, name)``).

    Returns one :class:`SpectralMeasure` per operator, in order.
    """
    iterations = check_count(iterations, "iterations")
    vectors = check_count(vectors, "vectors")
    check_count(seed, "seed", minimum=0)
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}; "
                        f"got {distribution!r}")
    nodes = [[] for _ in operators]
    weights = [[] for _ in operators]
    for index in range(vectors):
        starts = [start_vector(op.dim, seed, index, name, distribution) for op, name in
                  zip(operators, names)]
        desc = f"SLQ vector {index + 1}/{vectors}"
        runs = lanczos(operators, starts, iterations, reorthogonalize, progress=progress,
                       description=desc)
        for k, run in enumerate(runs):
            node, weight = run.quadrature()
            nodes[k].append(node)
            weights[k].append(weight)
    return [SpectralMeasure(n, w, dim=op.dim) for n, w, op in zip(nodes, weights, operators)]


def slq(op, iterations: int = DEFAULT_ITERATIONS,
        vectors: int = DEFAULT_VECTORS, seed: int = 0,
        distribution: str = DEFAULT_DISTRIBUTION, reorthogonalize: bool = True,
        progress: bool = False) -> SpectralMeasure:
    """Stochastic Lanczos quadrature: the spectral measure of ``op``.

    Args:
        op: a symmetric operator with ``.dim`` and ``.matvec`` (e.g. from
            :func:`~layerhessians.spectra.hessian_operator`).
        iterations: Lanczos steps per vector (default 128, the paper's setting); at most
            ``dim`` are taken, fewer on breakdown.
        vectors: number of random start vectors averaged (default 1).
        seed: the start vectors are drawn from ``(seed, vector index, op.name)``.
        distribution: ``"gaussian"`` (default, the paper's) or ``"rademacher"`` start vectors.
        reorthogonalize: full float64 re-orthogonalisation (default; memory
            ``iterations * dim * 8`` bytes) or none (``O(dim)``).
        progress: progress over the steps: a bar on a terminal, else a log line every 30 s.

    Returns:
        A :class:`SpectralMeasure` (nodes = Ritz values, weights = squared first components,
        one row per vector).
    """
    name = getattr(op, "name", FULL)
    return slq_many([op], [name], iterations, vectors, seed, distribution, reorthogonalize,
                    progress)[0]

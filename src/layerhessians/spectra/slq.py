"""Stochastic Lanczos quadrature (SLQ; Golub & Meurant; Ubaru, Chen & Saad 2017): the
spectral measure of a symmetric operator from Lanczos runs on random start vectors.

The Ritz values of a run from a unit vector ``q`` are the quadrature nodes and the squared
first components of the tridiagonal's eigenvectors the weights; with Rademacher or Gaussian
``q`` the average over vectors estimates the spectral density ``(1/dim) sum_i
delta(lambda_i)``. Start vectors are reproducible from ``(seed, vector index, block name)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from layerhessians.errors import UserError, check_choice
from layerhessians.settings import SpectraSettings
from layerhessians.spectra.lanczos import lanczos
from layerhessians.spectra.measure import SpectralMeasure
from layerhessians.vocabulary import (
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
    DISTRIBUTIONS,
    FULL,
)

__all__ = ["DEFAULT_DISTRIBUTION", "DISTRIBUTIONS", "run_slq", "slq", "slq_many", "start_vector"]


def start_vector(dim: int, seed: int = 0, vector: int = 0, block: str = FULL,
                 distribution: str = DEFAULT_DISTRIBUTION, device=None,
                 normalize: bool = True) -> Tensor:
    """A random float64 vector [dim], reproducible from ``(seed, vector, block)``.

    Drawn on the CPU by a ``torch.Generator`` seeded from a hash of the three keys (so a
    block's vectors do not depend on which other blocks are computed), then moved to
    ``device``. Rademacher entries are +-1, Gaussian N(0, 1); ``normalize`` scales to unit norm.
    """
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    key = hashlib.sha256(f"{int(seed)}/{int(vector)}/{block}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    if distribution == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
    else:
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
    if normalize:
        v /= torch.linalg.vector_norm(v)
    return v.to(device) if device is not None else v


def slq_many(operators: Sequence, names: Sequence[str], iterations: int = DEFAULT_ITERATIONS,
             vectors: int = DEFAULT_VECTORS, seed: int = 0,
             distribution: str = DEFAULT_DISTRIBUTION, reorthogonalize: bool = True,
             progress: bool = False, check_symmetry: bool = True) -> list[SpectralMeasure]:
    """SLQ for several operators at once: for each random vector index, one lockstep
    Lanczos run over all operators (start vectors seeded by ``(seed, vector, name)``).

    ``check_symmetry``: probe every operator's symmetry once, before the first vector (two
    products per operator, in one pass per shared graph; see
    :func:`~layerhessians.spectra.lanczos.check_symmetric`).

    Returns one :class:`SpectralMeasure` per operator, in order.

    Raises:
        SettingError: a bad setting (:class:`~layerhessians.settings.SpectraSettings`).
        UserError: a non-symmetric operator.
        NonFiniteError: a product with NaN or infinite entries (names operator and step).
    """
    settings = SpectraSettings(iterations=iterations, vectors=vectors, seed=seed,
                               distribution=distribution, reorthogonalize=reorthogonalize,
                               check_symmetry=check_symmetry)
    return run_slq(operators, names, settings, progress=progress)


def run_slq(operators: Sequence, names: Sequence[str], settings: SpectraSettings,
            reorthogonalize=None, progress: bool = False) -> list[SpectralMeasure]:
    """:func:`slq_many` with its settings as one object (validated when it was made):
    ``settings.iterations``, ``vectors``, ``seed``, ``distribution``, ``check_symmetry``;
    ``reorthogonalize`` (a bool) overrides ``settings.reorthogonalize``, whose ``"auto"``
    is resolved here against the default memory budget
    (:func:`~layerhessians.spectra.plan.choose_reorthogonalize`)."""
    if reorthogonalize is None:
        reorthogonalize = settings.reorthogonalize
    if isinstance(reorthogonalize, str):
        from layerhessians.curvature.memory import memory_budget
        from layerhessians.spectra.plan import choose_reorthogonalize

        device = getattr(operators[0], "device", "cpu") if operators else "cpu"
        reorthogonalize = choose_reorthogonalize(
            reorthogonalize, [int(op.dim) for op in operators], settings.iterations,
            memory_budget(settings.memory_budget, device))
    vectors = settings.vectors
    nodes = [[] for _ in operators]
    weights = [[] for _ in operators]
    for index in range(vectors):
        starts = [start_vector(op.dim, settings.seed, index, name, settings.distribution)
                  for op, name in zip(operators, names)]
        desc = f"SLQ vector {index + 1}/{vectors}"
        runs = lanczos(operators, starts, settings.iterations, reorthogonalize,
                       progress=progress, description=desc,
                       check_symmetry=settings.check_symmetry and index == 0)
        for k, run in enumerate(runs):
            node, weight = run.quadrature()
            nodes[k].append(node)
            weights[k].append(weight)
    return [SpectralMeasure(n, w, dim=op.dim, method="slq")
            for n, w, op in zip(nodes, weights, operators)]


def slq(op, iterations: int = DEFAULT_ITERATIONS, vectors: int = DEFAULT_VECTORS, seed: int = 0,
        distribution: str = DEFAULT_DISTRIBUTION, reorthogonalize: bool = True,
        progress: bool = False, check_symmetry: bool = True) -> SpectralMeasure:
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
        check_symmetry: probe the operator's symmetry first (two products) and refuse a
            non-symmetric one (default); ``False`` skips the probe.

    Returns:
        A :class:`SpectralMeasure` (nodes = Ritz values, weights = squared first components,
        one row per vector).

    Raises:
        UserError: bad arguments, or a non-symmetric operator.
        NonFiniteError: a product with NaN or infinite entries (names operator and step).
    """
    if not (isinstance(getattr(op, "dim", None), int) and callable(getattr(op, "matvec", None))):
        raise UserError(f"slq needs an operator with .dim and .matvec (e.g. from "
                        f"hessian_operator); got {type(op).__name__}")
    name = getattr(op, "name", FULL)
    return slq_many([op], [name], iterations, vectors, seed, distribution, reorthogonalize,
                    progress, check_symmetry)[0]

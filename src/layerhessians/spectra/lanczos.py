"""Lanczos iterations (:class:`LanczosRecurrence`), advanced in lockstep over several
operators (:func:`lanczos`); stochastic Lanczos quadrature is in :mod:`.slq`.

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
a :class:`UserError` saying so (:func:`~layerhessians.spectra.plan.check_basis_fits`). ``reorthogonalize=False`` keeps two
vectors (``O(dim)`` memory), like the original method. A run stops early on breakdown
(``beta <= breakdown_rtol * ||T||``: the Krylov space is invariant and the quadrature is
exact) and never takes more than ``dim`` steps.

Checks. A step whose product has NaN or infinite entries raises
:class:`~layerhessians.curvature.graph.NonFiniteError` at once, naming the operator and the
step (never a NaN spectrum, never an eigen-solver failure). Before its first step a
recurrence probes the operator's symmetry (:func:`check_symmetric`: two products;
``lanczos`` probes all its operators in one pass over a shared graph); a Lanczos spectrum of
a non-symmetric operator is meaningless, so it is refused unless ``check_symmetry=False``.
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

from layerhessians.curvature.graph import NonFiniteError
from layerhessians.errors import UserError
from layerhessians.progress import Progress
from layerhessians.spectra.plan import check_basis_fits

__all__ = ["BREAKDOWN_RTOL", "SYMMETRY_RTOL", "LanczosRecurrence", "LanczosRun", "check_count",
           "check_symmetric", "lanczos", "symmetry_defects", "tridiagonal_eigh"]

BREAKDOWN_RTOL = 1e-10
#: the symmetry probe's tolerance on ``|u.Av - v.Au| / max(|Au|, |Av|)`` (unit ``u``, ``v``)
#: by the operator's dtype (other dtypes: 5e-2); roundoff is far below, torch's weight_norm
#: double backward (the case that motivated the probe) far above (0.07-0.4)
SYMMETRY_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
_DGKS = 2 ** -0.5  # repeat Gram-Schmidt when it removed more than 1 - 1/sqrt(2) of the norm


def check_count(value, what: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else :class:`UserError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}; got {value!r}")
    return int(value)


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
        """``m``: steps taken (the size of ``T_m``, the number of Ritz values)."""
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


def product_group(op):
    """``op.product_group`` (see
    :attr:`~layerhessians.curvature.base.SymmetricOperator.product_group`): the object that
    multiplies ``op`` jointly with the other operators of its group, or ``None`` (also for an
    operator that does not define it)."""
    return getattr(op, "product_group", None)


def _probe_vectors(op, dim: int) -> tuple[Tensor, Tensor]:
    seed = int.from_bytes(hashlib.sha256(
        f"symmetry/{getattr(op, 'name', '')}".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    u, v = torch.randn(2, dim, generator=generator, dtype=torch.float64)
    return u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)


def symmetry_defects(operators: Sequence) -> list[float]:
    """``|u.Av - v.Au| / max(|Au|, |Av|, floor)`` per operator, for two fixed random unit
    vectors ``u``, ``v`` (seeded by the operator's name): 0 for a symmetric operator up to
    roundoff. Two products per operator; operators sharing a
    :class:`~layerhessians.curvature.graph.CurvatureGraph` get them in one pass over its
    batches. ``floor`` is ``sqrt(eps)`` of the largest product of the operators on the same
    graph, so that blocks that vanish up to roundoff are not judged on their roundoff.

    Raises:
        NonFiniteError: a product has NaN or infinite entries.
    """
    pairs = [_probe_vectors(op, int(op.dim)) for op in operators]
    products: list = [None] * len(operators)
    groups = {}
    for k, op in enumerate(operators):
        group = product_group(op)
        if group is not None:
            groups.setdefault(id(group), (group, []))[1].append(k)
        else:
            device = getattr(op, "device", None)
            u, v = (t.to(device) for t in pairs[k])
            products[k] = (torch.as_tensor(op.matvec(u)).to(torch.float64),
                           torch.as_tensor(op.matvec(v)).to(torch.float64))
    for group, members in groups.values():
        ops = [operators[k] for k in members]
        device = ops[0].device
        vectors = [pairs[k][0].to(device) for k in members] + \
            [pairs[k][1].to(device) for k in members]
        results = group.products(ops + ops, vectors)
        for i, k in enumerate(members):
            products[k] = (results[i].to(torch.float64),
                           results[len(members) + i].to(torch.float64))
    floors = {}
    for k, op in enumerate(operators):
        au, av = products[k]
        norm = max(float(torch.linalg.vector_norm(au)), float(torch.linalg.vector_norm(av)))
        key = id(product_group(op) or op)
        floors[key] = max(floors.get(key, 0.0), norm)
    defects = []
    for k, op in enumerate(operators):
        (u, v), (au, av) = pairs[k], products[k]
        u, v = u.to(au.device), v.to(au.device)
        norm = max(float(torch.linalg.vector_norm(au)), float(torch.linalg.vector_norm(av)))
        eps = float(torch.finfo(getattr(op, "dtype", torch.float64)).eps)
        scale = max(norm, eps ** 0.5 * floors[id(product_group(op) or op)])
        asymmetry = abs(float(torch.dot(u, av)) - float(torch.dot(v, au)))
        if not (math.isfinite(asymmetry) and math.isfinite(norm)):
            raise NonFiniteError(f"the symmetry probe of the operator "
                                 f"{getattr(op, 'name', '')!r}: a product has non-finite (NaN or infinite) "
                                 "entries, so its spectrum is undefined")
        defects.append(asymmetry / scale if scale > 0 else 0.0)
    return defects


def check_symmetric(operators: Sequence, rtol: float | None = None) -> None:
    """Refuse an operator that is not symmetric (:func:`symmetry_defects` above ``rtol``,
    default :data:`SYMMETRY_RTOL` of its dtype): its Lanczos spectrum would be silently
    wrong. Costs two products per operator.

    Raises:
        UserError: an operator is not symmetric (the message names it).
        NonFiniteError: a product has NaN or infinite entries.
    """
    for op, defect in zip(operators, symmetry_defects(operators)):
        limit = rtol if rtol is not None else \
            SYMMETRY_RTOL.get(getattr(op, "dtype", torch.float64), 5e-2)
        if defect > limit:
            raise UserError(
                f"the operator {getattr(op, 'name', '')!r} is not symmetric (|u.Av - v.Au| = "
                f"{defect:.2g} of |Av| for random unit u, v; tolerance {limit:g}): its "
                f"spectrum and trace would be wrong. {_asymmetry_cause(op)}; or pass "
                "check_symmetry=False to proceed anyway")


def _asymmetry_cause(op) -> str:
    """What the model shows that explains an asymmetric operator (or what to look for)."""
    model = getattr(op, "model", None)
    if model is not None:
        for name, module in model.named_modules():
            hooks = list(getattr(module, "_forward_pre_hooks", {}).values())
            plain = any(type(h).__name__ == "WeightNorm" for h in hooks)
            parametrized = any(type(p).__name__ == "_WeightNorm"
                               for plist in getattr(module, "parametrizations", {}).values()
                               for p in plist)
            if plain or parametrized:
                return (f"Detected: module {name!r} uses torch's weight_norm, whose double "
                        "backward is not symmetric: remove it (torch.nn.utils.parametrize."
                        "remove_parametrizations or remove_weight_norm) before measuring")
    return ("No known cause was detected in the model: look for roundoff (products of tiny "
            "or huge factors, float32 where float64 is needed) or a custom autograd function "
            "whose double backward is not symmetric")


class LanczosRecurrence:
    """One Lanczos recurrence for ``op`` from ``start``, advanced one product per :meth:`step`.

    Args:
        op: a symmetric operator with ``.dim`` and ``.matvec`` (``matvec(v, out=...)`` when
            ``op.matvec_accepts_out``).
        start: the start vector [dim] (any scale; normalised, in float64).
        steps: at most this many steps (and at most ``dim``).
        reorthogonalize: full classical Gram-Schmidt against the basis (DGKS repeat).
        keep_basis: keep the basis [steps, dim] float64 even without re-orthogonalisation.
        breakdown_rtol: stop when ``beta <= breakdown_rtol * ||T||`` (invariant subspace).
        check_symmetry: probe the operator's symmetry first (:func:`check_symmetric`, two
            products); ``False`` skips it (e.g. when the caller has probed).

    Attributes:
        alphas, betas: the tridiagonal so far (lists of floats).
        q: the current unit Lanczos vector (float64 [dim], on the operator's device).
        basis: float64 [steps, dim] when kept, else ``None``.
        residual: ``||r_m||`` after the last step; ``done``, ``breakdown``: flags.
        max_steps: ``min(steps, dim)``.

    Raises:
        UserError: a start vector of the wrong length, or zero; a non-symmetric operator.
        NonFiniteError: (from :meth:`step`) a product with NaN or infinite entries.
    """

    def __init__(self, op, start: Tensor, steps: int, reorthogonalize: bool = True,
                 keep_basis: bool = False, breakdown_rtol: float = BREAKDOWN_RTOL,
                 check_symmetry: bool = True):
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
        if check_symmetry:
            check_symmetric([op])

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
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise NonFiniteError(
                f"Lanczos step {j + 1} on the operator {getattr(self.op, 'name', '')!r}: the "
                "product has non-finite (NaN or infinite) entries, so its spectrum is undefined (look for "
                "NaN/inf in the loss, the model or the data)")
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

    def restart(self, vector: Tensor) -> None:
        """Continue after a breakdown from ``vector``, a unit float64 vector [dim]
        orthogonal to the kept basis, with coupling ``beta = 0`` (the tridiagonal becomes
        block diagonal).

        Raises:
            UserError: no basis is kept, or the recurrence has no step left.
        """
        m = len(self.alphas)
        if self.basis is None or m >= self.max_steps:
            raise UserError("restart needs a kept basis and a step left")
        self.basis[m].copy_(vector)
        self.betas.append(0.0)
        self.q_prev, self.q, self.beta_prev = None, self.basis[m], 0.0
        self.done = self.breakdown = False

    def result(self, keep_basis: bool) -> LanczosRun:
        """The :class:`LanczosRun` so far (with the basis if ``keep_basis`` and kept)."""
        m = len(self.alphas)
        basis = self.basis[:m] if keep_basis and self.basis is not None else None
        return LanczosRun(np.array(self.alphas), np.array(self.betas), self.residual,
                          self.breakdown, basis)


def _step_all(runs: Sequence[LanczosRecurrence]) -> None:
    """One step of every run. Runs whose operators share a :attr:`product_group` and say that
    joint products save passes (``joint_products_save_passes``: a graph rebuilt for every
    product) get their products from one ``group.products`` call."""
    shared = {}
    for run in runs:
        group = product_group(run.op)
        if run.accepts_out and group is not None and \
                bool(getattr(run.op, "joint_products_save_passes", False)):
            shared.setdefault(id(group), (group, []))[1].append(run)
        else:
            run.step()
    for owner, group in shared.values():
        products = owner.products([r.op for r in group], [r.q for r in group],
                                  [r.spare[0] for r in group])
        for run, product in zip(group, products):
            run.step(product)


def lanczos(operators: Sequence, starts: Sequence[Tensor], iterations: int,
            reorthogonalize: bool = True, keep_basis: bool = False, progress: bool = False,
            breakdown_rtol: float = BREAKDOWN_RTOL, description: str | None = None,
            check_symmetry: bool = True) -> list[LanczosRun]:
    """Run one Lanczos recurrence per operator, all advanced together step by step.

    Operators that share a :class:`~layerhessians.curvature.graph.CurvatureGraph` share
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
        breakdown_rtol: stop a recurrence when ``beta <= breakdown_rtol * ||T||`` (invariant
            subspace; default :data:`BREAKDOWN_RTOL`).
        description: the progress report's label (default ``"Lanczos"``).
        check_symmetry: probe every operator's symmetry first, all in one pass per shared
            graph (:func:`check_symmetric`; two products per operator).

    Returns:
        One :class:`LanczosRun` per operator, in order.

    Raises:
        UserError: a non-symmetric operator; bases that do not fit in memory.
        NonFiniteError: a product with NaN or infinite entries (names operator and step).
    """
    iterations = check_count(iterations, "iterations")
    if len(operators) != len(starts):
        raise UserError("lanczos needs one start vector per operator")
    if reorthogonalize or keep_basis:
        check_basis_fits(operators, iterations)
    if check_symmetry:
        check_symmetric(operators)
    runs = [LanczosRecurrence(op, s, iterations, reorthogonalize, keep_basis, breakdown_rtol,
                              check_symmetry=False) for op, s in zip(operators, starts)]
    total = max(r.max_steps for r in runs)
    with Progress(total=total, desc=description or "Lanczos", unit="step",
                  disable=not progress) as bar:
        for _ in range(total):
            _step_all([run for run in runs if not run.done])
            bar.update()
            if all(r.done for r in runs):
                break
    return [r.result(keep_basis) for r in runs]

"""How one spectra computation uses memory: the Lanczos bases, ``reorthogonalize="auto"``,
and the :class:`MemoryPlan` (a frozen result computed from the
:class:`~layerhessians.settings.SpectraSettings`, never written back into them).

- :func:`basis_bytes` (the one formula for the Lanczos bases: ``min(steps, dim) x dim x 8``
  bytes per concurrent recurrence), :func:`choose_reorthogonalize` (``"auto"`` is full
  re-orthogonalisation when the bases take at most :data:`BASIS_SHARE` of the budget, else
  none, the original method's behaviour, with a logged warning) and :func:`check_basis_fits`
  (bases larger than :data:`BASIS_REFUSE_SHARE` of the free memory are refused).
- :func:`plan_memory` -> :class:`MemoryPlan`: the bases plus the first-order graphs'
  micro-batches (:func:`~layerhessians.curvature.memory.plan_micro_batches`) within one
  budget; :func:`plan_spectra`: the same from settings, with the refusals a run needs before
  it starts (too many steps, bases that do not fit), in the caller's spelling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from layerhessians.curvature.batches import as_batches
from layerhessians.curvature.memory import (
    GraphCost,
    available_memory,
    format_bytes,
    free_memory,
    measure_graph_cost,
    memory_budget,
    plan_micro_batches,
    splitting_changes_operator,
)
from layerhessians.errors import SettingError, UserError
from layerhessians.settings import SpectraSettings

__all__ = [
    "BASIS_REFUSE_SHARE",
    "BASIS_SHARE",
    "FREE_SHARE",
    "SPELLINGS",
    "MemoryPlan",
    "basis_bytes",
    "basis_warning",
    "check_basis_fits",
    "check_bases",
    "check_iterations",
    "choose_reorthogonalize",
    "plan_memory",
    "plan_spectra",
]

log = logging.getLogger("layerhessians.spectra")

#: the Lanczos bases may take at most this share of the budget; the graphs get the rest
BASIS_SHARE = 0.5
#: bases asked for explicitly are refused above this share of the free memory
BASIS_REFUSE_SHARE = 0.9
#: share of the free memory a planned run's Lanczos bases may take (per process sharing it)
FREE_SHARE = 0.9
#: ``(API, CLI)`` spellings of the settings that refusals name (see :class:`SettingError`)
SPELLINGS = {
    "iterations": ("iterations=", "--hessian-iterations "),
    "steps": ("iterations", "--hessian-iterations"),
    "reorthogonalize": ('reorthogonalize=False or "auto"', "--hessian-reorthogonalize auto|none"),
    "budget": ("memory_budget", "--memory-budget"),
    "exact": ('layer_method="exact"', "--layer-spectra exact"),
    "fallback": ('layer_method="auto" or "slq"', "--layer-spectra auto or slq"),
}


def basis_bytes(dims: Sequence[int], iterations: int) -> int:
    """Bytes of the float64 Lanczos bases of concurrent recurrences on operators of
    dimensions ``dims``: ``sum_d min(iterations, d) * d * 8``."""
    return int(sum(min(int(iterations), int(d)) * int(d) * 8 for d in dims))


def check_basis_fits(operators: Sequence, iterations: int) -> None:
    """Refuse Lanczos bases (:func:`basis_bytes` of the operators on each device) larger than
    :data:`BASIS_REFUSE_SHARE` of that device's free memory (:func:`available_memory`).

    Raises:
        UserError: the bases do not fit; the message says to pass reorthogonalize=False or
            fewer iterations.
    """
    dims_on = {}
    for op in operators:
        device = torch.device(getattr(op, "device", "cpu"))
        dims_on.setdefault(device, []).append(int(op.dim))
    for device, dims in dims_on.items():
        size = basis_bytes(dims, iterations)
        free = available_memory(device)
        if free is not None and size > BASIS_REFUSE_SHARE * free:
            raise UserError(
                f"full re-orthogonalisation needs {size / 2**30:.1f} GiB for the Lanczos "
                f"bases (steps x parameters x 8 bytes) but {device} has {free / 2**30:.1f} "
                "GiB free: pass reorthogonalize=False or fewer iterations"
            )


def basis_warning(dims: Sequence[int], iterations: int, budget: int | None) -> str:
    """The message logged when ``"auto"`` turns re-orthogonalisation off."""
    return (f"full re-orthogonalisation would need {format_bytes(basis_bytes(dims, iterations))} "
            f"for the Lanczos bases ({iterations} steps x {sum(int(d) for d in dims):,} "
            f"parameters x 8 bytes), more than {round(100 * BASIS_SHARE)}% of the memory "
            f"budget {format_bytes(budget)}: running without it (the original method; ghost "
            "copies of converged eigenvalues may appear); raise --memory-budget or lower "
            "--hessian-iterations to keep it")


def choose_reorthogonalize(requested, dims: Sequence[int], iterations: int,
                           budget: int | None, warn: bool = True) -> bool:
    """Resolve ``reorthogonalize``: ``True``/``False`` as given; ``"auto"``: ``True`` when
    :func:`basis_bytes` ``<= BASIS_SHARE * budget`` (or the budget is unknown), else
    ``False`` with a logged warning if ``warn`` (the recurrences then keep two vectors each)."""
    requested = SpectraSettings(reorthogonalize=requested).reorthogonalize
    if requested != "auto":
        return requested
    if budget is None or basis_bytes(dims, iterations) <= BASIS_SHARE * budget:
        return True
    if warn:
        log.warning(basis_warning(dims, iterations, budget))
    return False


@dataclass(frozen=True)
class MemoryPlan:
    """How one spectra computation uses memory (all sizes in bytes, per process).

    ``budget``: for bases and graphs (``None``: unknown, unlimited); ``reorthogonalize`` and
    ``basis_bytes`` (0 without re-orthogonalisation); ``micro_batch_size`` (examples per
    graph) and ``reuse_graph``; ``graph_bytes``: the expected peak of the graphs;
    ``cost``: the measured :class:`GraphCost`; ``examples``: local examples; ``fits``:
    whether bases + graphs fit the budget (when not, the smallest plan is used anyway).
    """

    budget: int | None
    reorthogonalize: bool
    basis_bytes: int
    micro_batch_size: int
    reuse_graph: bool
    graph_bytes: int
    cost: GraphCost
    examples: int
    fits: bool = True
    notes: tuple = field(default=())

    def summary(self) -> str:
        """One line for the log: the budget, the Lanczos bases, the micro-batches and the graphs."""
        graphs = ("kept for all products" if self.reuse_graph else "rebuilt for every product")
        return (f"memory budget {format_bytes(self.budget)}: Lanczos "
                f"{'full re-orthogonalisation' if self.reorthogonalize else 'without re-orthogonalisation'}"
                f" ({format_bytes(self.basis_bytes)} of bases); {self.examples} Hessian "
                f"examples in micro-batches of {self.micro_batch_size}, graphs {graphs} "
                f"(~{format_bytes(self.graph_bytes)})")


def plan_memory(model: nn.Module, loss_fn, data, *, dims: Sequence[int], iterations: int,
                kind: str = "hessian", bn_mode: str = "eval", reorthogonalize="auto",
                micro_batch_size: int | None = None, reuse_graph="auto", budget=None,
                sharing: int = 1, cost: GraphCost | None = None,
                warn: bool = True) -> MemoryPlan:
    """Plan one spectra computation on ``data`` (this process's part).

    Args:
        model: the network (left unchanged; its device decides the default budget).
        loss_fn: batch mean or sum of per-example losses, as in
            :func:`~layerhessians.curvature.kinds.hessian_operator`.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (this process's part).
        dims: dimensions of the operators run concurrently (full and blocks).
        iterations: Lanczos steps (0: no bases, e.g. for products alone).
        kind: the curvature kind (``"hessian"``, ``"ggn"``, ...) whose graph is measured.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).
        reorthogonalize: ``True``, ``False`` or ``"auto"`` (:func:`choose_reorthogonalize`).
        micro_batch_size: examples per graph, or ``None`` to choose.
        reuse_graph: ``True``, ``False`` or ``"auto"``.
        budget: bytes (int) or a value for :func:`memory_budget` (``None``: the default).
        sharing: processes sharing the device's memory (for the default and percentages).
        cost: a known :class:`GraphCost` (else measured on the first batch).
        warn: log the notes (re-orthogonalisation off, budget exceeded) as warnings.

    Returns:
        The :class:`MemoryPlan` (budget and sizes in bytes; ``fits=False`` when even the
        smallest plan exceeds the budget: it is tried anyway).
    """
    if iterations:
        reorthogonalize = SpectraSettings(reorthogonalize=reorthogonalize).reorthogonalize
    pairs = as_batches(data)
    device = next(model.parameters()).device
    budget = budget if isinstance(budget, int) and not isinstance(budget, bool) \
        else memory_budget(budget, device, sharing)
    notes = []
    reorth = choose_reorthogonalize(reorthogonalize, dims, iterations, budget, warn=False) \
        if iterations else False
    if iterations and reorthogonalize == "auto" and not reorth:
        notes.append(basis_warning(dims, iterations, budget))
    bases = basis_bytes(dims, iterations) if reorth else 0
    if cost is None:
        x, y = pairs[0]
        cost = measure_graph_cost(model, loss_fn, x, y, kind, bn_mode)
    sizes = [int(x.shape[0]) for x, _ in pairs]
    graph_budget = None if budget is None else max(0, budget - bases)
    splittable = not splitting_changes_operator(model, bn_mode, pairs[0][0])
    micro, reuse, peak = plan_micro_batches(sizes, cost, graph_budget, micro_batch_size,
                                            reuse_graph, splittable)
    fits = graph_budget is None or peak <= graph_budget
    if not fits:
        notes.append(f"the smallest plan needs ~{format_bytes(peak + bases)}, more than the "
                     f"memory budget {format_bytes(budget)}; trying anyway")
    if warn:
        for note in notes:
            log.warning("spectra: %s", note)
    return MemoryPlan(budget=budget, reorthogonalize=bool(reorth), basis_bytes=int(bases),
                      micro_batch_size=micro, reuse_graph=reuse, graph_bytes=peak, cost=cost,
                      examples=sum(sizes), fits=fits, notes=tuple(notes))


def check_iterations(iterations: int, dims: Sequence[int], model_name: str = "the model") -> None:
    """Refuse more Lanczos steps than the largest operator's dimension: a recurrence stops
    after ``dim`` steps (which give the exact eigenvalues), so more steps would be ignored
    for the blocks and, up to ``dim``, cost a full eigendecomposition's work.

    Raises:
        SettingError: ``iterations > max(dims)``.
    """
    largest = max(int(d) for d in dims)
    if iterations > largest:
        raise SettingError(
            f"{{iterations}}{iterations} exceeds the dimension of the Hessian ({largest:,} "
            f"parameters of {model_name}): Lanczos takes at most {largest:,} steps, which give the exact "
            f"eigenvalues; pass {{iterations}}{largest} or fewer", SPELLINGS)


def check_bases(dims: Sequence[int], iterations: int, reorthogonalize: bool, device,
                budget: int | None = None, sharing: int = 1) -> None:
    """Refuse full re-orthogonalisation whose float64 Lanczos bases (:func:`basis_bytes`)
    exceed the given memory budget or :data:`FREE_SHARE` of ``device``'s free memory (per
    process sharing it).

    Raises:
        SettingError: the bases do not fit.
    """
    if not reorthogonalize:
        return
    need = basis_bytes(dims, iterations)
    size = (f"{format_bytes(need)} for the Lanczos bases ({iterations} steps x "
            f"{sum(int(d) for d in dims):,} parameters x 8 bytes)")
    fix = "pass {reorthogonalize}, or fewer Lanczos steps ({steps})"
    if budget is not None and need > budget:
        raise SettingError(f"full re-orthogonalisation needs {size}, more than the memory "
                           f"budget {format_bytes(budget)} ({{budget}}): {fix}, or a larger "
                           "{budget}", SPELLINGS)
    device = torch.device(device)
    free = free_memory(device)
    if free is not None and need > FREE_SHARE * free / max(1, sharing):
        where = f"{device} has {format_bytes(free)} free" + (
            f" for {sharing} processes" if sharing > 1 else "")
        raise SettingError(f"full re-orthogonalisation needs {size} but {where}: {fix}",
                           SPELLINGS)


def plan_spectra(model: nn.Module, loss_fn, data, settings: SpectraSettings,
                 dims: Sequence[int], *, sharing: int = 1, warn: bool = True,
                 model_name: str | None = None) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``settings`` on ``data`` for Lanczos runs on operators of
    dimensions ``dims`` (:func:`plan_memory`).

    Raises:
        SettingError: more steps than the largest operator's dimension.
    """
    check_iterations(settings.iterations, dims, model_name or type(model).__name__)
    micro = settings.micro_batch_size
    return plan_memory(model, loss_fn, data, dims=dims, iterations=settings.iterations,
                       kind=settings.kind, bn_mode=settings.bn_mode,
                       reorthogonalize=settings.reorthogonalize,
                       micro_batch_size=None if micro == "auto" else micro,
                       reuse_graph=settings.reuse_graph, budget=settings.memory_budget,
                       sharing=sharing, warn=warn)

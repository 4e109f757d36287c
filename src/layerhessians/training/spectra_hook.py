"""The loop's one interface to the spectra engine: plan the memory of a run's spectra, and
measure them at the current weights without changing training."""

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch

from layerhessians.curvature import plan_memory
from layerhessians.curvature.memory import basis_bytes, format_bytes, free_memory
from layerhessians.errors import SettingError
from layerhessians.spectra import layer_spectra, operator_dims
from layerhessians.training.distributed import PeerError
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import FULL

#: ``(API, CLI)`` spellings of the settings that refusals name (see :class:`SettingError`)
SPELLINGS = {
    "iterations": ("iterations=", "--hessian-iterations "),
    "steps": ("iterations", "--hessian-iterations"),
    "reorthogonalize": ('reorthogonalize=False or "auto"', "--hessian-reorthogonalize auto|none"),
    "budget": ("memory_budget", "--memory-budget"),
}
#: share of the free memory the Lanczos bases may take (as the engine's own last check)
FREE_SHARE = 0.9


def check_iterations(setup, dims) -> None:
    """Refuse more Lanczos steps than the largest operator's dimension: a recurrence stops
    after ``dim`` steps (which give the exact eigenvalues), so more steps would be ignored
    for the blocks and, up to ``dim``, cost a full eigendecomposition's work.

    Raises:
        SettingError: ``iterations > max(dims)``.
    """
    largest, steps = max(dims), setup.config.hessian.iterations
    if steps > largest:
        raise SettingError(
            f"{{iterations}}{steps} exceeds the dimension of the Hessian ({largest:,} "
            f"parameters of {setup.config.model}): Lanczos takes at most {largest:,} steps, "
            f"which give the exact eigenvalues; pass {{iterations}}{largest} or fewer",
            SPELLINGS)


def check_bases(setup, dims, reorthogonalize: bool, budget=None) -> None:
    """Refuse full re-orthogonalisation whose float64 Lanczos bases (``steps x dim x 8``
    bytes over the concurrent recurrences) exceed the given memory budget or
    ``FREE_SHARE`` of the device's free memory (per process sharing it).

    Raises:
        SettingError: the bases do not fit.
    """
    if not reorthogonalize:
        return
    hcfg, dist = setup.config.hessian, setup.dist
    need = basis_bytes(dims, hcfg.iterations)
    size = (f"{format_bytes(need)} for the Lanczos bases ({hcfg.iterations} steps x "
            f"{sum(int(d) for d in dims):,} parameters x 8 bytes)")
    fix = "pass {reorthogonalize}, or fewer Lanczos steps ({steps})"
    if budget is not None and need > budget:
        raise SettingError(f"full re-orthogonalisation needs {size}, more than the memory "
                           f"budget {format_bytes(budget)} ({{budget}}): {fix}, or a larger "
                           "{budget}", SPELLINGS)
    free = free_memory(setup.device)
    sharing = dist.local_world_size if setup.device.type != "cuda" else 1
    if free is not None and need > FREE_SHARE * free / max(1, sharing):
        where = f"{setup.device} has {format_bytes(free)} free" + (
            f" for {sharing} processes" if sharing > 1 else "")
        raise SettingError(f"full re-orthogonalisation needs {size} but {where}: {fix}",
                           SPELLINGS)


def _together(dist, check, *args) -> None:
    """Run ``check``; with several processes, all refuse if any does (no rank is left
    waiting in a collective): the refusing ranks raise their error, the others PeerError."""
    error = None
    try:
        check(*args)
    except SettingError as err:
        error = err
    if dist.active and dist.agree_min([error is None])[0] == 0 and error is None:
        raise PeerError("another process refused the spectra's settings")
    if error is not None:
        raise error


def plan_spectra(setup, warn: bool = True):
    """Decide, within ``--memory-budget``, the Hessian micro-batch size, whether the graphs
    are kept, and ``reorthogonalize="auto"`` (see :func:`~layerhessians.curvature.plan_memory`);
    all ranks agree on the smallest choice. Sets ``setup.plan`` and records the resolved
    ``reorthogonalize`` in ``setup.config``; returns ``setup``.

    Runs before the first epoch, so that settings the spectra cannot honour are refused
    before any training (:func:`check_iterations`, :func:`check_bases`).

    Raises:
        SettingError: too many Lanczos steps, or bases that do not fit (message in the
            API's and the CLI's spelling).
    """
    config, dist = setup.config, setup.dist
    hcfg = config.hessian
    dims = operator_dims(setup.model, hcfg.layers)
    check_iterations(setup, list(dims.values()))
    sharing = dist.local_world_size if setup.device.type != "cuda" else 1
    plan = plan_memory(setup.model, setup.loss_fn, setup.hessian_batch, dims=list(dims.values()),
                       iterations=hcfg.iterations, kind=hcfg.kind, bn_mode=hcfg.bn_mode,
                       reorthogonalize=hcfg.reorthogonalize,
                       micro_batch_size=config.hessian_batch_size, reuse_graph="auto",
                       budget=config.memory_budget, sharing=sharing, warn=warn)
    if dist.active:
        micro, reuse, reorth = dist.agree_min([plan.micro_batch_size, plan.reuse_graph,
                                               plan.reorthogonalize])
        plan = replace(plan, micro_batch_size=micro, reuse_graph=bool(reuse),
                       reorthogonalize=bool(reorth))
    given_budget = plan.budget if config.memory_budget is not None else None
    _together(dist, check_bases, setup, list(dims.values()), plan.reorthogonalize, given_budget)
    setup.plan = plan
    setup.config = replace(config, hessian=replace(hcfg, reorthogonalize=plan.reorthogonalize))
    return setup


def compute_spectra(setup, epoch: int, disable_progress=None) -> "OrderedDict":
    """``{"full": SpectralMeasure, layer: ...}`` at the current weights, on the Hessian
    subset, with the run's engine settings, seeded from ``(seed, epoch)``. Buffers
    (batch-norm running statistics) and the train/eval mode are left as they were. Uses
    ``setup.plan`` (micro-batches, graph reuse) and ``setup.reduction`` (sharded set)."""
    hcfg, model, plan = setup.config.hessian, setup.model, setup.plan
    # free memory may have shrunk since the plan: refuse in the settings' own spelling
    _together(setup.dist, check_bases, setup, list(operator_dims(model, hcfg.layers).values()),
              hcfg.reorthogonalize is True)
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        spectra = layer_spectra(
            model, setup.loss_fn, setup.hessian_batch, iterations=hcfg.iterations,
            vectors=hcfg.vectors, seed=derive_seed(setup.config.seed, epoch, "spectra"),
            kind=hcfg.kind, bn_mode=hcfg.bn_mode, layers=hcfg.layers,
            distribution=hcfg.distribution, reorthogonalize=hcfg.reorthogonalize,
            progress=disable_progress is not True and setup.dist.is_main,
            reduction=setup.reduction,
            micro_batch_size=None if plan is None else plan.micro_batch_size,
            reuse_graph=True if plan is None else plan.reuse_graph,
            memory_budget=setup.config.memory_budget)
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])
        model.train(was_training)
    return spectra


def top_eigenvalue(spectra) -> float:
    """The full Hessian's largest Ritz value (NaN without spectra)."""
    if not spectra or FULL not in spectra:
        return float("nan")
    measure = spectra[FULL]
    return float(np.max(np.asarray(measure.nodes)[np.asarray(measure.weights) > 0]))

"""The loop's one interface to the spectra engine: plan the memory of a run's spectra and
how each layer block is computed (exact or SLQ, certified once before epoch 1), and measure
them at the current weights without changing training."""

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from layerhessians.curvature import plan_memory
from layerhessians.curvature.memory import basis_bytes, format_bytes, free_memory
from layerhessians.errors import SettingError
from layerhessians.spectra import layer_spectra, operator_dims
from layerhessians.spectra.exact_layers import exact_blocks, relative_w1
from layerhessians.training.distributed import PeerError
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import FULL

#: ``(API, CLI)`` spellings of the settings that refusals name (see :class:`SettingError`)
SPELLINGS = {
    "iterations": ("iterations=", "--hessian-iterations "),
    "steps": ("iterations", "--hessian-iterations"),
    "reorthogonalize": ('reorthogonalize=False or "auto"', "--hessian-reorthogonalize auto|none"),
    "budget": ("memory_budget", "--memory-budget"),
    "exact": ('layer_method="exact"', "--layer-spectra exact"),
    "fallback": ('layer_method="auto" or "slq"', "--layer-spectra auto or slq"),
}
#: columns of ``RUN/slq_fidelity.csv`` (``--validate-layer-spectra``): SLQ against the exact
#: spectrum per epoch and exact block (W1 relative to the exact spectrum's span)
FIDELITY_COLUMNS = ["epoch", "block", "dim", "w1_relative", "exact_top", "slq_top",
                    "exact_trace", "slq_trace"]
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


@contextmanager
def _unchanged(model):
    """Leave ``model``'s buffers (batch-norm running statistics) and mode as they were."""
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if not torch.equal(buffer, buffers[name]):
                    buffer.copy_(buffers[name])
        model.train(was_training)


def plan_layer_methods(setup) -> "OrderedDict[str, str]":
    """Decide how each layer block's spectrum is computed (``--layer-spectra``): certify
    the Gram route once on the Hessian subset (``H = G`` probe, factor memory; the
    architecture decides, not the weights) and keep the certificates in
    ``setup.certificates`` for every epoch. Sets ``setup.layer_methods`` ``{block: "exact" |
    "slq"}`` and ``setup.fallbacks`` ``{block: reason}``; returns the methods.

    Raises:
        SettingError: ``layer_method="exact"`` with a block the Gram route cannot treat
            (not certified, factors over the memory budget, a distributed sharded set).
    """
    config = setup.config
    hcfg = config.hessian
    blocks = setup.blocks if hcfg.layers else OrderedDict()
    setup.certificates, setup.fallbacks = {}, {}
    if not blocks or hcfg.layer_method == "slq":
        setup.layer_methods = OrderedDict((name, "slq") for name in blocks)
        return setup.layer_methods
    if setup.reduction is not None:
        reasons = {name: "the Gram route runs on one process (sharded Hessian set)"
                   for name in blocks}
        measures = {}
    else:
        with _unchanged(setup.model):
            measures, reasons, setup.certificates = exact_blocks(
                setup.model, setup.loss_fn, [setup.hessian_batch], blocks, hcfg.kind,
                hcfg.bn_mode, None, config.hessian_batch_size, config.memory_budget,
                derive_seed(config.seed, 0, "certify"))
    if hcfg.layer_method == "exact" and reasons:
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        raise SettingError(f"{{exact}} cannot treat {len(reasons)} layer block(s) of "
                           f"{config.model} ({detail}): pass {{fallback}}", SPELLINGS)
    setup.fallbacks = dict(reasons)
    setup.layer_methods = OrderedDict(
        (name, "exact" if name in measures else "slq") for name in blocks)
    return setup.layer_methods


def slq_dims(setup) -> list:
    """The sizes of the operators Lanczos runs on: the full Hessian and the SLQ blocks."""
    dims = operator_dims(setup.model, setup.config.hessian.layers)
    methods = getattr(setup, "layer_methods", None) or {}
    return [dim for name, dim in dims.items() if methods.get(name, "slq") == "slq"]


def plan_spectra(setup, warn: bool = True):
    """Decide, within ``--memory-budget``, the Hessian micro-batch size, whether the graphs
    are kept, and ``reorthogonalize="auto"`` (see :func:`~layerhessians.curvature.plan_memory`);
    all ranks agree on the smallest choice. Sets ``setup.plan`` and records the resolved
    ``reorthogonalize`` in ``setup.config``; returns ``setup``.

    Runs before the first epoch, so that settings the spectra cannot honour are refused
    before any training (:func:`plan_layer_methods`, :func:`check_iterations`,
    :func:`check_bases`); only the SLQ operators need Lanczos bases.

    Raises:
        SettingError: too many Lanczos steps, bases that do not fit, or ``--layer-spectra
            exact`` where the Gram route is not certified (message in the API's and the
            CLI's spelling).
    """
    config, dist = setup.config, setup.dist
    hcfg = config.hessian
    _together(dist, plan_layer_methods, setup)
    dims = slq_dims(setup)
    check_iterations(setup, dims)
    sharing = dist.local_world_size if setup.device.type != "cuda" else 1
    plan = plan_memory(setup.model, setup.loss_fn, setup.hessian_batch, dims=dims,
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
    _together(dist, check_bases, setup, dims, plan.reorthogonalize, given_budget)
    setup.plan = plan
    setup.config = replace(config, hessian=replace(hcfg, reorthogonalize=plan.reorthogonalize))
    return setup


def compute_spectra(setup, epoch: int, disable_progress=None) -> "OrderedDict":
    """``{"full": SpectralMeasure, layer: ...}`` at the current weights, on the Hessian
    subset, with the run's engine settings, seeded from ``(seed, epoch)``. Buffers
    (batch-norm running statistics) and the train/eval mode are left as they were. Uses
    ``setup.plan`` (micro-batches, graph reuse), ``setup.reduction`` (sharded set) and
    ``setup.certificates`` (:func:`plan_layer_methods`). The result is a
    :class:`~layerhessians.spectra.layers.LayerSpectra` (``.methods``, ``.fallbacks``)."""
    hcfg, model, plan = setup.config.hessian, setup.model, setup.plan
    # free memory may have shrunk since the plan: refuse in the settings' own spelling
    _together(setup.dist, check_bases, setup, slq_dims(setup), hcfg.reorthogonalize is True)
    with _unchanged(model):
        return layer_spectra(
            model, setup.loss_fn, setup.hessian_batch, iterations=hcfg.iterations,
            vectors=hcfg.vectors, seed=derive_seed(setup.config.seed, epoch, "spectra"),
            kind=hcfg.kind, bn_mode=hcfg.bn_mode, layers=hcfg.layers,
            distribution=hcfg.distribution, reorthogonalize=hcfg.reorthogonalize,
            progress=disable_progress is not True and setup.dist.is_main,
            reduction=setup.reduction,
            micro_batch_size=None if plan is None else plan.micro_batch_size,
            reuse_graph=True if plan is None else plan.reuse_graph,
            memory_budget=setup.config.memory_budget, layer_method=hcfg.layer_method,
            certificates=getattr(setup, "certificates", None) or None)


def slq_fidelity_rows(setup, epoch: int, spectra) -> pd.DataFrame:
    """``--validate-layer-spectra``: SLQ (the run's Lanczos settings and seed) on the blocks
    of ``spectra`` that are exact, and its error against them, as :data:`FIDELITY_COLUMNS`
    rows (see :func:`~layerhessians.spectra.exact_layers.slq_fidelity`); empty without
    exact blocks."""
    exact = [name for name, method in getattr(spectra, "methods", {}).items()
             if method == "exact"]
    if not exact:
        return pd.DataFrame(columns=FIDELITY_COLUMNS)
    hcfg, plan = setup.config.hessian, setup.plan
    with _unchanged(setup.model):
        slq = layer_spectra(
            setup.model, setup.loss_fn, setup.hessian_batch, iterations=hcfg.iterations,
            vectors=hcfg.vectors, seed=derive_seed(setup.config.seed, epoch, "spectra"),
            kind=hcfg.kind, bn_mode=hcfg.bn_mode,
            layers=OrderedDict((name, setup.blocks[name]) for name in exact),
            distribution=hcfg.distribution, reorthogonalize=hcfg.reorthogonalize,
            micro_batch_size=None if plan is None else plan.micro_batch_size,
            reuse_graph=True if plan is None else plan.reuse_graph,
            memory_budget=setup.config.memory_budget, layer_method="slq")
    rows = [{"epoch": epoch, "block": name, "dim": spectra[name].dim,
             "w1_relative": relative_w1(slq[name], spectra[name]),
             "exact_top": spectra[name].support[1], "slq_top": slq[name].support[1],
             "exact_trace": spectra[name].trace(), "slq_trace": slq[name].trace()}
            for name in exact]
    return pd.DataFrame(rows, columns=FIDELITY_COLUMNS)


def layer_metrics(spectra) -> dict:
    """``{"top_eigenvalue/BLOCK": ..., "trace/BLOCK": ...}`` of the exact layer blocks (the
    largest eigenvalue and the trace of the block, exact); empty without exact blocks."""
    row = {}
    for name, measure in (spectra or {}).items():
        if name != FULL and getattr(measure, "method", None) == "exact":
            row[f"top_eigenvalue/{name}"] = measure.support[1]
            row[f"trace/{name}"] = measure.trace()
    return row


def top_eigenvalue(spectra) -> float:
    """The full Hessian's largest Ritz value (NaN without spectra)."""
    if not spectra or FULL not in spectra:
        return float("nan")
    measure = spectra[FULL]
    return float(np.max(np.asarray(measure.nodes)[np.asarray(measure.weights) > 0]))

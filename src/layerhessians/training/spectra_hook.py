"""The loop's one interface to the spectra engine: plan the memory of a run's spectra and
how each layer block is computed (exact or SLQ, certified once before epoch 1), and measure
them at the current weights without changing training.

The run's :class:`~layerhessians.settings.SpectraSettings` come from its ``TrainConfig``
(``setup.settings``); the plans are frozen results kept beside them in the
:class:`~layerhessians.training.setup.Setup` (:func:`plan_spectra` returns a new one),
never written back into the settings.
"""

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from layerhessians.errors import SettingError
from layerhessians.spectra import measure_layer_spectra, operator_dims
from layerhessians.spectra.exact_layers import exact_blocks
from layerhessians.spectra.fidelity import FIDELITY_COLUMNS as BLOCK_COLUMNS
from layerhessians.spectra.fidelity import fidelity_rows
from layerhessians.spectra.plan import SPELLINGS, check_bases
from layerhessians.spectra.plan import plan_spectra as plan_memory_of
from layerhessians.training.distributed import PeerError
from layerhessians.training.seeding import derive_seed
from layerhessians.vocabulary import FULL

#: columns of ``RUN/slq_fidelity.csv`` (``--validate-layer-spectra``): SLQ against the exact
#: spectrum per epoch and exact block (W1 relative to the exact spectrum's span)
FIDELITY_COLUMNS = ["epoch", *BLOCK_COLUMNS]


@dataclass(frozen=True)
class LayerPlan:
    """How each layer block's spectrum is computed, decided once before epoch 1.

    ``methods`` ``{block: "exact" | "slq"}``; ``fallbacks`` ``{block: reason}`` of the
    blocks left to SLQ; ``certificates`` ``{block: Certificate}`` of the probed blocks.
    """

    methods: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)
    certificates: dict = field(default_factory=dict)


def _sharing(setup) -> int:
    """Processes sharing the device's memory (CPU ranks of one host share it)."""
    return setup.dist.local_world_size if setup.device.type != "cuda" else 1


def _together(dist, check, *args) -> None:
    """Run ``check`` and return its result; with several processes, all refuse if any does
    (no rank is left waiting in a collective): the refusing ranks raise their error, the
    others PeerError."""
    error, result = None, None
    try:
        result = check(*args)
    except SettingError as err:
        error = err
    if dist.active and dist.agree_min([error is None])[0] == 0 and error is None:
        raise PeerError("another process refused the spectra's settings")
    if error is not None:
        raise error
    return result


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


def plan_layer_methods(setup) -> LayerPlan:
    """Decide how each layer block's spectrum is computed (``--layer-spectra``): certify
    the Gram route once on the Hessian subset (``H = G`` probe, factor memory; the
    architecture decides, not the weights); the certificates serve every epoch.

    Returns:
        The :class:`LayerPlan` (``setup`` is left as it is).

    Raises:
        SettingError: ``layer_method="exact"`` with a block the Gram route cannot treat
            (not certified, factors over the memory budget, a distributed sharded set).
    """
    config, settings = setup.config, setup.settings
    blocks = setup.blocks if config.hessian.layers else OrderedDict()
    if not blocks or settings.layer_method == "slq":
        return LayerPlan(methods=OrderedDict((name, "slq") for name in blocks))
    certificates = {}
    if setup.reduction is not None:
        reasons = {name: "the Gram route runs on one process (sharded Hessian set)"
                   for name in blocks}
        measures = {}
    else:
        micro = settings.micro_batch_size
        with _unchanged(setup.model):
            measures, reasons, certificates = exact_blocks(
                setup.model, setup.loss_fn, [setup.hessian_batch], blocks,
                kind=settings.kind, bn_mode=settings.bn_mode,
                micro_batch_size=None if micro == "auto" else micro,
                memory_budget=settings.memory_budget,
                seed=derive_seed(config.seed, 0, "certify"))
    if settings.layer_method == "exact" and reasons:
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        raise SettingError(f"{{exact}} cannot treat {len(reasons)} layer block(s) of "
                           f"{config.model} ({detail}): pass {{fallback}}", SPELLINGS)
    return LayerPlan(methods=OrderedDict((name, "exact" if name in measures else "slq")
                                         for name in blocks),
                     fallbacks=dict(reasons), certificates=certificates)


def slq_dims(setup, layers: LayerPlan | None = None) -> list:
    """The sizes of the operators Lanczos runs on: the full Hessian and the SLQ blocks."""
    dims = operator_dims(setup.model, setup.config.hessian.layers)
    layers = layers or setup.layers or LayerPlan()
    return [dim for name, dim in dims.items() if layers.methods.get(name, "slq") == "slq"]


def _bases_fit(setup, dims, reorthogonalize: bool, budget=None) -> None:
    check_bases(dims, setup.settings.iterations, reorthogonalize, setup.device, budget,
                _sharing(setup))


def plan_spectra(setup, warn: bool = True):
    """Plan the run's spectra before the first epoch: how each layer block is computed
    (:func:`plan_layer_methods`) and, within ``--memory-budget``, the Hessian micro-batch
    size, whether the graphs are kept, and ``reorthogonalize="auto"``
    (:func:`~layerhessians.spectra.plan.plan_spectra`); all ranks agree on the smallest
    choice. Settings the spectra cannot honour are refused before any training.

    Returns:
        A new :class:`~layerhessians.training.setup.Setup` with ``plan`` (the
        :class:`~layerhessians.spectra.plan.MemoryPlan`) and ``layers`` (the
        :class:`LayerPlan`); the settings are unchanged.

    Raises:
        SettingError: too many Lanczos steps, bases that do not fit, or ``--layer-spectra
            exact`` where the Gram route is not certified (message in the API's and the
            CLI's spelling).
    """
    config, dist, settings = setup.config, setup.dist, setup.settings
    layers = _together(dist, plan_layer_methods, setup)
    dims = slq_dims(setup, layers)
    plan = plan_memory_of(setup.model, setup.loss_fn, setup.hessian_batch, settings, dims,
                          sharing=_sharing(setup), warn=warn, model_name=config.model)
    if dist.active:
        micro, reuse, reorth = dist.agree_min([plan.micro_batch_size, plan.reuse_graph,
                                               plan.reorthogonalize])
        plan = replace(plan, micro_batch_size=micro, reuse_graph=bool(reuse),
                       reorthogonalize=bool(reorth))
    given_budget = plan.budget if settings.memory_budget is not None else None
    _together(dist, _bases_fit, setup, dims, plan.reorthogonalize, given_budget)
    return replace(setup, plan=plan, layers=layers)


def _epoch_settings(setup, epoch: int):
    """The run's settings with epoch ``epoch``'s seed; without a memory plan, the batches
    as given and the graphs kept (the engine's defaults)."""
    settings = setup.settings.with_seed(derive_seed(setup.config.seed, epoch, "spectra"))
    if setup.plan is None:
        settings = replace(settings, micro_batch_size=None, reuse_graph=True)
    return settings


def compute_spectra(setup, epoch: int, disable_progress=None) -> "OrderedDict":
    """``{"full": SpectralMeasure, layer: ...}`` at the current weights, on the Hessian
    subset, with the run's settings, seeded from ``(seed, epoch)``. Buffers (batch-norm
    running statistics) and the train/eval mode are left as they were. Uses ``setup.plan``
    (micro-batches, graph reuse, re-orthogonalisation), ``setup.reduction`` (sharded set)
    and ``setup.layers.certificates`` (:func:`plan_layer_methods`). The result is a
    :class:`~layerhessians.spectra.layers.LayerSpectra` (``.methods``, ``.fallbacks``)."""
    plan = setup.plan
    reorthogonalize = setup.settings.reorthogonalize if plan is None else plan.reorthogonalize
    # free memory may have shrunk since the plan: refuse in the settings' own spelling
    _together(setup.dist, _bases_fit, setup, slq_dims(setup), reorthogonalize is True)
    certificates = setup.layers.certificates if setup.layers is not None else None
    with _unchanged(setup.model):
        return measure_layer_spectra(
            setup.model, setup.loss_fn, setup.hessian_batch, _epoch_settings(setup, epoch),
            layers=setup.config.hessian.layers,
            progress=disable_progress is not True and setup.dist.is_main,
            reduction=setup.reduction, certificates=certificates or None, plan=plan)


def slq_fidelity_rows(setup, epoch: int, spectra) -> pd.DataFrame:
    """``--validate-layer-spectra``: SLQ (the run's Lanczos settings and seed) on the blocks
    of ``spectra`` that are exact, and its error against them, as :data:`FIDELITY_COLUMNS`
    rows (:func:`~layerhessians.spectra.fidelity.fidelity_rows`); empty without exact
    blocks."""
    exact = OrderedDict((name, (setup.blocks[name], spectra[name]))
                        for name, method in getattr(spectra, "methods", {}).items()
                        if method == "exact")
    with _unchanged(setup.model):
        rows = fidelity_rows(setup.model, setup.loss_fn, setup.hessian_batch, exact,
                             _epoch_settings(setup, epoch), plan=setup.plan)
    return pd.DataFrame([{"epoch": epoch, **row} for row in rows], columns=FIDELITY_COLUMNS)


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

"""The full spectrum and every layer block's spectrum of a model, in one shared computation."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.batches import BatchLoss, Reduction, as_batches
from layerhessians.curvature.blocks import FULL, check_block_name, layer_blocks
from layerhessians.curvature.kinds import curvature_graph, kind_class
from layerhessians.curvature.memory import memory_budget as budget_bytes
from layerhessians.curvature.memory import split_batches
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError
from layerhessians.settings import SpectraSettings
from layerhessians.spectra.exact_layers import exact_blocks
from layerhessians.spectra.plan import MemoryPlan, choose_reorthogonalize, plan_memory
from layerhessians.spectra.slq import run_slq
from layerhessians.vocabulary import (
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
    LAYER_METHODS,
)

__all__ = ["LAYER_METHODS", "LayerSpectra", "layer_operators", "layer_spectra",
           "measure_layer_spectra", "operator_dims"]
log = logging.getLogger("layerhessians.spectra")


class LayerSpectra(OrderedDict):
    """``{"full": SpectralMeasure, layer name: SpectralMeasure, ...}`` plus how each was
    computed.

    Attributes:
        methods: ``{block: "slq" | "exact"}`` (also each measure's ``.method``).
        fallbacks: ``{block: reason}`` for the blocks ``layer_method="auto"`` left to SLQ.
        certificates: ``{block: Certificate}`` of the blocks that were probed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.methods: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}
        self.certificates: dict = {}


def _layer_mapping(model: nn.Module, layers) -> "OrderedDict[str, list]":
    if layers is True:
        mapping = layer_blocks(model)
    elif layers is False or layers is None:
        return OrderedDict()
    elif isinstance(layers, Mapping):
        mapping = layers
    else:
        raise UserError("layers must be True, False or a {name: parameter(s)} mapping")
    result = OrderedDict()
    for name, params in mapping.items():
        check_block_name(str(name))
        if isinstance(params, (nn.Parameter, torch.Tensor)):
            params = [params]
        result[str(name)] = list(params)
    return result


def layer_operators(model: nn.Module, loss_fn, data, kind: str = "hessian",
                    bn_mode: str = "eval", layers=True, reuse_graph: bool = True,
                    reduction: Reduction | None = None, conv_double_backward: str = "lean",
                    loss_reduction: str = "mean") -> "OrderedDict[str, CurvatureOperator]":
    """``{"full": operator, layer name: block operator, ...}`` on ONE shared graph.

    The graph differentiates every trainable parameter (in ``model.named_parameters()``
    order); a block operator for layer ``l`` differentiates only ``l``'s parameters, so
    a Lanczos step costs one forward-free product per operator. ``layers``: ``True``
    (``layer_blocks(model)``: every Conv2d/Linear weight), ``False`` (full only) or a
    ``{name: parameter or list of parameters}`` mapping. See
    :func:`~layerhessians.curvature.kinds.hessian_operator` for the other arguments.
    """
    cls = kind_class(kind)
    params, names = resolve_params(model)
    graph = curvature_graph(model, loss_fn, data, params, kind, bn_mode, reuse_graph, reduction,
                            conv_double_backward, loss_reduction)
    index = {id(p): i for i, p in enumerate(params)}
    operators = OrderedDict()
    operators[FULL] = cls(graph, range(len(params)), names, name=FULL)
    for name, block in _layer_mapping(model, layers).items():
        block_params, block_names = resolve_params(model, block)
        operators[name] = cls(graph, [index[id(p)] for p in block_params], block_names,
                              name=name)
    return operators


def operator_dims(model: nn.Module, layers=True) -> "OrderedDict[str, int]":
    """``{"full": dim, layer name: dim, ...}``: the sizes of the operators of
    :func:`layer_operators` (without building anything)."""
    params, _ = resolve_params(model)
    dims = OrderedDict({FULL: sum(p.numel() for p in params)})
    for name, block in _layer_mapping(model, layers).items():
        block_params, _ = resolve_params(model, block)
        dims[name] = sum(p.numel() for p in block_params)
    return dims


def layer_spectra(model: nn.Module, loss_fn, data, iterations: int = DEFAULT_ITERATIONS,
                  vectors: int = DEFAULT_VECTORS,
                  seed: int = 0, distribution: str = DEFAULT_DISTRIBUTION,
                  reorthogonalize=True, kind: str = "hessian", bn_mode: str = "eval",
                  layers=True, progress: bool = False,
                  reduction: Reduction | None = None, micro_batch_size=None,
                  reuse_graph=True, memory_budget=None, layer_method: str = "auto",
                  certificates=None, loss_reduction: str = "mean",
                  check_symmetry: bool = True) -> LayerSpectra:
    """Spectra of the full Hessian and of every layer's diagonal Hessian block.

    One lockstep Lanczos run per random vector advances the full operator and all layer
    blocks together; all their products share one first-order graph (one forward pass and
    one ``create_graph`` gradient per batch for everything, built once). Start vectors are
    seeded by ``(seed, vector index, block name)``, so each block's measure equals
    ``slq(hessian_operator(model, loss_fn, data, params=[that layer's weight]), ...)``
    whatever other blocks are computed.

    Args:
        model: the network, as in :func:`hessian_operator`.
        loss_fn: batch mean or sum of per-example losses, as in :func:`hessian_operator`.
        data: an ``(inputs, targets)`` pair or an iterable of pairs.
        kind: the curvature, one of :data:`~layerhessians.curvature.kinds.KINDS`.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).
        iterations: Lanczos steps per vector (default 128, the paper's run).
        vectors: random start vectors per block (default 1).
        seed: base seed (default 0).
        distribution: ``"gaussian"`` (default, the paper's) or ``"rademacher"``.
        reorthogonalize: full float64 re-orthogonalisation (default); its memory is
            ``iterations * 8`` bytes per parameter, twice the model size in all
            (full + blocks); ``False`` keeps ``O(dim)``; ``"auto"``: full when the bases fit
            half the memory budget, else none with a logged warning
            (:func:`~layerhessians.spectra.plan.choose_reorthogonalize`).
        layers: ``True`` (every Conv2d/Linear weight), ``False`` (full spectrum only) or a
            ``{name: parameter(s)}`` mapping.
        progress: progress over the Lanczos steps (a bar on a terminal, else log lines).
        reduction: the distributed reduction hook (identity by default).
        micro_batch_size: cut the data into micro-batches of at most this many examples
            (``None``: as given; ``"auto"``: the largest whose graphs fit the budget); the
            products are accumulated, so the spectra are unchanged up to rounding.
        reuse_graph: keep the graphs for all products (default), rebuild them for every
            product (``False``: one micro-batch's graph alive at a time), or ``"auto"``.
        memory_budget: bytes, ``"8GB"``, ``"40%"`` (of the free memory) or ``None`` (the
            default of :mod:`~layerhessians.curvature.memory`), for the ``"auto"`` choices
            and the Gram route's factors.
        layer_method: how the layer blocks are computed (the full spectrum is always SLQ):
            ``"auto"`` (the default: exact where certified and the factors fit the memory
            budget, SLQ elsewhere, the fallbacks logged once per call), ``"exact"`` (the
            Gram route of :mod:`~layerhessians.spectra.exact_layers`: every block must be
            certified, else :class:`UserError`) or ``"slq"`` (as the full spectrum).
        certificates: ``{block: Certificate}`` from an earlier call's ``.certificates`` (the
            probe is skipped for those blocks: the architecture, not the weights, decides;
            the factor check still runs); ``None`` probes every block.
        loss_reduction: ``"mean"`` (default) or ``"sum"``, as in :func:`hessian_operator`
            (the exact route takes the mean only: with ``"sum"``, ``auto`` uses SLQ).
        check_symmetry: probe every SLQ operator's symmetry first, all blocks in one pass
            (two products each), and refuse a non-symmetric one (default).

    Returns:
        :class:`LayerSpectra` ``{"full": SpectralMeasure, layer name: SpectralMeasure, ...}``
        in layer order, with ``.methods``, ``.fallbacks`` and ``.certificates``. The model's
        parameters, buffers and modes are left unchanged.

    Raises:
        SettingError: a bad setting (checked once, by
            :class:`~layerhessians.settings.SpectraSettings`).
        UserError: ``layer_method="exact"`` with a block that is not certified or does not
            fit the memory budget.
    """
    settings = SpectraSettings(
        iterations=iterations, vectors=vectors, seed=seed, distribution=distribution,
        reorthogonalize=reorthogonalize, kind=kind, bn_mode=bn_mode, layer_method=layer_method,
        micro_batch_size=micro_batch_size, reuse_graph=reuse_graph, memory_budget=memory_budget,
        loss_reduction=loss_reduction, check_symmetry=check_symmetry)
    return measure_layer_spectra(model, loss_fn, data, settings, layers=layers,
                                 progress=progress, reduction=reduction,
                                 certificates=certificates)


def measure_layer_spectra(model: nn.Module, loss_fn, data, settings: SpectraSettings, *,
                          layers=True, progress: bool = False,
                          reduction: Reduction | None = None, certificates=None,
                          plan: MemoryPlan | None = None) -> LayerSpectra:
    """:func:`layer_spectra` with its settings as one object (validated when it was made):
    ``model``, ``loss_fn``, ``data``, ``layers``, ``progress``, ``reduction`` and
    ``certificates`` as there; ``settings`` a :class:`~layerhessians.settings.SpectraSettings`;
    ``plan`` a :class:`~layerhessians.spectra.plan.MemoryPlan` made for these settings (its
    micro-batch size, graph reuse and re-orthogonalisation are used) or ``None`` (planned here
    where a setting is ``"auto"``).

    Returns:
        :class:`LayerSpectra`, as :func:`layer_spectra`.

    Raises:
        UserError: ``layer_method="exact"`` where the exact route cannot run.
    """
    method = settings.layer_method
    exact, fallbacks, probed = OrderedDict(), {}, {}
    mapping = _layer_mapping(model, layers)
    if method == "exact" and reduction is not None:
        raise UserError("layer_method='exact' runs on one process: use 'auto' or 'slq' in a "
                        "distributed run")
    batch_loss = isinstance(loss_fn, BatchLoss)
    if method == "exact" and (settings.loss_reduction != "mean" or batch_loss):
        raise UserError("layer_method='exact' needs loss_fn(outputs, targets) with "
                        "loss_reduction='mean': use 'auto' or 'slq'")
    slq_blocks = mapping
    if method != "slq" and mapping and reduction is None and settings.loss_reduction == "mean" \
            and not batch_loss:
        data = as_batches(data)  # used twice
        micro = settings.micro_batch_size if plan is None else plan.micro_batch_size
        exact, fallbacks, probed = exact_blocks(
            model, loss_fn, data, mapping, kind=settings.kind, bn_mode=settings.bn_mode,
            micro_batch_size=micro, memory_budget=settings.memory_budget, seed=settings.seed,
            certificates=certificates, strict=method == "exact")
        if fallbacks:
            log.warning("layer spectra: SLQ instead of the exact route for %d block(s): %s",
                        len(fallbacks), "; ".join(f"{n}: {r}" for n, r in fallbacks.items()))
        slq_blocks = OrderedDict((n, p) for n, p in mapping.items() if n not in exact)
    slq_measures = _slq_route(model, loss_fn, data, settings, slq_blocks, progress, reduction,
                              plan)
    result = LayerSpectra()
    for name in [FULL, *mapping]:
        measure = exact[name] if name in exact else slq_measures[name]
        if name not in exact:
            measure.method = "slq"
        result[name] = measure
        result.methods[name] = measure.method
    result.fallbacks, result.certificates = fallbacks, probed
    return result


def _slq_route(model, loss_fn, data, settings: SpectraSettings, blocks, progress, reduction,
               plan: MemoryPlan | None):
    """The SLQ route of :func:`measure_layer_spectra` (full spectrum plus ``blocks``)."""
    micro, reuse, reorthogonalize = \
        settings.micro_batch_size, settings.reuse_graph, settings.reorthogonalize
    if plan is not None:
        micro, reuse, reorthogonalize = \
            plan.micro_batch_size, plan.reuse_graph, plan.reorthogonalize
    if isinstance(loss_fn, BatchLoss) and (micro is not None or "auto" in (micro, reuse)):
        raise UserError("with a BatchLoss the engine cannot cut or measure the batches: pass "
                        "micro_batch_size=None and reuse_graph=True or False (make the "
                        "batches smaller yourself)")
    dims = list(operator_dims(model, blocks).values())
    if "auto" in (micro, reuse):
        data = as_batches(data)
        if micro is None:  # keep the batches as given
            micro = max(int(x.shape[0]) for x, _ in data)
        plan = plan_memory(model, loss_fn, data, dims=dims, iterations=settings.iterations,
                           kind=settings.kind, bn_mode=settings.bn_mode,
                           reorthogonalize=reorthogonalize,
                           micro_batch_size=None if micro == "auto" else micro,
                           reuse_graph=reuse, budget=settings.memory_budget)
        micro, reuse, reorthogonalize = \
            plan.micro_batch_size, plan.reuse_graph, plan.reorthogonalize
    elif isinstance(reorthogonalize, str):
        device = next(model.parameters()).device
        reorthogonalize = choose_reorthogonalize(reorthogonalize, dims, settings.iterations,
                                                 budget_bytes(settings.memory_budget, device))
    if micro is not None:
        data = split_batches(as_batches(data), micro, model, settings.bn_mode)
    operators = layer_operators(model, loss_fn, data, settings.kind, settings.bn_mode, blocks,
                                reuse, reduction, loss_reduction=settings.loss_reduction)
    try:
        measures = run_slq(list(operators.values()), list(operators), settings,
                           reorthogonalize, progress)
    finally:
        operators[FULL].release()
    return OrderedDict(zip(operators, measures))

"""The full spectrum and every layer block's spectrum of a model, in one shared computation."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.batches import BatchLoss, Reduction, as_batches
from layerhessians.curvature.blocks import FULL, layer_blocks
from layerhessians.curvature.kinds import curvature_graph, kind_class
from layerhessians.curvature.memory import (
    choose_reorthogonalize,
    plan_memory,
    split_batches,
)
from layerhessians.curvature.memory import (
    memory_budget as budget_bytes,
)
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError, check_choice
from layerhessians.spectra.exact_layers import exact_blocks
from layerhessians.spectra.slq import slq_many
from layerhessians.vocabulary import (
    DEFAULT_DISTRIBUTION,
    DEFAULT_ITERATIONS,
    DEFAULT_VECTORS,
)

__all__ = ["LAYER_METHODS", "LayerSpectra", "layer_operators", "layer_spectra",
           "operator_dims"]

LAYER_METHODS = ("auto", "exact", "slq")
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
        if name == FULL:
            raise UserError(f"{FULL!r} is reserved for the full Hessian: rename that block")
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
            (:func:`~layerhessians.curvature.memory.choose_reorthogonalize`).
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
        UserError: bad arguments, or ``layer_method="exact"`` with a block that is not
            certified or does not fit the memory budget.
    """
    check_choice(layer_method, LAYER_METHODS, "layer_method")
    exact, fallbacks, probed = OrderedDict(), {}, {}
    mapping = _layer_mapping(model, layers)
    if layer_method == "exact" and reduction is not None:
        raise UserError("layer_method='exact' runs on one process: use 'auto' or 'slq' in a "
                        "distributed run")
    if layer_method == "exact" and (loss_reduction != "mean" or isinstance(loss_fn, BatchLoss)):
        raise UserError("layer_method='exact' needs loss_fn(outputs, targets) with "
                        "loss_reduction='mean': use 'auto' or 'slq'")
    if layer_method != "slq" and mapping and reduction is None and loss_reduction == "mean" \
            and not isinstance(loss_fn, BatchLoss):
        data = as_batches(data)  # used twice
        exact, fallbacks, probed = exact_blocks(
            model, loss_fn, data, mapping, kind, bn_mode, reduction, micro_batch_size,
            memory_budget, seed, certificates, strict=layer_method == "exact")
        if fallbacks:
            log.warning("layer spectra: SLQ instead of the exact route for %d block(s): %s",
                        len(fallbacks), "; ".join(f"{n}: {r}" for n, r in fallbacks.items()))
        layers = OrderedDict((n, p) for n, p in mapping.items() if n not in exact)
    slq_measures = _slq_layer_spectra(
        model, loss_fn, data, iterations, vectors, seed, distribution, reorthogonalize, kind,
        bn_mode, layers, progress, reduction, micro_batch_size, reuse_graph, memory_budget,
        loss_reduction, check_symmetry)
    result = LayerSpectra()
    for name in [FULL, *mapping]:
        measure = exact[name] if name in exact else slq_measures[name]
        if name not in exact:
            measure.method = "slq"
        result[name] = measure
        result.methods[name] = measure.method
    result.fallbacks, result.certificates = fallbacks, probed
    return result


def _slq_layer_spectra(model, loss_fn, data, iterations, vectors, seed, distribution,
                       reorthogonalize, kind, bn_mode, layers, progress, reduction,
                       micro_batch_size, reuse_graph, memory_budget, loss_reduction,
                       check_symmetry):
    """The SLQ route of :func:`layer_spectra` (full spectrum plus ``layers``)."""
    if isinstance(loss_fn, BatchLoss) and (micro_batch_size is not None or
                                           "auto" in (micro_batch_size, reuse_graph)):
        raise UserError("with a BatchLoss the engine cannot cut or measure the batches: pass "
                        "micro_batch_size=None and reuse_graph=True or False (make the "
                        "batches smaller yourself)")
    if "auto" in (micro_batch_size, reuse_graph):
        data = as_batches(data)
        if micro_batch_size is None:  # keep the batches as given
            micro_batch_size = max(int(x.shape[0]) for x, _ in data)
        plan = plan_memory(model, loss_fn, data, dims=list(operator_dims(model, layers).values()),
                           iterations=iterations, kind=kind, bn_mode=bn_mode,
                           reorthogonalize=reorthogonalize,
                           micro_batch_size=None if micro_batch_size == "auto" else micro_batch_size,
                           reuse_graph=reuse_graph, budget=memory_budget)
        reorthogonalize, micro_batch_size, reuse_graph = \
            plan.reorthogonalize, plan.micro_batch_size, plan.reuse_graph
    elif isinstance(reorthogonalize, str):
        device = next(model.parameters()).device
        reorthogonalize = choose_reorthogonalize(
            reorthogonalize, list(operator_dims(model, layers).values()), iterations,
            budget_bytes(memory_budget, device))
    if micro_batch_size is not None:
        data = split_batches(as_batches(data), micro_batch_size, model, bn_mode)
    operators = layer_operators(model, loss_fn, data, kind, bn_mode, layers, reuse_graph,
                                reduction, loss_reduction=loss_reduction)
    try:
        measures = slq_many(list(operators.values()), list(operators), iterations, vectors,
                            seed, distribution, reorthogonalize, progress, check_symmetry)
    finally:
        operators[FULL].release()
    return OrderedDict(zip(operators, measures))

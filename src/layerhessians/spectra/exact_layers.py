"""Exact layer-block spectra by the Gram route, the exact full-GGN spectrum of small
problems (SLQ's error against them: :mod:`~layerhessians.spectra.fidelity`).

A certified layer block (:mod:`~layerhessians.curvature.certify`) has ``H_WW = V V^T``
(:mod:`~layerhessians.curvature.gram`): its nonzero eigenvalues are those of the
``(N K) x (N K)`` Gram matrix ``V^T V``. The exact spectral measure puts weight ``1 / dim``
on each Gram eigenvalue and ``(dim - N K) / dim`` on zero (when ``dim > N K``; otherwise
the ``dim x dim`` block ``V V^T`` is diagonalised, weight ``1 / dim`` per eigenvalue): the
same :class:`SpectralMeasure` type as SLQ (one row), with ``method = "exact"``. Its trace
(``measure.trace()``) is the trace of the Gram matrix and its largest node the top
eigenvalue, both exact.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import scipy.linalg
import torch
from torch import nn

from layerhessians.curvature.blocks import layer_blocks
from layerhessians.curvature.certify import certify_blocks
from layerhessians.curvature.gram import LayerFactors, block_parameters, gram_factors
from layerhessians.curvature.kinds import kind_class
from layerhessians.curvature.params import resolve_params
from layerhessians.errors import UserError
from layerhessians.spectra.measure import SpectralMeasure

__all__ = [
    "exact_blocks",
    "exact_ggn_spectrum",
    "exact_layer_spectra",
    "gram_measure",
    "layer_measure",
]


def gram_measure(eigenvalues, dim: int, method: str = "exact") -> SpectralMeasure:
    """The spectral measure of a ``dim x dim`` PSD matrix from its nonzero part.

    Args:
        eigenvalues: 1-D array of ``r <= dim`` eigenvalues (e.g. of a Gram matrix; those
            not given are zero).
        dim: the matrix's size.
        method: recorded as ``measure.method``.

    Returns:
        A one-row :class:`SpectralMeasure`: nodes = the eigenvalues (ascending) with weight
        ``1 / dim`` each, then ``0`` with weight ``(dim - r) / dim`` if ``r < dim``.
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))
    dim, rank = int(dim), values.size
    if rank > dim:
        raise UserError(f"{rank} eigenvalues for a {dim} x {dim} matrix")
    weights = np.full(rank, 1.0 / dim)
    if rank < dim:
        values = np.append(values, 0.0)
        weights = np.append(weights, (dim - rank) / dim)
    return SpectralMeasure(values[None, :], weights[None, :], dim=dim, method=method)


def _eigenvalues(matrix: torch.Tensor) -> np.ndarray:
    """All eigenvalues of a symmetric matrix in float64 (its lower triangle is read).

    On the CPU by LAPACK's ``dsyevd`` through scipy (eigenvalues only: tridiagonalisation
    plus ``dsterf``, no eigenvectors), faster there than ``torch.linalg.eigvalsh``;
    elsewhere by ``torch.linalg.eigvalsh``. The step is timed (``eigen_s``) by
    ``benchmarks/bench_exact_layers.py``.
    """
    if matrix.device.type != "cpu":
        return torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu().numpy()
    array = matrix.detach().to(torch.float64, copy=True).numpy()  # overwritten below
    if not np.isfinite(array).all():
        raise UserError("the Gram matrix has non-finite entries (overflow or NaN in the "
                        "model's outputs or inputs): no exact spectrum")
    return scipy.linalg.eigh(array, lower=True, eigvals_only=True, overwrite_a=True,
                             check_finite=False, driver="evd")


def layer_measure(factors: LayerFactors) -> SpectralMeasure:
    """One block's exact measure from its factors (the smaller of ``V V^T`` and ``V^T V``)."""
    with torch.no_grad():
        if factors.dim <= factors.columns:
            return gram_measure(_eigenvalues(factors.dense_block()), factors.dim)
        return gram_measure(_eigenvalues(factors.gram()), factors.dim)


def exact_layer_spectra(model: nn.Module, loss_fn, data, layers=True, kind: str = "hessian",
                        certify: bool = True, probes: int = 1, seed: int = 0,
                        micro_batch_size: int | None = None, reduction=None
                        ) -> "tuple[OrderedDict[str, SpectralMeasure], OrderedDict]":
    """Every layer block's exact spectrum by the Gram route (no Lanczos, no random vector).

    Args:
        model: the network (eval-mode batch norm; left unchanged).
        loss_fn: batch mean of per-example losses (``nn.CrossEntropyLoss()``: closed form).
        data: an ``(inputs, targets)`` pair or an iterable of pairs.
        layers: ``True`` (every Conv2d/Linear weight) or ``{name: weight}``.
        kind: ``"hessian"`` (the Hessian block; needs the certificate) or ``"ggn"``.
        certify: run the probe of :func:`~layerhessians.curvature.certify.certify_blocks`
            (default); ``False`` trusts the caller.
        probes: random probe vectors per block (default 1).
        seed: seed of the probe vectors.
        micro_batch_size: examples per forward/backward pass for the factors.
        reduction: must be ``None`` (the Gram route is single-process).

    Returns:
        ``(measures, certificates)``: ``{name: SpectralMeasure}`` (``method = "exact"``) and
        ``{name: Certificate}`` (empty when ``certify=False``).

    Raises:
        UserError: a block that is not certified (the message names it and why), a block
            that is not a Conv2d/Linear weight, or a distributed ``reduction``.
    """
    if reduction is not None:
        raise UserError("the Gram route runs on one process: use layer_method='slq' "
                        "in a distributed run")
    blocks = block_parameters(model, layer_blocks(model) if layers is True else layers)
    factors = gram_factors(model, loss_fn, data, blocks, micro_batch_size)
    certificates = OrderedDict()
    if certify:
        certificates = certify_blocks(model, loss_fn, data, blocks, factors, probes, seed, kind)
        failed = [f"{n} ({c.reason})" for n, c in certificates.items() if not c.certified]
        if failed:
            raise UserError("the exact route is not certified for " + "; ".join(failed)
                            + ": use layer_method='slq' (or 'auto') for these blocks")
    measures = OrderedDict((name, layer_measure(f)) for name, f in factors.items())
    return measures, certificates


def exact_ggn_spectrum(model: nn.Module, loss_fn, data, micro_batch_size: int | None = None,
                       max_columns: int = 20_000) -> SpectralMeasure:
    """The exact spectrum of the full GGN (every trainable parameter) from summed Grams.

    ``G = sum_P V_P V_P^T`` over the parameters ``P``, so its nonzero eigenvalues are those
    of ``sum_P V_P^T V_P`` (N K x N K). Every trainable parameter must be the weight or
    bias of a Conv2d/Linear used once per forward pass; the examples must not interact.

    Returns:
        A one-row :class:`SpectralMeasure` (``method = "exact"``, ``dim`` = parameters).

    Raises:
        UserError: another kind of parameter, or ``N K > max_columns``.
    """
    params, names = resolve_params(model)
    trainable = {id(p) for p in params}
    weights, covered = OrderedDict(), set()
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        own = [p for p in (module.weight, module.bias) if p is not None and id(p) in trainable]
        if own:
            weights[f"{module_name}.weight" if module_name else "weight"] = module.weight
            covered.update(id(p) for p in own)
    for name, param in zip(names, params):
        if id(param) not in covered:
            raise UserError(f"parameter {name!r} is not a Conv2d/Linear weight or bias: the "
                            "exact full GGN supports only those; use slq()")
    factors = gram_factors(model, loss_fn, data, weights, micro_batch_size)
    columns = next(iter(factors.values())).columns
    if columns > max_columns:
        raise UserError(f"the Gram matrix would be {columns:,} x {columns:,} > {max_columns:,}"
                        ": use fewer examples or slq()")
    trainable = {id(p) for p in params}
    with torch.no_grad():
        gram = None
        for f in factors.values():
            parts = [f.gram()] if id(f.module.weight) in trainable else []
            if f.module.bias is not None and id(f.module.bias) in trainable:
                parts.append(f.bias_gram())
            for part in parts:
                gram = part.to(torch.float64) if gram is None else gram + part
    dim = sum(p.numel() for p in params)
    values = _eigenvalues(gram)
    if values.size > dim:  # more columns than parameters: keep the dim largest
        values = np.sort(values)[-dim:]
    return gram_measure(values, dim)


def exact_blocks(model: nn.Module, loss_fn, data, mapping, kind: str = "hessian",
                 bn_mode: str = "eval", reduction=None, micro_batch_size=None,
                 memory_budget=None, seed: int = 0, certificates=None, strict: bool = False):
    """The blocks of ``mapping`` whose exact spectra the Gram route gives, and those spectra.

    Args:
        model: the network (left unchanged).
        loss_fn: batch mean of per-example losses, as in
            :func:`~layerhessians.curvature.kinds.hessian_operator`.
        data: an ``(inputs, targets)`` pair or an iterable of pairs.
        mapping: ``{name: [parameters]}`` (layer blocks).
        kind: the requested curvature; only kinds whose class has ``exact_route``
            (``"hessian"``, ``"ggn"``) have a Gram route (any other leaves every block out).
        bn_mode: ``"eval"`` or ``"train"`` (train-mode batch norm leaves every block out).
        reduction: the distributed reduction hook; anything but ``None`` leaves every block
            out (the Gram route runs on one process).
        micro_batch_size: examples per pass for the factors (an int, or ``None``/``"auto"``:
            the batches as given).
        memory_budget: as in :func:`~layerhessians.curvature.memory.memory_budget`: blocks
            whose factors do not fit together are left out, largest first.
        seed: the probe's seed.
        certificates: earlier ``{name: Certificate}``; a certified one skips the ``H = G``
            probe (the factor check still runs).
        strict: raise instead of leaving a block out.

    Returns:
        ``(measures, fallbacks, certificates)``: ``{name: SpectralMeasure}`` of the exact
        blocks, ``{name: reason}`` of the others, ``{name: Certificate}`` of the probed ones.

    Raises:
        UserError: with ``strict``, naming every block that cannot be exact and why.
    """
    from layerhessians.curvature.gram import factor_bytes, unsupported_reason
    from layerhessians.curvature.memory import memory_budget as budget_bytes

    fallbacks, candidates = OrderedDict(), OrderedDict()
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    general = None
    if not kind_class(kind).exact_route:
        general = f"kind={kind!r} has no Gram route"
    elif reduction is not None:
        general = "the Gram route runs on one process"
    elif bn_mode == "train" and batch_norm:
        general = "train-mode batch norm couples the examples (Hessian != GGN)"
    owners = {}
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            owners.setdefault(id(module.weight), module)
    for name, params in mapping.items():
        if general is not None:
            fallbacks[name] = general
        elif len(params) != 1 or id(params[0]) not in owners:
            fallbacks[name] = "not a single Conv2d/Linear weight"
        elif unsupported_reason(owners[id(params[0])]) is not None:
            fallbacks[name] = unsupported_reason(owners[id(params[0])])
        else:
            candidates[name] = params[0]
    if candidates:
        sizes, calls = factor_bytes(model, data, candidates)
        for name, count in calls.items():
            if count != 1:
                fallbacks[name] = f"its layer runs {count} times per forward pass"
                del candidates[name], sizes[name]
        budget = budget_bytes(memory_budget, next(iter(candidates.values())).device)
        if budget is not None:
            for name in sorted(sizes, key=sizes.get, reverse=True):
                if sum(sizes[n] for n in candidates) <= budget:
                    break
                fallbacks[name] = (f"its Gram factors ({sizes[name] / 2 ** 30:.2f} GiB) do not"
                                   f" fit the memory budget ({budget / 2 ** 30:.2f} GiB)")
                del candidates[name]
    measures, probed = OrderedDict(), OrderedDict()
    if candidates:
        micro = micro_batch_size if isinstance(micro_batch_size, int) else None
        factors = gram_factors(model, loss_fn, data, candidates, micro)
        known = {n for n in candidates if certificates and n in certificates
                 and certificates[n].certified}
        for group, group_kind in ((known, "ggn"), (set(candidates) - known, kind)):
            chosen = OrderedDict((n, p) for n, p in candidates.items() if n in group)
            if chosen:
                probed.update(certify_blocks(model, loss_fn, data, chosen, factors,
                                             seed=seed, kind=group_kind, bn_mode=bn_mode))
        for name in candidates:
            if probed[name].certified:
                measures[name] = layer_measure(factors[name])
            else:
                fallbacks[name] = probed[name].reason
        del factors
    if strict and fallbacks:
        raise UserError("the exact route cannot treat " + "; ".join(
            f"{n} ({r})" for n, r in fallbacks.items())
            + ": use layer_method='auto' or 'slq'")
    ordered = OrderedDict((n, fallbacks[n]) for n in mapping if n in fallbacks)
    return measures, ordered, OrderedDict((n, probed[n]) for n in mapping if n in probed)

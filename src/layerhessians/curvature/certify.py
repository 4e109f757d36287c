"""Run-time certificate that a layer's Hessian block equals its GGN block, and that the
Gram factors of :mod:`~layerhessians.curvature.gram` give that block.

The fact. If the network's output is piecewise linear in a weight ``W`` (ReLU/LeakyReLU,
max/average pooling, eval-mode batch norm, residual additions, Linear/Conv2d, flatten,
dropout off), then ``d^2 f / dW^2 = 0`` almost everywhere and ``H_WW = J_W^T H_f J_W``
(``H_WW = G_WW + sum_n (dl/df_n) d^2 f_n / dW^2``). It fails for smooth non-linearities
(tanh, GELU, softplus) after ``W``, train-mode batch norm or layer norm after ``W``, and a
weight used twice.

The probe. Rather than trusting a list of module types, each block is tested at the current
parameters with random Gaussian vectors ``v`` (not Rademacher: a sign vector can lie in
the GGN's null space exactly, e.g. the all-ones direction of the output layer under
cross-entropy, leaving only rounding to compare): ``r_H = ||H v - G v||`` (operators of
:mod:`~layerhessians.curvature.kinds` on one shared graph) and, when factors are given,
``r_V = ||V V^T v - G v||``. The block is certified when both are at most
``tolerance * max(||H v||, ||G v||)`` with ``tolerance = PROBE_EPS_FACTOR * eps(dtype)``
(1.2e-4 in float32, 2.2e-13 in float64): the products agree to rounding where the identity
holds (measured: ~1e-16 relative in float64, ~1e-6 in float32 on LeNet, VGG11_bn and
ResNet18), whereas a real residual is of the order of the block itself (0.3 to 1 relative
on the counter-examples above). A zero block (``H v = G v = 0``) is certified.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from layerhessians.curvature.ggn import GGNOperator
from layerhessians.curvature.gram import block_parameters
from layerhessians.curvature.graph import resolve_params
from layerhessians.curvature.hessian import HessianOperator
from layerhessians.curvature.kinds import curvature_graph
from layerhessians.errors import UserError

__all__ = ["PROBE_EPS_FACTOR", "Certificate", "certify_blocks", "probe_tolerance"]

PROBE_EPS_FACTOR = 1024.0


def probe_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of the probe: ``PROBE_EPS_FACTOR * eps(dtype)``."""
    return PROBE_EPS_FACTOR * torch.finfo(dtype).eps


@dataclass
class Certificate:
    """The probe's verdict for one block.

    Attributes:
        certified: whether the Gram route gives this block's exact Hessian spectrum.
        hessian_residual: ``max_v ||H v - G v|| / max(||H v||, ||G v||)`` (NaN if not run).
        factor_residual: ``max_v ||V V^T v - G v|| / ||G v||`` (NaN if no factors).
        tolerance: the relative tolerance used.
        reason: why it is not certified (``""`` when it is).
    """

    certified: bool
    hessian_residual: float
    factor_residual: float
    tolerance: float
    reason: str = ""


def _relative(diff: torch.Tensor, scale: float) -> float:
    norm = float(torch.linalg.vector_norm(diff))
    if scale == 0.0:
        return 0.0 if norm == 0.0 else float("inf")
    return norm / scale


def certify_blocks(model: nn.Module, loss_fn, data, blocks, factors=None, probes: int = 1,
                   seed: int = 0, kind: str = "hessian", bn_mode: str = "eval",
                   tolerance: float | None = None, reduction=None
                   ) -> "OrderedDict[str, Certificate]":
    """Certify, per block, that the Gram route gives its exact ``kind`` spectrum.

    Args:
        model, loss_fn, data, bn_mode, reduction: as in
            :func:`~layerhessians.curvature.kinds.hessian_operator`.
        blocks: ``{name: weight}``.
        factors: ``{name: LayerFactors}`` from :func:`~layerhessians.curvature.gram.gram_factors`
            (optional; blocks without factors are checked for ``H = G`` only).
        probes: random Gaussian vectors per block (default 1).
        seed: seed of the probe vectors.
        kind: ``"hessian"`` (needs ``H = G`` and the factors) or ``"ggn"`` (the factors only).
        tolerance: relative tolerance (default :func:`probe_tolerance` of the model's dtype).

    Returns:
        ``OrderedDict`` ``{name: Certificate}`` in block order. Costs one shared first-order
        graph (one forward and one ``create_graph`` backward per batch) plus, per probe and
        block, one Hessian-vector and one GGN-vector product.
    """
    if kind not in ("hessian", "ggn"):
        raise UserError(f"only kind='hessian' or 'ggn' can be certified; got {kind!r}")
    factors = {} if factors is None else factors
    blocks = block_parameters(model, blocks)
    dtype = next(iter(blocks.values())).dtype
    tol = probe_tolerance(dtype) if tolerance is None else float(tolerance)
    params, names = resolve_params(model)
    graph = curvature_graph(model, loss_fn, data, params,
                            ("hessian", "ggn") if kind == "hessian" else "ggn", bn_mode,
                            reduction=reduction)
    index = {id(p): i for i, p in enumerate(params)}
    positions = {n: [index[id(p)]] for n, p in blocks.items()}
    generator = torch.Generator().manual_seed(int(seed))
    results = OrderedDict()
    try:
        ggns = [GGNOperator(graph, positions[n], [names[i] for i in positions[n]], name=n)
                for n in blocks]
        hessians = [HessianOperator(graph, positions[n], [names[i] for i in positions[n]],
                                    name=n) for n in blocks] if kind == "hessian" else []
        worst_h = dict.fromkeys(blocks, 0.0 if kind == "hessian" else float("nan"))
        worst_v = dict.fromkeys(blocks, float("nan"))
        for _ in range(int(probes)):
            vectors = [torch.randn(op.dim, generator=generator, dtype=torch.float64).to(dtype)
                       for op in ggns]
            products = graph.products(ggns + hessians, vectors + vectors[:len(hessians)])
            gv_all, hv_all = products[:len(ggns)], products[len(ggns):]
            for j, name in enumerate(blocks):
                gv = gv_all[j]
                g_norm = float(torch.linalg.vector_norm(gv))
                if hessians:
                    hv = hv_all[j]
                    scale = max(float(torch.linalg.vector_norm(hv)), g_norm)
                    residual = _relative(hv - gv, scale)  # NaN must not be lost in max()
                    worst_h[name] = residual if residual != residual \
                        else max(worst_h[name], residual)
                if name in factors:
                    with torch.no_grad():
                        vv = factors[name].matvec(vectors[j].to(gv))
                    residual = _relative(vv - gv, g_norm)
                    worst_v[name] = residual if worst_v[name] != worst_v[name] \
                        else max(worst_v[name], residual)
    finally:
        graph.release()
    for name in blocks:
        reasons = []
        if kind == "hessian" and not worst_h[name] <= tol:
            reasons.append(f"Hessian block != GGN block (relative residual "
                           f"{worst_h[name]:.2g} > {tol:.2g})")
        if name not in factors:
            reasons.append("no Gram factors")
        elif not worst_v[name] <= tol:
            reasons.append(f"Gram factors != GGN block (relative residual "
                           f"{worst_v[name]:.2g} > {tol:.2g}; examples interact?)")
        results[name] = Certificate(not reasons, worst_h[name], worst_v[name], tol,
                                    "; ".join(reasons))
    return results

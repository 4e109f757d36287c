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
cross-entropy, leaving only rounding to compare). For ``kind="hessian"`` with factors,
directly: ``r_H = ||H_bb v - V V^T v||`` (the Hessian block's product by autograd, on one
shared graph of :mod:`~layerhessians.curvature.kinds`, against the Gram route's block, which
is the GGN block ``G_bb`` when the factors are right); only a block that fails also gets
``G v`` by autograd, to tell ``H != G`` from wrong factors (``r_V = ||V V^T v - G v||``).
For ``kind="ggn"`` (or with reused certificates), the factor check ``r_V`` for all blocks
at once from ONE GGN product ``G v`` (``v`` the blocks' concatenation; the factors give
``(V V^T v)_b = V_b sum_c V_c^T v_c``, cross terms included). Blocks without factors get
``r_H = ||H v - G v||``. A block is certified when its residuals are at most
``tolerance * max(norms of the two products)`` with ``tolerance = PROBE_EPS_FACTOR *
eps(dtype)`` (1.2e-4 in float32, 2.2e-13 in float64): the products agree to rounding where
the identity holds (measured: ~1e-16 relative in float64, ~1e-6 in float32 on LeNet,
VGG11_bn and ResNet18), whereas a real residual is of the order of the block itself (0.3 to
1 relative on the counter-examples above). A zero block (both products 0) is certified.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from layerhessians.curvature.ggn import GGNOperator
from layerhessians.curvature.gram import block_parameters
from layerhessians.curvature.hessian import HessianOperator
from layerhessians.curvature.kinds import KIND_CLASSES, curvature_graph, kind_class
from layerhessians.curvature.params import resolve_params
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
        hessian_residual: ``max_v ||H v - G v|| / max(||H v||, ||G v||)`` with ``G v``
            the factors' ``V V^T v`` when there are factors (NaN if not run: ``"ggn"``).
        factor_residual: ``max_v ||V V^T v - G v|| / ||G v||`` with ``G v`` by autograd
            (NaN if not run: no factors, or ``"hessian"`` on a block whose direct check
            passed, which implies it).
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


def _products(model, loss_fn, data, blocks, kinds, vectors, bn_mode, reduction):
    """``{kind: {name: product}}`` on one shared graph: per block, ``"hessian"``: ``H_bb v_b``
    and ``"ggn_block"``: ``G_bb v_b`` (one product per block: the diagonal blocks), and/or
    ``"ggn"``: ``G v`` restricted to the blocks (ONE product for all blocks, ``v`` their
    concatenation: ``(G v)_b = sum_c G_bc v_c``)."""
    params, names = resolve_params(model)
    needs = tuple(sorted({"ggn" if k == "ggn_block" else k for k in kinds}))
    graph = curvature_graph(model, loss_fn, data, params, needs, bn_mode, reduction=reduction)
    index = {id(p): i for i, p in enumerate(params)}
    positions = [index[id(p)] for p in blocks.values()]
    try:
        operators, parts = [], []
        for kind, cls in (("hessian", HessianOperator), ("ggn_block", GGNOperator)):
            if kind in kinds:
                operators += [cls(graph, [i], [names[i]], name=n)
                              for n, i in zip(blocks, positions)]
                parts += list(vectors.values())
        if "ggn" in kinds:
            order = sorted(range(len(positions)), key=positions.__getitem__)
            operators.append(GGNOperator(graph, [positions[j] for j in order],
                                         [names[positions[j]] for j in order], name="blocks"))
            parts.append(torch.cat([vectors[list(blocks)[j]] for j in order]))
        products = graph.products(operators, parts)
    finally:
        graph.release()
    result, done = {}, 0
    for kind in ("hessian", "ggn_block"):
        if kind in kinds:
            result[kind] = dict(zip(blocks, products[done:done + len(blocks)]))
            done += len(blocks)
    if "ggn" in kinds:
        pieces = torch.split(products[-1], [blocks[list(blocks)[j]].numel() for j in order])
        result["ggn"] = {list(blocks)[j]: piece for j, piece in zip(order, pieces)}
    return result


def _factor_products(factors, vectors, names) -> dict:
    """``(V V^T v)_b = V_b sum_c V_c^T v_c`` over ``names`` (the factors' GGN restricted to
    those blocks, cross terms included: compare with ``G v`` of :func:`_products`)."""
    with torch.no_grad():
        coefficients = sum(factors[n].coefficients(vectors[n]) for n in names)
        return {n: factors[n].combine(coefficients).to(vectors[n].dtype) for n in names}


def certify_blocks(model: nn.Module, loss_fn, data, blocks, factors=None, probes: int = 1,
                   seed: int = 0, kind: str = "hessian", bn_mode: str = "eval",
                   tolerance: float | None = None, reduction=None
                   ) -> "OrderedDict[str, Certificate]":
    """Certify, per block, that the Gram route gives its exact ``kind`` spectrum.

    Args:
        model: the network (left unchanged), as in
            :func:`~layerhessians.curvature.kinds.hessian_operator`.
        loss_fn: batch mean or sum of per-example losses, as in ``hessian_operator``.
        data: an ``(inputs, targets)`` pair or an iterable of pairs.
        bn_mode: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).
        reduction: the distributed reduction hook (``None``: identity).
        blocks: ``{name: weight}``.
        factors: ``{name: LayerFactors}`` from :func:`~layerhessians.curvature.gram.gram_factors`
            (optional; blocks without factors are checked for ``H = G`` only).
        probes: random Gaussian vectors per block (default 1).
        seed: seed of the probe vectors.
        kind: ``"hessian"`` (needs ``H = G`` and the factors) or ``"ggn"`` (the factors only).
        tolerance: relative tolerance (default :func:`probe_tolerance` of the model's dtype).

    Returns:
        ``OrderedDict`` ``{name: Certificate}`` in block order. Costs one shared first-order
        graph (one forward and one ``create_graph`` backward per batch) plus, per probe,
        one Hessian-vector product per block (``kind="hessian"``: ``H_bb v_b`` against the
        factors' ``V_b V_b^T v_b`` directly) and one GGN-vector product for all blocks
        together (``kind="ggn"``, blocks without factors, or to tell why a block failed).
    """
    if not kind_class(kind).exact_route:
        routes = [k for k, c in KIND_CLASSES.items() if c.exact_route]
        raise UserError(f"only kind={' or '.join(repr(k) for k in routes)} can be certified; "
                        f"got {kind!r}")
    factors = {} if factors is None else factors
    blocks = block_parameters(model, blocks)
    dtype = next(iter(blocks.values())).dtype
    tol = probe_tolerance(dtype) if tolerance is None else float(tolerance)
    generator = torch.Generator().manual_seed(int(seed))
    with_factors = [n for n in blocks if n in factors]
    nan = float("nan")
    worst_h = dict.fromkeys(blocks, 0.0 if kind == "hessian" else nan)
    worst_v = dict.fromkeys(blocks, nan)

    def worse(old: float, new: float) -> float:  # NaN must not be lost in max()
        return new if new != new or old != old else max(old, new)

    for _ in range(int(probes)):
        vectors = {n: torch.randn(p.numel(), generator=generator, dtype=torch.float64
                                  ).to(dtype) for n, p in blocks.items()}
        direct = kind == "hessian" and bool(with_factors)
        kinds = ("hessian",) if kind == "hessian" else ("ggn",)
        if kind == "hessian" and len(with_factors) < len(blocks):
            kinds += ("ggn_block",)  # H_bb v_b against G_bb v_b where there are no factors
        products = _products(model, loss_fn, data, blocks, kinds, vectors, bn_mode,
                             reduction)
        hv, gv = products.get("hessian", {}), products.get("ggn")
        gv_block = products.get("ggn_block", {})
        failed = []
        if direct:  # H_bb v_b against V_b V_b^T v_b: the Gram route's block itself
            for name in with_factors:
                with torch.no_grad():
                    vv = factors[name].matvec(vectors[name]).to(hv[name])
                scale = max(float(torch.linalg.vector_norm(hv[name])),
                            float(torch.linalg.vector_norm(vv)))
                residual = _relative(hv[name] - vv, scale)
                worst_h[name] = worse(worst_h[name], residual)
                if not residual <= tol:
                    failed.append(name)
            if failed:  # why: G v by autograd tells H != G from wrong factors
                gv_failed = _products(model, loss_fn, data,
                                      OrderedDict((n, blocks[n]) for n in failed), ("ggn",),
                                      {n: vectors[n] for n in failed}, bn_mode,
                                      reduction)["ggn"]
                failed_vv = _factor_products(factors, vectors, failed)
                for name in failed:
                    g_norm = float(torch.linalg.vector_norm(gv_failed[name]))
                    worst_v[name] = worse(worst_v[name], _relative(
                        failed_vv[name] - gv_failed[name], g_norm))
        for name, product in gv_block.items():
            if name not in factors:
                scale = max(float(torch.linalg.vector_norm(hv[name])),
                            float(torch.linalg.vector_norm(product)))
                worst_h[name] = worse(worst_h[name], _relative(hv[name] - product, scale))
        if kind == "ggn" and with_factors:  # all blocks' factors in one G v
            vv = _factor_products(factors, vectors, with_factors)
            for name in with_factors:
                g_norm = float(torch.linalg.vector_norm(gv[name]))
                worst_v[name] = worse(worst_v[name],
                                      _relative(vv[name].to(gv[name]) - gv[name], g_norm))
    results = OrderedDict()
    for name in blocks:
        reasons = []
        if name not in factors:
            if kind == "hessian" and not worst_h[name] <= tol:
                reasons.append(f"Hessian block != GGN block (relative residual "
                               f"{worst_h[name]:.2g} > {tol:.2g})")
            reasons.append("no Gram factors")
        elif kind == "hessian" and not worst_h[name] <= tol:
            if worst_v[name] == worst_v[name] and not worst_v[name] <= tol:
                reasons.append(f"Gram factors != GGN block (relative residual "
                               f"{worst_v[name]:.2g} > {tol:.2g}; examples interact?)")
            else:
                reasons.append(f"Hessian block != GGN block (relative residual "
                               f"{worst_h[name]:.2g} > {tol:.2g})")
        elif kind == "ggn" and not worst_v[name] <= tol:
            reasons.append(f"Gram factors != GGN block (relative residual "
                           f"{worst_v[name]:.2g} > {tol:.2g}; examples interact?)")
        results[name] = Certificate(not reasons, worst_h[name], worst_v[name], tol,
                                    "; ".join(reasons))
    return results

"""The registry of curvature kinds: name -> operator class, and the builders that go
through it (:func:`curvature_graph`, :func:`hessian_operator`).

Adding a kind is one module with a :class:`~layerhessians.curvature.base.CurvatureOperator`
subclass (``kind``, ``needs``, ``batch_product``, ``reference``), one line in
:data:`KIND_CLASSES` (plus its name in :data:`layerhessians.vocabulary.KINDS`, the torch-free
list the CLI offers) and one test against its dense reference.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from layerhessians.curvature.base import CurvatureOperator
from layerhessians.curvature.batches import Reduction
from layerhessians.curvature.blocks import FULL
from layerhessians.curvature.ef import EmpiricalFisherOperator
from layerhessians.curvature.ggn import GGNOperator
from layerhessians.curvature.graph import CurvatureGraph
from layerhessians.curvature.hessian import HessianOperator
from layerhessians.curvature.params import resolve_params
from layerhessians.curvature.residual import ResidualOperator
from layerhessians.errors import check_choice
from layerhessians.vocabulary import KINDS

__all__ = ["KIND_CLASSES", "KINDS", "kind_class", "curvature_graph", "hessian_operator"]

#: every curvature kind, by name (the order of help texts and choices)
KIND_CLASSES: dict[str, type[CurvatureOperator]] = {
    cls.kind: cls
    for cls in (HessianOperator, GGNOperator, ResidualOperator, EmpiricalFisherOperator)
}
if tuple(KIND_CLASSES) != KINDS:  # the torch-free name list the CLI offers must match
    raise ImportError(f"curvature kinds {tuple(KIND_CLASSES)} differ from vocabulary.KINDS {KINDS}")


def kind_class(kind: str) -> type[CurvatureOperator]:
    """The operator class of ``kind`` (one of :data:`KINDS`); :class:`UserError` otherwise."""
    check_choice(kind, KINDS, "kind")
    return KIND_CLASSES[kind]


def curvature_graph(model: nn.Module, loss_fn, data, params, kinds: str | Iterable[str]
                    = "hessian", bn_mode: str = "eval", reuse_graph: bool = True,
                    reduction: Reduction | None = None,
                    conv_double_backward: str = "lean",
                    loss_reduction: str = "mean") -> CurvatureGraph:
    """A :class:`CurvatureGraph` keeping what operators of ``kinds`` (one name or several)
    need; the other arguments as in :class:`CurvatureGraph`.

    Raises:
        UserError: an unknown kind, or a bad argument of :class:`CurvatureGraph`.
    """
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    needs = frozenset().union(*(kind_class(k).needs for k in kinds))
    return CurvatureGraph(model, loss_fn, data, params, needs, bn_mode, reuse_graph, reduction,
                          conv_double_backward, loss_reduction)


def hessian_operator(model: nn.Module, loss_fn, data, params=None, kind: str = "hessian",
                     bn_mode: str = "eval", reuse_graph: bool = True,
                     reduction: Reduction | None = None,
                     conv_double_backward: str = "lean",
                     loss_reduction: str = "mean") -> CurvatureOperator:
    """The curvature operator of ``model``'s mean loss over ``data``, for a parameter block.

    Definition. The operator is the curvature (Hessian, GGN, ...) of the MEAN over all ``N``
    examples of the per-example losses ``l_n = loss_fn(model(x_n)[None], y_n[None])``,
    ``L = (1/N) sum_n l_n``, however the data are split into batches
    (``loss_reduction="sum"``: of ``sum_n l_n``, ``N`` times as large). ``loss_fn`` may
    reduce its batch by the mean (``nn.CrossEntropyLoss()``) or the sum
    (``reduction="sum"``): which one is detected once by comparing it with the mean and the
    sum of per-example losses on a few examples, and a loss that is neither (class weights
    with ``reduction="mean"``) is refused. For ``nn.MSELoss``, ``l_n`` averages (mean) or
    sums (sum) the example's output coordinates, so the two operators differ by that count.
    The model may return a tuple/list/dict of tensors: ``loss_fn`` gets that structure, and
    the GGN is taken w.r.t. the output tensors the loss depends on. A model whose outputs
    depend on the batch composition (batch norm in ``bn_mode="train"`` or with
    ``track_running_stats=False``; other layers by a probe) must get its data as one batch.

    Args:
        model: the network (its parameters must stay fixed while the operator is used).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean or sum of
            per-example losses (scalar), or a
            :class:`~layerhessians.curvature.batches.BatchLoss` ``fn(model, batch) -> (mean
            loss, count)`` for losses that need the model and the whole batch (Hessian only;
            the mean is then over the counted terms).
        data: an ``(inputs, targets)`` pair or an iterable of pairs (a list of batches of
            any form with a ``BatchLoss``).
        params: ``None`` for every trainable parameter (the full matrix), else a list of
            parameters or a ``{name: parameter}`` dict: the diagonal block for those.
        kind: one of :data:`KINDS`: ``"hessian"`` (default), ``"ggn"`` (generalized
            Gauss-Newton ``J^T H_f J``), ``"residual"`` (``H - G``) or ``"ef"`` (empirical
            Fisher ``(1/N) sum_n grad l_n grad l_n^T``).
        bn_mode: ``"eval"`` (default, running statistics) or ``"train"`` (batch statistics).
        reuse_graph: keep the first-order graph for all products (default).
        reduction: the :class:`Reduction` hook for distributed sums (identity by default).
        conv_double_backward: ``"lean"`` (default) or ``"native"`` (see
            :mod:`~layerhessians.curvature.conv_double_backward`).
        loss_reduction: ``"mean"`` (default) or ``"sum"``: the operator's loss (above).

    Returns:
        The kind's :class:`CurvatureOperator` (``.dim``, ``.matvec(v)``, ``.matmat(V)``,
        ``.to_scipy()``), named ``"full"`` when ``params`` is every trainable parameter.

    Raises:
        UserError: an unknown kind, ``bn_mode`` or ``loss_reduction``, bad data or
            parameters, a batch-dependent model on several batches, a ``BatchLoss`` with a
            kind other than ``"hessian"``; at the first product, a loss that is neither a
            mean nor a sum of per-example losses; a product with NaN/inf entries
            (:class:`~layerhessians.curvature.graph.NonFiniteError`).
    """
    cls = kind_class(kind)
    chosen, names = resolve_params(model, params)
    graph = curvature_graph(model, loss_fn, data, chosen, kind, bn_mode, reuse_graph, reduction,
                            conv_double_backward, loss_reduction)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    is_full = {id(p) for p in chosen} == trainable
    return cls(graph, range(len(chosen)), names, name=FULL if is_full else None)

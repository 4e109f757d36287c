"""Linear-operator base classes: :class:`SymmetricOperator` (products, scipy export) and
:class:`CurvatureOperator` (a curvature matrix of a model's mean loss on a shared
:class:`~layerhessians.curvature.graph.CurvatureGraph`, with arithmetic).

A curvature kind subclasses :class:`CurvatureOperator` and implements one per-batch product
(:meth:`CurvatureOperator.batch_product`), declares what the graph must keep
(:attr:`CurvatureOperator.needs`) and gives its dense float64 reference
(:meth:`CurvatureOperator.reference`); matvec, matmat, ``@``, :meth:`~SymmetricOperator.to_scipy`
and arithmetic (``A - B``, ``A + B``, ``c * A``) come from here.

Vectors: products take and return 1-D tensors of length ``dim``: the parameters of the block,
flattened and concatenated in the block's parameter order. The product runs in the model's
dtype and device; the result has the input's dtype, on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import ClassVar

import numpy as np
import scipy.sparse.linalg
import torch
from torch import Tensor

from layerhessians.curvature.graph import BatchGraph, CurvatureGraph
from layerhessians.errors import UserError

__all__ = ["SymmetricOperator", "CurvatureOperator", "LinearCombination"]


class SymmetricOperator:
    """A symmetric ``dim x dim`` linear operator given by its products.

    Subclasses set ``dim``, ``dtype``, ``device``, ``name`` and implement :meth:`matvec`.
    """

    matvec_accepts_out = True  # Lanczos passes a reused output buffer
    dim: int
    dtype: torch.dtype
    device: torch.device
    name: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(dim, dim)``."""
        return (self.dim, self.dim)

    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        """``A v`` for a 1-D ``vector`` [dim]; ``out`` (optional) receives the result."""
        raise NotImplementedError

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V``: ``matrix`` [dim, k] -> [dim, k], one product per column, in the
        matrix's dtype on the operator's device.

        Raises:
            UserError: ``matrix`` is not [dim, k].
        """
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != self.dim:
            raise UserError(f"matrix must have shape ({self.dim}, k); got {tuple(matrix.shape)}")
        if not matrix.shape[1]:
            return matrix.new_zeros(self.dim, 0).to(self.device)
        return torch.stack([self.matvec(matrix[:, j]) for j in range(matrix.shape[1])], dim=1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if torch.as_tensor(other).ndim == 1 else self.matmat(other)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """The operator as a float64 :class:`scipy.sparse.linalg.LinearOperator` (numpy in
        and out, computed on the operator's device; ``rmatvec = matvec``: symmetric), for
        scipy's solvers (``eigsh``, ``cg``, ...)."""
        def matvec(vector):
            v = torch.as_tensor(np.asarray(vector, dtype=np.float64).reshape(-1))
            return self.matvec(v.to(self.device)).cpu().numpy()

        def matmat(matrix):
            m = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
            return self.matmat(m.to(self.device)).cpu().numpy()

        return scipy.sparse.linalg.LinearOperator(self.shape, matvec=matvec, rmatvec=matvec,
                                                  matmat=matmat, rmatmat=matmat,
                                                  dtype=np.float64)

    @property
    def product_group(self):
        """The object that multiplies this operator jointly with others, or ``None``.

        Operators whose ``product_group`` is the same object (not ``None``) can be multiplied
        together in one pass by ``group.products(operators, vectors, outs=None) -> [A_k v_k]``
        (a :class:`~layerhessians.curvature.graph.CurvatureGraph` for operators on it); the
        spectral routines use it to share work (symmetry probes, Lanczos steps) and to judge
        blocks of one model on a common scale. ``None`` (default): products one by one.
        """
        return None

    @property
    def joint_products_save_passes(self) -> bool:
        """Whether multiplying the operators of :attr:`product_group` together saves forward
        passes (a graph rebuilt for every product), so that Lanczos should step them in
        lockstep through ``group.products``. ``False`` by default."""
        return False

    def release(self) -> None:
        """Free what the operator keeps (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CurvatureOperator(SymmetricOperator):
    """A curvature matrix block ``A_PP`` of a model's mean loss, on a :class:`CurvatureGraph`.

    Subclasses (one per kind, registered in :mod:`~layerhessians.curvature.kinds`) set
    :attr:`kind` and :attr:`needs` and implement :meth:`batch_product` and :meth:`reference`.

    Args:
        graph: the shared :class:`CurvatureGraph`; it must keep :attr:`needs`.
        indices: positions in ``graph.params`` of the block's parameters, in vector order.
        names: their qualified names.
        name: ``"full"`` for every trainable parameter, else the names joined by ``"+"``
            (default); seeds of random start vectors derive from it.

    Attributes:
        dim: number of scalars in the block (the operator is ``dim x dim``).
        params, names, indices: the block's parameters, names and graph positions.
        dtype, device: of the model (products run there).

    Raises:
        UserError: the graph does not keep what this kind needs.
    """

    #: the registry name of the kind
    kind: ClassVar[str] = ""
    #: what the graph keeps per batch for this kind (a subset of :data:`~layerhessians.curvature.graph.NEEDS`)
    needs: ClassVar[frozenset] = frozenset()
    #: whether a certified layer block of this kind has the exact (Gram) route: its block is
    #: ``V V^T`` (:mod:`~layerhessians.curvature.gram`, :mod:`~layerhessians.curvature.certify`)
    exact_route: ClassVar[bool] = False

    def __init__(self, graph: CurvatureGraph, indices: Sequence[int], names: Sequence[str],
                 name: str | None = None):
        missing = set(self.needs) - set(graph.needs)
        if missing:
            raise UserError(f"a graph keeping {sorted(graph.needs)} cannot give "
                            f"{self.kind or type(self).__name__!r} products (needs "
                            f"{sorted(missing)}): build the graph for this kind")
        self.graph = graph
        self.indices = list(indices)
        self.params = [graph.params[i] for i in self.indices]
        self.names = list(names)
        self.name = name if name is not None else "+".join(self.names)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = int(sum(self.sizes))
        self.dtype, self.device = graph.dtype, graph.device
        self._input_buffer = None

    # -- what a kind implements
    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        """The batch's term of ``A_PP v_P``: the curvature of the batch's SUM of per-example
        losses (``batch.scale * loss_fn``) times ``v_P``, one tensor per block parameter, or
        ``None`` when it is zero. The graph sums the terms and multiplies by ``1/N``.

        Args:
            batch: what the graph kept for one batch.
            parts: ``v_P`` as tensors shaped like the block's parameters (model dtype).
        """
        raise NotImplementedError

    @classmethod
    def reference(cls, problem, x: Tensor, y) -> Tensor:
        """The dense float64 curvature [dim, dim] of the SUM of the per-example losses of the
        batch ``(x, y)`` (``problem.batch_loss_fn``),
        computed independently of :meth:`batch_product` (``torch.func``), with the helpers
        of ``problem`` (a :class:`~layerhessians.curvature.dense.ReferenceProblem`)."""
        raise NotImplementedError

    # -- vectors
    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Views of a 1-D ``vector`` [dim] shaped like the block's parameters."""
        return [t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)]

    def model_vector(self, vector: Tensor) -> Tensor:
        """``vector`` in the model's dtype/device; conversions reuse one buffer (fresh large
        allocations cost page faults)."""
        if vector.dtype == self.dtype and vector.device == self.device:
            return vector.contiguous()
        buffer = self._input_buffer
        if buffer is None:
            buffer = self._input_buffer = torch.empty(self.dim, dtype=self.dtype,
                                                      device=self.device)
        return buffer.copy_(vector)

    # -- products
    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        """``A v``: ``vector`` 1-D [dim] (any floating dtype) -> 1-D [dim], same dtype as
        ``vector``, on the model's device. ``out`` (optional, 1-D [dim] on that device)
        receives the result and is returned.

        Raises:
            UserError: a vector of the wrong shape, or parameters changed since the graph
                was built (call :meth:`release`).
        """
        return self.graph.products([self], [vector], [out])[0]

    @property
    def model(self):
        """The network the operator's graph differentiates (``graph.model``)."""
        return self.graph.model

    @property
    def product_group(self) -> CurvatureGraph:
        """The shared :class:`CurvatureGraph`: operators on it are multiplied together in one
        pass over its batches (:meth:`CurvatureGraph.products`)."""
        return self.graph

    @property
    def joint_products_save_passes(self) -> bool:
        """``True`` when the graph is rebuilt for every product (``reuse_graph=False``)."""
        return not self.graph.reuse_graph

    def release(self) -> None:
        """Free the shared graph (all operators on it); later products rebuild it."""
        self.graph.release()

    # -- arithmetic: combinations on the same graph and block, one pass over the batches
    def _terms(self) -> list[tuple[float, CurvatureOperator]]:
        return [(1.0, self)]

    def _combine(self, other, sign: float) -> LinearCombination:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return LinearCombination(self._terms() + [(sign * c, op) for c, op in other._terms()])

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return LinearCombination([(-c, op) for c, op in self._terms()])

    def __mul__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, Real):
            return NotImplemented
        return LinearCombination([(float(factor) * c, op) for c, op in self._terms()])

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, name={self.name!r}, dim={self.dim})"


class LinearCombination(CurvatureOperator):
    """``sum_k c_k A_k`` for operators on one graph and one block (``A - B``, ``c * A``):
    each batch's term is the combination of the terms' batch products, so a product is one
    pass over the batches. ``kind`` is ``"combination"`` unless a subclass names it.

    Args:
        terms: ``[(c_k, A_k)]`` with real ``c_k``; every ``A_k`` on the same graph and block.
        name: defaults to the first operator's name.

    Operators built separately (``hessian_operator(..., kind="ggn")`` next to
    ``hessian_operator(...)``) are moved onto one new graph when they are of the same
    model, parameter block, loss, data (equal tensors) and settings; otherwise refused.

    Raises:
        UserError: no terms, or operators of different blocks, models, losses, data or
            settings.
    """

    kind: ClassVar[str] = "combination"

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]],
                 name: str | None = None):
        terms = [(float(c), op) for c, op in terms]
        if not terms:
            raise UserError("a linear combination needs at least one operator")
        terms = _on_one_graph(terms)
        first = terms[0][1]
        self.terms = terms
        self.needs = frozenset().union(*(op.needs for _, op in terms))
        super().__init__(first.graph, first.indices, first.names,
                         name=first.name if name is None else name)

    def _terms(self) -> list[tuple[float, CurvatureOperator]]:
        return list(self.terms)

    def batch_product(self, batch: BatchGraph, parts: Sequence[Tensor]) -> tuple | None:
        """The batch's term of ``sum_t c_t A_t v_P``: the terms' products, scaled and summed.

        Args:
            batch: what the graph kept for one batch.
            parts: ``v_P`` as tensors shaped like the block's parameters (model dtype).

        Returns:
            One tensor per block parameter (shapes and dtype of ``parts``), or ``None`` when every
            term is zero on this batch.
        """
        total = None
        for coefficient, op in self.terms:
            pieces = op.batch_product(batch, parts)
            if pieces is None:
                continue
            if total is None:
                total = tuple(p if coefficient == 1.0 else coefficient * p for p in pieces)
            else:
                total = tuple(t.add(p, alpha=coefficient) if coefficient not in (1.0, -1.0)
                              else (t + p if coefficient == 1.0 else t - p)
                              for t, p in zip(total, pieces))
        return total

    @classmethod
    def reference(cls, problem, x, y):
        """Refuse: a combination has no dense reference of its own.

        Raises:
            UserError: always; combine the references of the terms instead.
        """
        raise UserError("a linear combination has no dense reference of its own: combine "
                        "the references of its terms")

    def __repr__(self) -> str:
        terms = " ".join(f"{c:+g}*{op.kind}" for c, op in self.terms)
        return f"{type(self).__name__}({terms}, name={self.name!r}, dim={self.dim})"



# -- combining operators that were built separately ---------------------------------------
_GRAPH_SETTINGS = ("bn_mode", "loss_reduction", "conv_double_backward")


def _equal_values(a, b) -> bool:
    """Equal data: tensors of equal shape, dtype and entries; containers item by item."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_values(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (str, int, float, bool))
                      and a == b)


def _same_loss(a, b) -> bool:
    if a is b:
        return True
    if not (isinstance(a, torch.nn.Module) and type(a) is type(b)) or repr(a) != repr(b):
        return False
    return _equal_values(dict(a.state_dict()), dict(b.state_dict())) and all(
        getattr(a, k, None) == getattr(b, k, None)
        for k in ("reduction", "ignore_index", "label_smoothing"))


def _graph_difference(a: CurvatureGraph, b: CurvatureGraph) -> str | None:
    """What makes two graphs' operators different problems, or ``None``."""
    if a.model is not b.model:
        return "the model"
    if [id(p) for p in a.params] != [id(p) for p in b.params]:
        return "the parameters the graphs were built on (pass params= to both)"
    if not _same_loss(a.loss_fn, b.loss_fn):
        return "the loss function"
    for setting in _GRAPH_SETTINGS:
        if getattr(a, setting) != getattr(b, setting):
            return f"{setting} ({getattr(a, setting)!r} vs {getattr(b, setting)!r})"
    if a.reduction is not b.reduction:
        return "the distributed reduction"
    if not _equal_values(list(a._data), list(b._data)):
        return "the data"
    return None


def _on_one_graph(terms: list) -> list:
    """``terms`` with every operator on the first one's graph, or on one new graph keeping
    what they all need when they were built separately on the same problem.

    Raises:
        UserError: operators of different parameter blocks, or of different problems.
    """
    first = terms[0][1]
    graphs = list({id(op.graph): op.graph for _, op in terms}.values())
    for graph in graphs[1:]:
        reason = _graph_difference(graphs[0], graph)
        if reason is not None:
            raise UserError(f"operators built separately combine only on the same model, "
                            f"parameters, loss, data and settings; these differ in {reason}. "
                            "Build both with the same arguments, or use "
                            "hessian_operator(..., kind='residual') for H - G")
    block = [id(p) for p in first.params]
    for _, op in terms:
        if [id(p) for p in op.params] != block:
            raise UserError(f"operators combine only on one parameter block; {op.name!r} and "
                            f"{first.name!r} differ: build both with the same params=")
    if len(graphs) == 1:
        return terms
    base = graphs[0]
    shared = type(base)(base.model, base.loss_fn, list(base._data), base.params,
                        frozenset().union(*(g.needs for g in graphs)), base.bn_mode,
                        base.reuse_graph, base.reduction, base.conv_double_backward,
                        base.loss_reduction)
    return [(c, type(op)(shared, op.indices, op.names, name=op.name)) for c, op in terms]

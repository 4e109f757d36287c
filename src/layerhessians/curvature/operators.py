"""Curvature operators: products with the Hessian, the generalized Gauss-Newton matrix (GGN)
and the residual H - G of a model's mean loss over a fixed data set.

The loss is ``L(theta) = sum_b (n_b / N) * loss_fn(model(x_b), y_b)``: ``loss_fn`` returns the
mean over its batch (like ``nn.CrossEntropyLoss()``), batch ``b`` has ``n_b`` examples and
``N = sum_b n_b``, so ``L`` is the mean over all examples even for unequal batches.

Graph reuse. A :class:`CurvatureGraph` runs, per batch, one forward pass and one
``create_graph`` gradient ``g = dL_b/dtheta`` and keeps them; every product after that is one
more backward pass through that graph, ``H_PP v_P = d(g_P . v_P)/dtheta_P``, differentiating
only what the block ``P`` needs. Several operators (the full Hessian and every layer block)
can share one graph. The parameters must not change while a graph is alive: a product after
an in-place update raises :class:`UserError`; call ``op.release()`` (or use the operator as a
context manager) to free the graph, after which the next product rebuilds it.

GGN. With the outputs ``f`` kept in the graph, ``dl_df`` computed with ``create_graph`` and a
dummy ``u`` (``w = J^T u`` built once with ``create_graph``), a GGN product is
``J v = d(w . v)/du``, then ``H_f (J v) = d(dl_df . Jv)/df``, then ``J^T z = d(f . z)/dtheta``:
exact for any loss, three backward passes, no forward pass. Residual = Hessian - GGN.

Batch norm. ``bn_mode="eval"`` (default) evaluates batch-norm layers with their running
statistics; ``"train"`` normalises each batch by its own statistics (so with several batches
the operator is the mean of per-batch Hessians, each with its own statistics). All other
modules run in eval mode (dropout off), so the operator is deterministic. The forward pass
uses cloned buffers and every module's ``training`` flag is restored afterwards: the model's
running statistics, ``num_batches_tracked`` and modes are never changed.

Reduction hook. Every product is a sum of per-batch terms, passed through one
:class:`Reduction` (``sum``) before it is returned, and ``N`` goes through
``Reduction.total_examples``; both are identities here. A distributed run overrides them with
all-reduces over a process group, without changing this API.

Vectors: products take and return 1-D tensors of length ``dim``: the parameters of the block,
flattened and concatenated in the block's parameter order. The product runs in the model's
dtype and device; the result has the input's dtype, on the model's device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from layerhessians.curvature.conv_double_backward import lean_convolutions
from layerhessians.errors import UserError
from layerhessians.vocabulary import BN_MODES, FULL

__all__ = [
    "KINDS",
    "BN_MODES",
    "Reduction",
    "CurvatureGraph",
    "CurvatureOperator",
    "MatrixOperator",
    "hessian_operator",
    "as_batches",
    "resolve_params",
]

KINDS = ("hessian", "ggn", "residual")


class Reduction:
    """Combines per-process partial results; the identity for a single process.

    A distributed subclass all-reduces: ``total_examples`` returns the global example count
    and ``sum`` returns the global sum of a product (both called with local values).
    """

    def total_examples(self, count: int) -> int:
        """Global number of examples given the local ``count``."""
        return count

    def sum(self, tensor: Tensor) -> Tensor:
        """Global sum of a 1-D product ``tensor`` (may work in place); returns the result."""
        return tensor


LOCAL = Reduction()


# ----------------------------------------------------------------------------- input checks


def as_batches(data) -> list[tuple[Tensor, Tensor]]:
    """``data`` as a list of ``(inputs, targets)`` pairs.

    ``data`` is one pair (a tuple/list whose first item is a tensor) or an iterable of pairs;
    an iterator is consumed once. Raises :class:`UserError` if it is empty or malformed.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        pairs = [tuple(data)]
    else:
        try:
            pairs = [tuple(item) for item in data]
        except TypeError:
            raise UserError(
                "data must be an (inputs, targets) pair or an iterable of such pairs"
            ) from None
    if not pairs:
        raise UserError("data is empty: pass an (inputs, targets) pair or a non-empty list "
                        "of pairs")
    for pair in pairs:
        if len(pair) != 2 or not torch.is_tensor(pair[0]):
            raise UserError("each batch of data must be an (inputs, targets) pair of tensors")
        if pair[0].ndim == 0 or pair[0].shape[0] == 0:
            raise UserError("a batch of data has no examples: drop empty batches")
    return pairs


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def resolve_params(model: nn.Module, params=None) -> tuple[list[nn.Parameter], list[str]]:
    """The block's parameters and their qualified names, in the order given.

    ``params``: ``None`` (every trainable parameter, in ``model.named_parameters()`` order), a
    list of parameters, or a ``{name: parameter}`` dict (names are taken from the model).
    Raises :class:`UserError` for an empty block, a frozen parameter, a parameter that is
    not the model's, or a repeated parameter.
    """
    names = _parameter_names(model)
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise UserError("the model has no trainable parameters (all have requires_grad=False)")
        return chosen, [names[id(p)] for p in chosen]
    if isinstance(params, Mapping):
        params = list(params.values())
    elif isinstance(params, (nn.Parameter, Tensor)):
        params = [params]
    else:
        params = list(params)
    if not params:
        raise UserError("the parameter block is empty: pass at least one trainable parameter")
    seen = set()
    for p in params:
        if id(p) not in names:
            raise UserError("a parameter of the block is not a parameter of the model")
        if not p.requires_grad:
            raise UserError(
                f"parameter {names[id(p)]!r} is frozen (requires_grad=False): "
                "a block needs trainable parameters"
            )
        if id(p) in seen:
            raise UserError(f"parameter {names[id(p)]!r} appears twice in the block")
        seen.add(id(p))
    return params, [names[id(p)] for p in params]


def _check_choice(value, choices, what):
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


# ----------------------------------------------------------------------------- the graph


@dataclass
class _BatchGraph:
    """What one batch keeps for products (all scaled by n_b / N)."""

    grads: tuple | None = None  # g_i = dL_b/dparam_i, with create_graph (None if unused)
    outputs: Tensor | None = None  # f = model(x_b)
    dloss_doutputs: Tensor | None = None  # dL_b/df with create_graph
    dummy: Tensor | None = None  # u, shaped like f
    jt_dummy: tuple | None = None  # w_i = J_i^T u with create_graph


def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad


class CurvatureGraph:
    """The first-order graph of a model's mean loss, shared by curvature operators.

    Args:
        model: the network; its parameters must not change while the graph is alive.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (see :func:`as_batches`);
            inputs are moved to the model's device and floating inputs/targets cast to its dtype.
        params: the parameters the graph differentiates (products can use any subset).
        kind: ``"hessian"``, ``"ggn"`` or ``"residual"`` (decides what the graph keeps).
        bn_mode: ``"eval"`` or ``"train"`` (see the module docstring).
        reuse_graph: keep each batch's graph for all products (fast; memory of one
            ``create_graph`` backward per batch). ``False``: rebuild per product (naive).
        reduction: the :class:`Reduction` hook (identity by default).
    """

    #: record conv2d through the lean double backward of :mod:`._lean` (same values, less work)
    lean_convolutions = True

    def __init__(self, model, loss_fn, data, params, kind="hessian", bn_mode="eval",
                 reuse_graph=True, reduction=None):
        _check_choice(kind, KINDS, "kind")
        _check_choice(bn_mode, BN_MODES, "bn_mode")
        if not callable(loss_fn):
            raise UserError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        self.kind = kind
        self.bn_mode = bn_mode
        self.reuse_graph = bool(reuse_graph)
        self.reduction = LOCAL if reduction is None else reduction
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        if not self.dtype.is_floating_point or any(
            p.dtype != self.dtype or p.device != self.device for p in self.params
        ):
            raise UserError("all parameters must share one floating dtype and one device")
        self._data = [self._to_model(x, y) for x, y in as_batches(data)]
        self._local_examples = sum(int(x.shape[0]) for x, _ in self._data)
        self._scales = None
        self._built: list[_BatchGraph] | None = None
        self._versions = None
        self.forward_passes = 0  # number of forward passes run (for benchmarks and tests)

    def _to_model(self, x: Tensor, y) -> tuple[Tensor, Tensor]:
        x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else None)
        if torch.is_tensor(y):
            y = y.to(device=self.device, dtype=self.dtype if y.is_floating_point() else None)
        return x, y

    @property
    def num_examples(self) -> int:
        """Local number of examples (over all batches)."""
        return self._local_examples

    @property
    def needs_hessian(self) -> bool:
        return self.kind in ("hessian", "residual")

    @property
    def needs_ggn(self) -> bool:
        return self.kind in ("ggn", "residual")

    # -- forward pass without side effects on the model
    def _forward(self, x: Tensor) -> Tensor:
        modules = list(self.model.modules())
        modes = [m.training for m in modules]
        try:
            self.model.eval()
            if self.bn_mode == "train":
                for m in modules:
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.forward_passes += 1
            with lean_convolutions(self.lean_convolutions):
                if buffers:
                    return torch.func.functional_call(self.model, buffers, (x,))
                return self.model(x)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode

    def _build_batch(self, x: Tensor, y, scale: float) -> _BatchGraph:
        outputs = self._forward(x)
        loss = self.loss_fn(outputs, y)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
        loss = loss.reshape(()) * scale
        batch = _BatchGraph()
        if self.needs_hessian and self.needs_ggn:
            grads = torch.autograd.grad(loss, [outputs, *self.params], create_graph=True,
                                        allow_unused=True)
            batch.dloss_doutputs, batch.grads = grads[0], tuple(grads[1:])
        elif self.needs_hessian:
            batch.grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                              allow_unused=True)
        else:
            (batch.dloss_doutputs,) = torch.autograd.grad(loss, outputs, create_graph=True)
        if self.needs_ggn:
            batch.outputs = outputs
            batch.dummy = torch.zeros_like(outputs, requires_grad=True)
            batch.jt_dummy = torch.autograd.grad(outputs, self.params, batch.dummy,
                                                 create_graph=True, allow_unused=True)
        return batch

    def _batch_scales(self) -> list[float]:
        if self._scales is None:
            total = int(self.reduction.total_examples(self._local_examples))
            self._scales = [x.shape[0] / total for x, _ in self._data]
        return self._scales

    def batches(self):
        """Yield one :class:`_BatchGraph` per batch (cached when ``reuse_graph``)."""
        with torch.enable_grad():
            if not self.reuse_graph:
                for (x, y), scale in zip(self._data, self._batch_scales()):
                    yield self._build_batch(x, y, scale)
                return
            if self._built is None:
                self._built = [self._build_batch(x, y, s)
                               for (x, y), s in zip(self._data, self._batch_scales())]
                self._versions = [p._version for p in self.params]
            elif [p._version for p in self.params] != self._versions:
                raise UserError(
                    "the model's parameters changed after the Hessian operator was built: "
                    "call op.release() (or build a new operator) after each update"
                )
            yield from self._built

    def build(self) -> "CurvatureGraph":
        """Build the per-batch graphs now (otherwise done by the first product)."""
        for _ in self.batches():
            pass
        return self

    def release(self) -> None:
        """Free the kept graphs; the next product rebuilds them from the current parameters."""
        self._built = None
        self._versions = None

    # -- products of several operators in one pass over the batches
    def products(self, operators: Sequence["CurvatureOperator"], vectors: Sequence[Tensor],
                 outs: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """``[A_k v_k]`` for operators ``A_k`` on this graph, in one pass over the batches: a
        graph that is not kept (``reuse_graph=False``) is built once per batch for all of
        them instead of once per operator. Each product is reduced (:class:`Reduction`) and
        returned as :meth:`CurvatureOperator.matvec` would (``outs[k]``, when given,
        receives it)."""
        outs = [None] * len(operators) if outs is None else list(outs)
        if not len(operators) == len(vectors) == len(outs):
            raise UserError("products needs one vector (and one out, if any) per operator")
        parts, results, targets, seen = [], [], [], set()
        for op, vector, out in zip(operators, vectors, outs):
            if op.graph is not self:
                raise UserError("products got an operator of another graph")
            vector = torch.as_tensor(vector)
            if vector.shape != (op.dim,):
                raise UserError(f"vector must have shape ({op.dim},); got {tuple(vector.shape)}")
            if out is not None and (out.shape != (op.dim,) or out.device != op.device
                                    or not out.is_contiguous()):
                raise UserError(f"out must be a contiguous ({op.dim},) tensor on {op.device}")
            out_dtype = vector.dtype if vector.is_floating_point() else torch.float64
            # an operator given twice must not share its conversion buffer
            model_vector = op._model_vector(vector) if id(op) not in seen else \
                vector.to(device=op.device, dtype=op.dtype).clone()
            seen.add(id(op))
            parts.append(op.unflatten(model_vector))
            result = out if out is not None else torch.empty(op.dim, dtype=out_dtype,
                                                              device=op.device)
            results.append(result)
            targets.append(op.unflatten(result))  # results go straight into place
        filled = [False] * len(operators)
        for batch in self.batches():
            for k, op in enumerate(operators):
                pieces = op._batch_product(batch, parts[k])
                if pieces is None:
                    continue
                for target, piece in zip(targets[k], pieces):
                    target.add_(piece) if filled[k] else target.copy_(piece)
                filled[k] = True
        reduced = []
        for result, out, done in zip(results, outs, filled):
            if not done:
                result.zero_()
            total = self.reduction.sum(result)
            if out is not None and total is not out:
                total = out.copy_(total)
            reduced.append(total)
        return reduced

    # -- per-batch products over a subset of the graph's parameters
    def hessian_product(self, batch: _BatchGraph, indices, parts) -> tuple | None:
        """``H_PP v_P`` for the block ``P = params[indices]`` (``parts``: v shaped like P)."""
        outputs, grad_outputs = [], []
        for i, part in zip(indices, parts):
            if _needs_grad(batch.grads[i]):
                outputs.append(batch.grads[i])
                grad_outputs.append(part)
        if not outputs:
            return None  # the gradient of the block is constant: zero Hessian block
        return torch.autograd.grad(outputs, [self.params[i] for i in indices], grad_outputs,
                                   retain_graph=True, allow_unused=True, materialize_grads=True)

    def ggn_product(self, batch: _BatchGraph, indices, parts) -> tuple | None:
        """``G_PP v_P = J_P^T H_f J_P v_P`` for the block ``P = params[indices]``."""
        outputs, grad_outputs = [], []
        for i, part in zip(indices, parts):
            if _needs_grad(batch.jt_dummy[i]):
                outputs.append(batch.jt_dummy[i])
                grad_outputs.append(part)
        if not outputs or not _needs_grad(batch.dloss_doutputs):
            return None  # the outputs do not depend on P, or the loss is linear in them
        (jvp,) = torch.autograd.grad(outputs, batch.dummy, grad_outputs, retain_graph=True)
        (hjvp,) = torch.autograd.grad(batch.dloss_doutputs, batch.outputs, jvp,
                                      retain_graph=True, allow_unused=True,
                                      materialize_grads=True)
        return torch.autograd.grad(batch.outputs, [self.params[i] for i in indices], hjvp,
                                   retain_graph=True, allow_unused=True, materialize_grads=True)


# ----------------------------------------------------------------------------- operators


class CurvatureOperator:
    """A symmetric operator ``A`` (Hessian, GGN or residual block) on a :class:`CurvatureGraph`.

    Attributes:
        dim: number of scalars in the block (the operator is ``dim x dim``).
        params, names: the block's parameters and qualified names, in vector order.
        kind: ``"hessian"``, ``"ggn"`` or ``"residual"``.
        name: ``"full"`` for every trainable parameter, else the names joined by ``"+"``
            (or the label given); seeds of random start vectors derive from it.
        dtype, device: of the model (products run there).
        graph: the shared :class:`CurvatureGraph`.
    """

    matvec_accepts_out = True  # Lanczos passes a reused output buffer

    def __init__(self, graph: CurvatureGraph, indices: Sequence[int], names: Sequence[str],
                 kind: str | None = None, name: str | None = None):
        self.graph = graph
        self.kind = graph.kind if kind is None else kind
        _check_choice(self.kind, KINDS, "kind")
        if self.kind in ("hessian", "residual") and not graph.needs_hessian or \
                self.kind in ("ggn", "residual") and not graph.needs_ggn:
            raise UserError(f"a graph built for kind={graph.kind!r} cannot give {self.kind!r}")
        self.indices = list(indices)
        self.params = [graph.params[i] for i in self.indices]
        self.names = list(names)
        self.name = name if name is not None else "+".join(self.names)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.dim = int(sum(self.sizes))
        self.dtype, self.device = graph.dtype, graph.device
        self._input_buffer = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Views of a 1-D ``vector`` [dim] shaped like the block's parameters."""
        return [t.view(s) for t, s in zip(vector.split(self.sizes), self.shapes)]

    def _batch_product(self, batch, parts):
        if self.kind == "hessian":
            return self.graph.hessian_product(batch, self.indices, parts)
        if self.kind == "ggn":
            return self.graph.ggn_product(batch, self.indices, parts)
        h = self.graph.hessian_product(batch, self.indices, parts)
        g = self.graph.ggn_product(batch, self.indices, parts)
        if g is None:
            return h
        if h is None:
            return tuple(-t for t in g)
        return tuple(a - b for a, b in zip(h, g))

    def _model_vector(self, vector: Tensor) -> Tensor:
        """``vector`` in the model's dtype/device; conversions reuse one buffer (fresh large
        allocations cost page faults: ~4x a copy for VGG11_bn's 28M parameters)."""
        if vector.dtype == self.dtype and vector.device == self.device:
            return vector.contiguous()
        buffer = self._input_buffer
        if buffer is None:
            buffer = self._input_buffer = torch.empty(self.dim, dtype=self.dtype,
                                                      device=self.device)
        return buffer.copy_(vector)

    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        """``A v``: ``vector`` 1-D [dim] (any floating dtype) -> 1-D [dim], same dtype as
        ``vector``, on the model's device. ``out`` (optional, 1-D [dim] on that device)
        receives the result and is returned."""
        return self.graph.products([self], [vector], [out])[0]

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V``: ``matrix`` [dim, k] -> [dim, k], one product per column."""
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != self.dim:
            raise UserError(f"matrix must have shape ({self.dim}, k); got {tuple(matrix.shape)}")
        return torch.stack([self.matvec(matrix[:, j]) for j in range(matrix.shape[1])], dim=1) \
            if matrix.shape[1] else matrix.new_zeros(self.dim, 0).to(self.device)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if torch.as_tensor(other).ndim == 1 else self.matmat(other)

    def release(self) -> None:
        """Free the shared graph (all operators on it); later products rebuild it."""
        self.graph.release()

    def __enter__(self) -> "CurvatureOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"CurvatureOperator(kind={self.kind!r}, name={self.name!r}, dim={self.dim})"


class MatrixOperator:
    """A dense symmetric matrix as an operator (tests, small problems): ``.dim``, ``.matvec``,
    ``.matmat``; products in the matrix's dtype, results in the input's dtype."""

    matvec_accepts_out = True

    def __init__(self, matrix, name: str = "matrix"):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise UserError("MatrixOperator needs a non-empty square matrix")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.name = name
        self.dtype, self.device = matrix.dtype, matrix.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def matvec(self, vector: Tensor, out: Tensor | None = None) -> Tensor:
        vector = torch.as_tensor(vector)
        result = (self.matrix @ vector.to(self.device, self.dtype)).to(vector.dtype)
        return result if out is None else out.copy_(result)

    def matmat(self, matrix: Tensor) -> Tensor:
        matrix = torch.as_tensor(matrix)
        return (self.matrix @ matrix.to(self.device, self.dtype)).to(matrix.dtype)

    def release(self) -> None:
        pass


def hessian_operator(model: nn.Module, loss_fn, data, params=None, kind: str = "hessian",
                     bn_mode: str = "eval", reuse_graph: bool = True,
                     reduction: Reduction | None = None) -> CurvatureOperator:
    """The curvature operator of ``model``'s mean loss over ``data``, for a parameter block.

    Args:
        model: the network (its parameters must stay fixed while the operator is used).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean (scalar).
        data: an ``(inputs, targets)`` pair or an iterable of pairs.
        params: ``None`` for every trainable parameter (the full Hessian), else a list of
            parameters or a ``{name: parameter}`` dict: the diagonal block for those.
        kind: ``"hessian"`` (default), ``"ggn"`` (generalized Gauss-Newton ``J^T H_f J``) or
            ``"residual"`` (``H - G``).
        bn_mode: ``"eval"`` (default, running statistics) or ``"train"`` (batch statistics).
        reuse_graph: keep the first-order graph for all products (default).
        reduction: the :class:`Reduction` hook for distributed sums (identity by default).

    Returns:
        A :class:`CurvatureOperator` with ``.dim``, ``.matvec(v)``, ``.matmat(V)``.
    """
    chosen, names = resolve_params(model, params)
    graph = CurvatureGraph(model, loss_fn, data, chosen, kind, bn_mode, reuse_graph, reduction)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    is_full = {id(p) for p in chosen} == trainable
    return CurvatureOperator(graph, range(len(chosen)), names, name=FULL if is_full else None)

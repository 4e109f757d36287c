"""The first-order graph of a model's mean loss, shared by every curvature operator on it.

The loss is ``L(theta) = sum_b (n_b / N) * loss_fn(model(x_b), y_b)``: ``loss_fn`` returns the
mean over its batch (like ``nn.CrossEntropyLoss()``), batch ``b`` has ``n_b`` examples and
``N = sum_b n_b``, so ``L`` is the mean over all examples even for unequal batches.

Graph reuse. A :class:`CurvatureGraph` runs, per batch, one forward pass and one
``create_graph`` gradient and keeps what its operators declared they need (:data:`NEEDS`);
every product after that is more backward passes through that graph, differentiating only
what the block needs. Several operators (the full Hessian and every layer block, of any kind
whose needs the graph keeps) share one graph. The parameters must not change while a graph
is alive: a product after an in-place update raises :class:`UserError`; call
``release()`` to free the graph, after which the next product rebuilds it.

Batch norm. ``bn_mode="eval"`` (default) evaluates batch-norm layers with their running
statistics; ``"train"`` normalises each batch by its own statistics (so with several batches
the operator is the mean of per-batch curvatures, each with its own statistics). All other
modules run in eval mode (dropout off), so the operator is deterministic. The forward pass
uses cloned buffers and every module's ``training`` flag is restored afterwards: the model's
running statistics, ``num_batches_tracked`` and modes are never changed.

Reduction hook. Every product is a sum of per-batch terms, passed through one
:class:`Reduction` (``sum``) before it is returned, and ``N`` goes through
``Reduction.total_examples``; both are identities here. A distributed run overrides them
with all-reduces over a process group, without changing this API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from layerhessians.curvature.attention import math_attention
from layerhessians.curvature.conv_double_backward import (
    CONV_DOUBLE_BACKWARDS,
    conv_double_backward,
)
from layerhessians.errors import UserError
from layerhessians.vocabulary import BN_MODES

if TYPE_CHECKING:  # annotations only
    from layerhessians.curvature.base import CurvatureOperator

__all__ = [
    "BN_MODES",
    "GRADIENT",
    "OUTPUT_CURVATURE",
    "PER_EXAMPLE_GRADIENTS",
    "NEEDS",
    "BatchGraph",
    "CurvatureGraph",
    "Reduction",
    "as_batches",
    "resolve_params",
    "check_choice",
    "differentiable",
    "has_batch_norm",
]


#: what a graph keeps per batch, declared by each kind (``CurvatureOperator.needs``):
#: the gradient ``g = dL_b/dtheta`` with ``create_graph`` (Hessian products)
GRADIENT = "gradient"
#: the outputs ``f``, ``dL_b/df`` with ``create_graph`` and ``J^T u`` for a dummy ``u`` (GGN)
OUTPUT_CURVATURE = "output_curvature"
#: the per-example gradients ``grad l_n`` [n_b, *shape], no graph (empirical Fisher)
PER_EXAMPLE_GRADIENTS = "per_example_gradients"
NEEDS = (GRADIENT, OUTPUT_CURVATURE, PER_EXAMPLE_GRADIENTS)


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


def check_choice(value, choices, what: str) -> None:
    """Raise :class:`UserError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


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


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------- the graph


@dataclass
class BatchGraph:
    """What one batch keeps for products (all scaled by ``scale = n_b / N``).

    Attributes:
        scale: ``n_b / N``, the batch's weight in the mean loss.
        examples: ``n_b``.
        grads: ``g_i = scale * dL_b/dparam_i`` with ``create_graph`` (:data:`GRADIENT`).
        outputs, dloss_doutputs, dummy, jt_dummy: ``f = model(x_b)``, ``scale * dL_b/df``
            with ``create_graph``, ``u`` shaped like ``f`` and ``w_i = J_i^T u`` with
            ``create_graph`` (:data:`OUTPUT_CURVATURE`).
        per_example_grads: ``grad l_n`` per parameter, [n_b, *shape], unscaled, detached
            (:data:`PER_EXAMPLE_GRADIENTS`).
    """

    scale: float
    examples: int
    grads: tuple | None = None
    outputs: Tensor | None = None
    dloss_doutputs: Tensor | None = None
    dummy: Tensor | None = None
    jt_dummy: tuple | None = None
    per_example_grads: tuple | None = None

    def kept_bytes(self) -> tuple[int, int]:
        """``(per_batch, per_example)``: bytes of the kept tensors whose size is fixed
        (parameter-sized: ``grads``, ``jt_dummy``) and of those that grow with the batch
        (``outputs``, ``dloss_doutputs``, ``dummy``, ``per_example_grads``), excluding the
        activations autograd saves."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        per_batch = size(self.grads or ()) + size(self.jt_dummy or ())
        per_example = size((self.outputs, self.dloss_doutputs, self.dummy)) + \
            size(self.per_example_grads or ())
        return per_batch, per_example


def differentiable(tensor) -> bool:
    """Whether ``tensor`` is kept and depends on something differentiable (else its
    derivative is zero)."""
    return tensor is not None and tensor.requires_grad


class CurvatureGraph:
    """The first-order graph of a model's mean loss, shared by curvature operators.

    Args:
        model: the network; its parameters must not change while the graph is alive.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (see :func:`as_batches`);
            inputs are moved to the model's device and floating inputs/targets cast to its dtype.
        params: the parameters the graph differentiates (products can use any subset).
        needs: what to keep per batch, a subset of :data:`NEEDS` (the union of the needs of
            the operators that will use the graph; see
            :func:`~layerhessians.curvature.kinds.curvature_graph` to build it from a kind).
        bn_mode: ``"eval"`` or ``"train"`` (see the module docstring).
        reuse_graph: keep each batch's graph for all products (fast; memory of one
            ``create_graph`` backward per batch). ``False``: rebuild per product (naive).
        reduction: the :class:`Reduction` hook (identity by default).
        conv_double_backward: ``"lean"`` (default) records ``conv2d`` with the leaner double
            backward of :mod:`~layerhessians.curvature.conv_double_backward` (same values,
            less work); ``"native"`` uses PyTorch's own.

    Raises:
        UserError: an unknown need, ``bn_mode`` or ``conv_double_backward``; a ``loss_fn``
            that is not callable; parameters of mixed dtypes or devices.
    """

    def __init__(self, model: nn.Module, loss_fn, data, params: Sequence[nn.Parameter],
                 needs: Iterable[str] = (GRADIENT,), bn_mode: str = "eval",
                 reuse_graph: bool = True, reduction: Reduction | None = None,
                 conv_double_backward: str = "lean"):
        if isinstance(needs, str):
            raise UserError("CurvatureGraph takes needs (e.g. {GRADIENT}), not a kind: build "
                            "it with curvature_graph(..., kinds) for a kind")
        needs = frozenset(needs)
        for need in needs:
            check_choice(need, NEEDS, "a graph need")
        check_choice(bn_mode, BN_MODES, "bn_mode")
        check_choice(conv_double_backward, CONV_DOUBLE_BACKWARDS, "conv_double_backward")
        if not callable(loss_fn):
            raise UserError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        names = _parameter_names(model)
        self.names = [names[id(p)] for p in self.params]
        self.needs = needs
        self.bn_mode = bn_mode
        self.reuse_graph = bool(reuse_graph)
        self.reduction = LOCAL if reduction is None else reduction
        self.conv_double_backward = conv_double_backward
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        if not self.dtype.is_floating_point or any(
            p.dtype != self.dtype or p.device != self.device for p in self.params
        ):
            raise UserError("all parameters must share one floating dtype and one device")
        if PER_EXAMPLE_GRADIENTS in needs and bn_mode == "train" and has_batch_norm(model):
            raise UserError("per-example gradients (the empirical Fisher) are undefined with "
                            "batch norm in bn_mode 'train', which couples the examples of a "
                            "batch: use bn_mode 'eval'")
        self._data = [self._to_model(x, y) for x, y in as_batches(data)]
        self._local_examples = sum(int(x.shape[0]) for x, _ in self._data)
        self._scales = None
        self._built: list[BatchGraph] | None = None
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
    def num_batches(self) -> int:
        """Number of batches (graphs built per pass)."""
        return len(self._data)

    @property
    def inputs(self) -> list[Tensor]:
        """The inputs of every batch, on the model's device and in its dtype."""
        return [x for x, _ in self._data]

    @property
    def built(self) -> list[BatchGraph] | None:
        """The kept per-batch graphs, or ``None`` when not built (or not kept)."""
        return self._built

    # -- forward pass without side effects on the model
    @contextlib.contextmanager
    def _model_modes(self):
        """Eval mode, batch norm in ``bn_mode``; the caller's modes restored afterwards."""
        modules = list(self.model.modules())
        modes = [m.training for m in modules]
        try:
            self.model.eval()
            if self.bn_mode == "train":
                for m in modules:
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode

    def _forward(self, x: Tensor) -> Tensor:
        with self._model_modes():
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.forward_passes += 1
            with conv_double_backward(self.conv_double_backward), math_attention():
                if buffers:
                    return torch.func.functional_call(self.model, buffers, (x,))
                return self.model(x)

    def _scaled_loss(self, outputs: Tensor, y, scale: float) -> Tensor:
        loss = self.loss_fn(outputs, y)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
        return loss.reshape(()) * scale

    def _per_example_grads(self, x: Tensor, y) -> tuple:
        """``grad l_n`` per parameter [n_b, *shape] with ``l_n = loss_fn(f(x_n)[None],
        y_n[None])``, by ``torch.func.vmap(grad)``; checks that ``loss_fn`` is the mean of
        these per-example losses."""
        if not torch.is_tensor(y) or y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise UserError("per-example gradients need targets with one row per example")
        params = {n: p.detach() for n, p in zip(self.names, self.params)}

        def example_loss(values, xn, yn):
            outputs = torch.func.functional_call(self.model, (values, buffers),
                                                 (xn.unsqueeze(0),))
            return self.loss_fn(outputs, yn.unsqueeze(0)).reshape(())

        with self._model_modes(), math_attention():
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.forward_passes += 1
            grads, losses = torch.func.vmap(torch.func.grad_and_value(example_loss),
                                            in_dims=(None, 0, 0))(params, x, y)
            with torch.no_grad():
                batch_loss = self.loss_fn(torch.func.functional_call(
                    self.model, (params, buffers), (x,)), y)
        if not torch.is_tensor(batch_loss) or batch_loss.numel() != 1:
            raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
        mean = losses.mean()
        tolerance = 100 * torch.finfo(self.dtype).eps * max(1.0, float(losses.abs().mean()))
        if abs(float(batch_loss) - float(mean)) > tolerance:
            raise UserError("loss_fn must return the mean of per-example losses (as with "
                            "reduction='mean' and no class weights) for the empirical Fisher; "
                            f"the batch loss {float(batch_loss):.6g} differs from the mean "
                            f"per-example loss {float(mean):.6g}")
        return tuple(grads[n] for n in self.names)

    def _build_batch(self, x: Tensor, y, scale: float) -> BatchGraph:
        batch = BatchGraph(scale=scale, examples=int(x.shape[0]))
        gradient, output_curvature = GRADIENT in self.needs, OUTPUT_CURVATURE in self.needs
        if gradient or output_curvature:
            outputs = self._forward(x)
            loss = self._scaled_loss(outputs, y, scale)
            if gradient and output_curvature:
                grads = torch.autograd.grad(loss, [outputs, *self.params], create_graph=True,
                                            allow_unused=True)
                batch.dloss_doutputs, batch.grads = grads[0], tuple(grads[1:])
            elif gradient:
                batch.grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                                  allow_unused=True)
            else:
                (batch.dloss_doutputs,) = torch.autograd.grad(loss, outputs, create_graph=True)
            if output_curvature:
                batch.outputs = outputs
                batch.dummy = torch.zeros_like(outputs, requires_grad=True)
                batch.jt_dummy = torch.autograd.grad(outputs, self.params, batch.dummy,
                                                     create_graph=True, allow_unused=True)
        if PER_EXAMPLE_GRADIENTS in self.needs:
            batch.per_example_grads = self._per_example_grads(x, y)
        return batch

    def _batch_scales(self) -> list[float]:
        if self._scales is None:
            total = int(self.reduction.total_examples(self._local_examples))
            self._scales = [x.shape[0] / total for x, _ in self._data]
        return self._scales

    def batches(self):
        """Yield one :class:`BatchGraph` per batch (cached when ``reuse_graph``)."""
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
        """``[A_k v_k]`` for operators ``A_k`` on this graph, in one pass over the batches.

        A graph that is not kept (``reuse_graph=False``) is built once per batch for all of
        them instead of once per operator. Each product is reduced (:class:`Reduction`) and
        returned as :meth:`CurvatureOperator.matvec` would (``outs[k]``, when given,
        receives it).

        Args:
            operators: operators whose ``graph`` is this graph.
            vectors: one 1-D vector [dim_k] per operator (any floating dtype).
            outs: optional contiguous 1-D outputs [dim_k] on the model's device.

        Returns:
            One 1-D tensor [dim_k] per operator, in the vector's dtype (float64 for
            integer vectors), on the model's device.

        Raises:
            UserError: mismatched counts, shapes, or an operator of another graph.
        """
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
            model_vector = op.model_vector(vector) if id(op) not in seen else \
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
                pieces = op.batch_product(batch, parts[k])
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

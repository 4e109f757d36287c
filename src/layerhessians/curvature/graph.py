"""The first-order graph of a model's mean loss, shared by every curvature operator on it.

Related concepts live in their own modules: the batches and the :class:`Reduction` hook in
:mod:`.batches`, the parameter block in :mod:`.params`, loss-reduction detection in
:mod:`.loss_reduction`, the batch-coupling probe in :mod:`.coupling` and the engine's forward
modes in :mod:`.modes`.

The operator's loss. ``L(theta) = (1/N) sum_n l_n``, the MEAN over all ``N`` examples of the
per-example losses ``l_n = loss_fn(model(x_n)[None], y_n[None])`` (``loss_reduction="sum"``:
the sum ``sum_n l_n = N L`` instead). The reduction of ``loss_fn`` itself is detected once
(:func:`loss_reduction_of`, by comparing the loss of a few examples with the mean and the
sum of their per-example losses): a mean-reduced ``loss_fn`` (``nn.CrossEntropyLoss()``)
counts ``n_b * loss_fn(batch)`` per batch, a sum-reduced one (``reduction="sum"``)
``loss_fn(batch)``; any other (class weights with ``reduction="mean"``, a per-batch term) is
refused with :class:`UserError`. So ``L`` is the same for any split of the data into
batches, even unequal ones. Note that ``nn.MSELoss()`` averages over output coordinates too,
so its ``l_n`` is the mean over a row and ``nn.MSELoss(reduction="sum")``'s the sum: their
operators differ by the number of outputs per example. A loss that needs more than
``(outputs, targets)`` (a language model's shifted next-token loss, dict batches) is given
as :class:`BatchLoss` ``fn(model, batch) -> (mean loss, count)`` (Hessian kind only).

Structured outputs. The model may return a tensor or a tuple/list/dict of tensors
(``torch.utils._pytree``); ``loss_fn`` receives that structure. The GGN is taken with
respect to the floating output tensors the loss depends on; outputs the loss ignores
contribute nothing.

Batch-dependent layers. An operator is defined per batch of examples; splitting the data
(several batches, micro-batches, distributed shards) does not change it when every example's
output depends on that example alone. Layers whose output depends on the other examples of
the batch make it batch-dependent: batch norm in ``bn_mode="train"``, and batch norm with
``track_running_stats=False`` in any mode (it always uses batch statistics); custom modules
are caught by a probe (a sub-batch's outputs against the same rows of the whole batch's).
Layer, group and instance norm are per-example. :func:`batch_coupling` is the one decision;
a graph on several batches, with a distributed reduction or needing per-example gradients
refuses a batch-dependent model (:class:`UserError`): pass the data as one batch or use
``bn_mode="eval"``.

Graph reuse. A :class:`CurvatureGraph` runs, per batch, one forward pass and one
``create_graph`` gradient and keeps what its operators declared they need (:data:`NEEDS`);
every product after that is more backward passes through that graph, differentiating only
what the block needs. Several operators (the full Hessian and every layer block, of any kind
whose needs the graph keeps) share one graph. The parameters must not change while a graph
is alive: a product after an in-place update raises :class:`UserError`; call
``release()`` to free the graph, after which the next product rebuilds it.

Batch norm. ``bn_mode="eval"`` (default) evaluates batch-norm layers with their running
statistics; ``"train"`` normalises the batch by its own statistics (one batch only, see
above). All other
modules run in eval mode (dropout off), so the operator is deterministic. The forward pass
uses cloned buffers and every module's ``training`` flag is restored afterwards: the model's
running statistics, ``num_batches_tracked`` and modes are never changed.

Reduction hook. Every product is a sum of per-batch terms, passed through one
:class:`Reduction` (``sum``) and multiplied by ``1/N`` (mean) before it is returned, and ``N``
goes through ``Reduction.total_examples``; both are identities here. A product with a NaN or
infinite entry raises :class:`UserError` naming the operator (:class:`NonFiniteError`). A distributed run overrides them
with all-reduces over a process group, without changing this API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from layerhessians.curvature.batches import LOCAL, BatchLoss, Reduction, as_batches, output_tensors
from layerhessians.curvature.conv_double_backward import (
    CONV_DOUBLE_BACKWARDS,
    conv_double_backward,
)
from layerhessians.curvature.coupling import OUTPUT_ROWS, RANDOM_FORWARD, batch_coupling
from layerhessians.curvature.loss_reduction import (
    LOSS_REDUCTIONS,
    classify_reduction,
    data_loss_reduction,
)
from layerhessians.curvature.modes import call_model, engine_context, reseed
from layerhessians.curvature.params import parameter_names
from layerhessians.curvature.per_example import per_example_gradients
from layerhessians.errors import NonFiniteError, UserError, check_choice
from layerhessians.vocabulary import BN_MODES

__all__ = [
    "GRADIENT",
    "OUTPUT_CURVATURE",
    "PER_EXAMPLE_GRADIENTS",
    "NEEDS",
    "BatchGraph",
    "CurvatureGraph",
    "NonFiniteError",
    "differentiable",
]


#: what a graph keeps per batch, declared by each kind (``CurvatureOperator.needs``):
#: the gradient ``g = dL_b/dtheta`` with ``create_graph`` (Hessian products)
GRADIENT = "gradient"
#: the outputs ``f``, ``dL_b/df`` with ``create_graph`` and ``J^T u`` for a dummy ``u`` (GGN)
OUTPUT_CURVATURE = "output_curvature"
#: the per-example gradients ``grad l_n`` [n_b, *shape], no graph (empirical Fisher)
PER_EXAMPLE_GRADIENTS = "per_example_gradients"
NEEDS = (GRADIENT, OUTPUT_CURVATURE, PER_EXAMPLE_GRADIENTS)


@dataclass
class BatchGraph:
    """What one batch keeps for products. Every batch term is a SUM over the batch's
    examples; the graph multiplies the total by ``CurvatureGraph.factor`` (``1/N``).

    Attributes:
        scale: the weight of the batch's loss value in its term: ``n_b`` for a mean-reduced
            ``loss_fn`` (or a :class:`BatchLoss`'s count), 1 for a sum-reduced one.
        examples: ``n_b``.
        grads: ``g_i = scale * dL_b/dparam_i`` with ``create_graph`` (:data:`GRADIENT`).
        outputs, dloss_doutputs, dummy, jt_dummy: the floating output tensors ``f`` the loss
            depends on (a tuple), ``scale * dL_b/df`` with ``create_graph`` (a tuple), ``u``
            shaped like ``f`` (a tuple) and ``w_i = J_i^T u`` with ``create_graph``
            (:data:`OUTPUT_CURVATURE`); ``curvature_outputs``: the variables ``dloss_doutputs``
            was taken in (``outputs`` itself, or detached copies for several outputs).
        per_example_grads: ``grad l_n`` per parameter, [n_b, *shape], unscaled, detached
            (:data:`PER_EXAMPLE_GRADIENTS`).
    """

    scale: float
    examples: int
    grads: tuple | None = None
    outputs: tuple | None = None
    dloss_doutputs: tuple | None = None
    dummy: tuple | None = None
    jt_dummy: tuple | None = None
    per_example_grads: tuple | None = None
    curvature_outputs: tuple | None = None

    def kept_bytes(self) -> tuple[int, int]:
        """``(per_batch, per_example)``: bytes of the kept tensors whose size is fixed
        (parameter-sized: ``grads``, ``jt_dummy``) and of those that grow with the batch
        (``outputs``, ``dloss_doutputs``, ``dummy``, ``per_example_grads``), excluding the
        activations autograd saves."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors or () if t is not None)

        per_batch = size(self.grads) + size(self.jt_dummy)
        copies = self.curvature_outputs if self.curvature_outputs and \
            self.curvature_outputs[0] is not self.outputs[0] else ()
        per_example = size(self.outputs) + size(self.dloss_doutputs) + size(self.dummy) + \
            size(copies) + size(self.per_example_grads)
        return per_batch, per_example


def differentiable(tensor) -> bool:
    """Whether ``tensor`` is kept and depends on something differentiable (else its
    derivative is zero)."""
    return tensor is not None and tensor.requires_grad


class CurvatureGraph:
    """The first-order graph of a model's mean loss, shared by curvature operators.

    Args:
        model: the network; its parameters must not change while the graph is alive. Its
            outputs may be a tensor or a tuple/list/dict of tensors.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, the mean or the sum of the batch's
            per-example losses (detected, see the module docstring), or a :class:`BatchLoss`.
        data: an ``(inputs, targets)`` pair or an iterable of pairs (see :func:`as_batches`);
            inputs are moved to the model's device and floating inputs/targets cast to its
            dtype. With a :class:`BatchLoss`: a list of batches of any form, passed as given.
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
        loss_reduction: ``"mean"`` (default): the operator is the curvature of the mean loss
            over all examples; ``"sum"``: of their sum (``N`` times the mean's).

    Raises:
        UserError: an unknown need, ``bn_mode``, ``loss_reduction`` or
            ``conv_double_backward``; a ``loss_fn`` that is not callable; parameters of
            mixed dtypes or devices; a batch-dependent model (:func:`batch_coupling`) on
            several batches, with a distributed reduction or needing per-example gradients;
            a :class:`BatchLoss` with needs other than the gradient.
    """

    def __init__(self, model: nn.Module, loss_fn, data, params: Sequence[nn.Parameter],
                 needs: Iterable[str] = (GRADIENT,), bn_mode: str = "eval",
                 reuse_graph: bool = True, reduction: Reduction | None = None,
                 conv_double_backward: str = "lean", loss_reduction: str = "mean"):
        if isinstance(needs, str):
            raise UserError("CurvatureGraph takes needs (e.g. {GRADIENT}), not a kind: build "
                            "it with curvature_graph(..., kinds) for a kind")
        needs = frozenset(needs)
        for need in needs:
            check_choice(need, NEEDS, "a graph need")
        check_choice(bn_mode, BN_MODES, "bn_mode")
        check_choice(conv_double_backward, CONV_DOUBLE_BACKWARDS, "conv_double_backward")
        check_choice(loss_reduction, LOSS_REDUCTIONS, "loss_reduction")
        if not callable(loss_fn):
            raise UserError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.batch_loss = isinstance(loss_fn, BatchLoss)
        if self.batch_loss and needs - {GRADIENT}:
            raise UserError("a BatchLoss gives the Hessian only: the GGN, residual and "
                            "empirical Fisher need loss_fn(outputs, targets) (model outputs "
                            "and per-example losses)")
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        names = parameter_names(model)
        self.names = [names[id(p)] for p in self.params]
        self.needs = needs
        self.bn_mode = bn_mode
        self.reuse_graph = bool(reuse_graph)
        self.reduction = LOCAL if reduction is None else reduction
        self.conv_double_backward = conv_double_backward
        self.loss_reduction = loss_reduction
        first = self.params[0]
        self.dtype, self.device = first.dtype, first.device
        if not self.dtype.is_floating_point or any(
            p.dtype != self.dtype or p.device != self.device for p in self.params
        ):
            raise UserError("all parameters must share one floating dtype and one device")
        if self.batch_loss:
            self._data = as_batches(data, pairs=False)
            self._local_examples = None  # known after the first pass (the counts)
        else:
            self._data = [self._to_model(x, y) for x, y in as_batches(data)]
            self._local_examples = sum(int(x.shape[0]) for x, _ in self._data)
        self._check_split()
        self._loss_reduction_of_fn = None  # "mean"/"sum" once detected
        self._factor = None
        self._reduction_probed = False
        self._built: list[BatchGraph] | None = None
        self._snapshot: list[Tensor] | None = None  # parameters and buffers built on
        self._in_engine = self._building = False
        self.forward_passes = 0  # number of forward passes run (for benchmarks and tests)

    def _check_split(self) -> None:
        """Refuse a batch-dependent model where the data are split (:func:`batch_coupling`)."""
        several = len(self._data) > 1
        distributed = self.reduction is not LOCAL
        per_example = PER_EXAMPLE_GRADIENTS in self.needs
        if not (several or distributed or per_example):
            return
        probe = None if self.batch_loss else max((x for x, _ in self._data),
                                                 key=lambda x: x.shape[0])
        reason = batch_coupling(self.model, self.bn_mode, probe)
        if reason is None:
            return
        where = (f"the data come in {len(self._data)} batches" if several else
                 "the data are sharded over processes" if distributed else
                 "per-example gradients (the empirical Fisher) are asked for")
        if reason == OUTPUT_ROWS:
            raise UserError(f"{where}, but {reason}: return outputs with one row (or R "
                            "consecutive rows) per example and flatten them in loss_fn")
        if reason == RANDOM_FORWARD:
            raise UserError(f"{where}, but {reason}: make the forward deterministic when the "
                            "model is not training (e.g. return the mean instead of a sample "
                            "in eval mode), or pass the data as one (inputs, targets) batch "
                            "without micro_batch_size")
        if per_example:
            raise UserError(f"per-example gradients (the empirical Fisher) are undefined with "
                            f"{reason}, which couples the examples of a batch: use bn_mode "
                            "'eval' (and running statistics)")
        raise UserError(f"{where}, but {reason} makes each example's output depend on the "
                        "other examples of its batch, so the split would change the operator: "
                        "pass the data as one (inputs, targets) batch without "
                        "micro_batch_size, or use bn_mode 'eval'")

    def _to_model(self, x: Tensor, y) -> tuple[Tensor, Tensor]:
        with torch.inference_mode(False):  # inference tensors cannot enter autograd
            x = x.clone() if x.is_inference() else x
            x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else None)
            if torch.is_tensor(y):
                y = y.clone() if y.is_inference() else y
                y = y.to(device=self.device, dtype=self.dtype if y.is_floating_point() else None)
        return x, y

    @property
    def num_examples(self) -> int | None:
        """Local number of examples (over all batches); for a :class:`BatchLoss`, the sum of
        its counts, ``None`` before the first pass."""
        return self._local_examples

    @property
    def num_batches(self) -> int:
        """Number of batches (graphs built per pass)."""
        return len(self._data)

    @property
    def inputs(self) -> list[Tensor]:
        """The inputs of every batch, on the model's device and in its dtype."""
        if self.batch_loss:
            raise UserError("a BatchLoss graph has batches, not (inputs, targets) pairs")
        return [x for x, _ in self._data]

    @property
    def built(self) -> list[BatchGraph] | None:
        """The kept per-batch graphs, or ``None`` when not built (or not kept)."""
        return self._built

    @property
    def factor(self) -> float:
        """What the summed batch terms are multiplied by: ``1/N`` (mean) or 1 (sum)."""
        if self._factor is None:
            if self._local_examples is None:
                raise UserError("the graph's example count is known after its first pass")
            total = int(self.reduction.total_examples(self._local_examples))
            self._factor = 1.0 / total if self.loss_reduction == "mean" else 1.0
        return self._factor

    # -- passes without side effects on the model
    @contextlib.contextmanager
    def _engine(self):
        """:func:`~layerhessians.curvature.modes.engine_context` around the graph's passes
        (entered once however deeply nested)."""
        if self._in_engine:
            yield
            return
        self._check_state()  # outside the context, which swaps the buffers for clones
        if self._snapshot is None:
            self._snapshot = [t.clone() for t in self._state()]
        self._in_engine, self._building = True, False
        try:
            with engine_context(self.model, self.bn_mode):
                yield
        finally:
            self._in_engine = False
        if self._building:
            self._check_state("during")

    def _forward(self, x: Tensor):
        self.forward_passes += 1
        reseed()
        with conv_double_backward(self.conv_double_backward):
            return call_model(self.model, x)

    def _batch_loss_term(self, batch) -> tuple[Tensor, int]:
        """``count * loss`` of a :class:`BatchLoss` batch (inside the engine's context:
        buffers are clones, attention on its math path)."""
        self.forward_passes += 1
        reseed()
        with conv_double_backward(self.conv_double_backward):
            loss, count = self.loss_fn(self.model, batch)
        return loss * count, count

    def _loss_weight(self, outputs, y, count: int) -> float:
        """The batch's ``scale``: ``count`` for a mean-reduced ``loss_fn``, 1 for a sum
        (decided from all the data before the first batch, :func:`data_loss_reduction`)."""
        return 1.0 if self._loss_reduction_of_fn == "sum" else float(count)

    def _detect_reduction(self) -> None:
        if self.batch_loss or self._reduction_probed:
            return
        self._loss_reduction_of_fn = data_loss_reduction(self.loss_fn, self.model, self._data)
        self._reduction_probed = True

    # -- the parameters (and buffers) an operator was built on
    def _state(self) -> list[Tensor]:
        return [t.detach() for t in self.model.parameters()] + list(self.model.buffers())

    def _check_state(self, when: str = "after") -> None:
        """Refuse products when the model's parameters or buffers differ (in any entry) from
        those the graph was built on, however they were changed."""
        if self._snapshot is None:
            return
        state = self._state()
        if len(state) == len(self._snapshot) and all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                for a, b in zip(state, self._snapshot)):
            return
        if when == "during":
            raise UserError("the model's forward changed its own parameters or buffers in "
                            "place: the curvature of such a model is not defined by its "
                            "weights; measure a copy whose forward leaves them alone")
        raise UserError("the model's parameters or buffers changed after its curvature "
                        "operator was built (an optimizer step, p.data, load_state_dict, ...): "
                        "call op.release() to measure at the new weights, or build a new "
                        "operator")

    def _scaled_loss(self, outputs, y, scale: float) -> Tensor:
        loss = self.loss_fn(outputs, y)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
        return loss.reshape(()) * scale

    def _per_example_grads(self, x: Tensor, y) -> tuple:
        """``grad l_n`` per parameter [n_b, *shape] (:func:`per_example_gradients`); tells
        (and checks) from their losses whether ``loss_fn`` is their mean or sum
        (:func:`classify_reduction`)."""
        self.forward_passes += 1
        grads, losses, batch_loss = per_example_gradients(self.model, self.loss_fn,
                                                          self.params, self.names, x, y)
        found = classify_reduction(batch_loss, losses, self.dtype)
        if self._loss_reduction_of_fn is None:
            self._loss_reduction_of_fn = found
        elif found not in (None, self._loss_reduction_of_fn):
            raise UserError(f"loss_fn is a {found} over the examples of one batch and a "
                            f"{self._loss_reduction_of_fn} over another's: pass one reduction")
        return grads

    def _build_batch(self, x, y) -> BatchGraph:
        if self.batch_loss:
            loss, count = self._batch_loss_term(x)
            batch = BatchGraph(scale=float(count), examples=count)
            batch.grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                              allow_unused=True)
            return batch
        examples = int(x.shape[0])
        gradient, output_curvature = GRADIENT in self.needs, OUTPUT_CURVATURE in self.needs
        if gradient or output_curvature:
            outputs = self._forward(x)
            leaves = output_tensors(outputs)
            batch = BatchGraph(scale=self._loss_weight(outputs, y, examples), examples=examples)
            loss = self._scaled_loss(outputs, y, batch.scale)
            if output_curvature:
                self._keep_output_curvature(batch, outputs, leaves, y, loss, gradient)
            else:
                batch.grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                                  allow_unused=True)
        else:  # the per-example losses tell the reduction
            batch = BatchGraph(scale=0.0, examples=examples)
        if PER_EXAMPLE_GRADIENTS in self.needs:
            batch.per_example_grads = self._per_example_grads(x, y)
            batch.scale = self._loss_weight(None, y, examples)
        return batch

    def _keep_output_curvature(self, batch: BatchGraph, outputs, leaves, y, loss: Tensor,
                               gradient: bool) -> None:
        """Keep ``f``, ``dL_b/df`` (partial derivatives, ``create_graph``), ``u`` and ``J^T u``
        for the floating outputs the loss depends on (and the gradient, if needed). With
        several output tensors the loss is differentiated at detached copies, so that each
        output is its own variable even when one is computed from another."""
        used = [t for t in leaves if t.requires_grad]
        if len(leaves) == 1:
            grads = torch.autograd.grad(loss, used + (self.params if gradient else []),
                                        create_graph=True, allow_unused=True)
            variables, partials = used, grads[:len(used)]
            if gradient:
                batch.grads = tuple(grads[len(used):])
        else:
            if gradient:
                batch.grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                                  allow_unused=True)
            copies = {id(t): t.detach().requires_grad_() for t in used}
            flat, spec = tree_flatten(outputs)
            detached = tree_unflatten([copies.get(id(t), t) if torch.is_tensor(t) else t
                                       for t in flat], spec)
            variables = [copies[id(t)] for t in used]
            partials = torch.autograd.grad(self._scaled_loss(detached, y, batch.scale),
                                           variables, create_graph=True, allow_unused=True)
        keep = [i for i, g in enumerate(partials) if g is not None]
        batch.outputs = tuple(used[i] for i in keep)  # the outputs the loss uses
        batch.curvature_outputs = tuple(variables[i] for i in keep)
        batch.dloss_doutputs = tuple(partials[i] for i in keep)
        batch.dummy = tuple(torch.zeros_like(t, requires_grad=True) for t in batch.outputs)
        batch.jt_dummy = torch.autograd.grad(batch.outputs, self.params, batch.dummy,
                                             create_graph=True, allow_unused=True) \
            if batch.outputs else (None,) * len(self.params)

    def _count(self, built) -> None:
        if self._local_examples is None:
            self._local_examples = sum(b.examples for b in built)

    def _build_all(self):
        self._building = True
        for item in self._data:
            yield self._build_batch(item, None) if self.batch_loss else self._build_batch(*item)

    def batches(self):
        """Yield one :class:`BatchGraph` per batch (cached when ``reuse_graph``).

        Raises:
            UserError: the model's parameters or buffers changed since the graph was built
                (or its first product, when not kept), or its forward changes them.
        """
        with self._engine():
            self._detect_reduction()
            if not self.reuse_graph:
                built = []
                for batch in self._build_all():
                    built.append(batch)
                    yield batch
                self._count(built)
                return
            if self._built is None:
                self._built = list(self._build_all())
                self._count(self._built)
            yield from self._built

    def build(self) -> "CurvatureGraph":
        """Build the per-batch graphs now (otherwise done by the first product)."""
        for _ in self.batches():
            pass
        return self

    def release(self) -> None:
        """Free the kept graphs; the next product rebuilds them from the current parameters."""
        self._built = None
        self._snapshot = None

    # -- products of several operators in one pass over the batches
    def products(self, operators: Sequence, vectors: Sequence[Tensor],
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
            NonFiniteError: a product has NaN or infinite entries.
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
        caller_inference = torch.is_inference_mode_enabled()  # its results are written so
        with self._engine():  # backward passes may re-run forwards (checkpointed blocks)
            for batch in self.batches():
                for k, op in enumerate(operators):
                    pieces = op.batch_product(batch, parts[k])
                    if pieces is None:
                        continue
                    with torch.inference_mode(caller_inference):
                        for target, piece in zip(targets[k], pieces):
                            piece = piece.to_dense() if piece.is_sparse else piece
                            target.add_(piece) if filled[k] else target.copy_(piece)
                    filled[k] = True
        reduced = []
        for op, result, out, done in zip(operators, results, outs, filled):
            if not done:
                result.zero_()
            total = self.reduction.sum(result)
            if out is not None and total is not out:
                total = out.copy_(total)
            total.mul_(self.factor)
            op.products_done = getattr(op, "products_done", 0) + 1
            if not bool(torch.isfinite(total).all()):
                raise NonFiniteError(
                    f"the {op.kind or 'curvature'} product of block {op.name!r} (product "
                    f"{op.products_done} of this operator) has non-finite (NaN or infinite) entries: the "
                    "curvature is not finite at these parameters and data (look for NaN/inf "
                    "in the loss, its gradient or the model, e.g. a norm or sqrt at zero)")
            reduced.append(total)
        return reduced

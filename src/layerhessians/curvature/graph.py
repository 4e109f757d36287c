"""The first-order graph of a model's mean loss, shared by every curvature operator on it.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from layerhessians.curvature.attention import math_attention
from layerhessians.curvature.conv_double_backward import (
    CONV_DOUBLE_BACKWARDS,
    conv_double_backward,
)
from layerhessians.errors import UserError, check_choice  # noqa: F401  (re-exported)
from layerhessians.vocabulary import BN_MODES

if TYPE_CHECKING:  # annotations only
    from layerhessians.curvature.base import CurvatureOperator

__all__ = [
    "BN_MODES",
    "LOSS_REDUCTIONS",
    "GRADIENT",
    "OUTPUT_CURVATURE",
    "PER_EXAMPLE_GRADIENTS",
    "NEEDS",
    "BatchGraph",
    "BatchLoss",
    "CurvatureGraph",
    "NonFiniteError",
    "Reduction",
    "as_batches",
    "resolve_params",
    "check_choice",
    "differentiable",
    "has_batch_norm",
    "batch_coupling",
    "engine_modes",
    "loss_reduction_of",
    "output_tensors",
    "rows",
]


#: what a graph keeps per batch, declared by each kind (``CurvatureOperator.needs``):
#: the gradient ``g = dL_b/dtheta`` with ``create_graph`` (Hessian products)
GRADIENT = "gradient"
#: the outputs ``f``, ``dL_b/df`` with ``create_graph`` and ``J^T u`` for a dummy ``u`` (GGN)
OUTPUT_CURVATURE = "output_curvature"
#: the per-example gradients ``grad l_n`` [n_b, *shape], no graph (empirical Fisher)
PER_EXAMPLE_GRADIENTS = "per_example_gradients"
NEEDS = (GRADIENT, OUTPUT_CURVATURE, PER_EXAMPLE_GRADIENTS)
#: the operator's loss: the mean over all examples (default) or their sum
LOSS_REDUCTIONS = ("mean", "sum")
#: examples the probes use (loss reduction, batch coupling)
PROBE_ROWS = 8


class NonFiniteError(UserError):
    """A curvature product (or a Lanczos step) came out with NaN or infinite entries."""


class BatchLoss:
    """A loss computed from the model and a whole batch: ``fn(model, batch) -> (loss,
    count)`` with ``loss`` the MEAN over the batch's ``count`` terms (examples, or tokens for
    a language model) as a scalar tensor and ``count`` a positive int.

    Use it when the loss needs more than ``loss_fn(model(x), y)``: dict or tuple batches, a
    language model's shifted next-token loss, masks. Data is then any iterable of batches (a
    single batch must be put in a list). The operator is the Hessian of the mean over all
    terms of all batches, ``sum_b count_b * loss_b / sum_b count_b``. Only ``kind="hessian"``
    (the GGN and empirical Fisher need the model outputs and per-example losses of the
    ``loss_fn(outputs, targets)`` form); no micro-batching (the engine cannot cut a batch it
    does not know).

    Args:
        fn: ``fn(model, batch) -> (loss, count)``; it calls ``model`` itself (the engine's
            modes apply: eval, batch norm per ``bn_mode``; buffers are restored afterwards).
    """

    def __init__(self, fn):
        if not callable(fn):
            raise UserError("BatchLoss needs a callable fn(model, batch) -> (loss, count)")
        self.fn = fn

    def __call__(self, model, batch) -> tuple[Tensor, int]:
        """The batch's mean loss and its number of terms, checked.

        Args:
            model: the network ``fn`` calls.
            batch: one batch, in whatever form ``fn`` takes.

        Returns:
            ``(loss, count)``: the mean loss as a 0-d tensor and the number of terms (int >= 1).

        Raises:
            UserError: ``fn`` returned something other than ``(scalar tensor, count >= 1)``.
        """
        result = self.fn(model, batch)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise UserError("a BatchLoss function must return (mean loss, number of terms)")
        loss, count = result
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("a BatchLoss function must return a scalar tensor (the batch's "
                            "mean loss) and a count")
        count = int(count)
        if count < 1:
            raise UserError(f"a BatchLoss function returned count {count}: it must be >= 1")
        return loss.reshape(()), count


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


def as_batches(data, pairs: bool = True) -> list:
    """``data`` as a list of ``(inputs, targets)`` pairs (``pairs=False``: a list of batches
    of any form, for a :class:`BatchLoss`).

    ``data`` is one pair (a tuple/list whose first item is a tensor) or an iterable of pairs;
    an iterator is consumed once. Raises :class:`UserError` if it is empty or malformed.
    """
    if not pairs:
        if isinstance(data, (Tensor, Mapping)):
            raise UserError("with a BatchLoss, data must be a list (or iterable) of batches")
        batches = list(data)
        if not batches:
            raise UserError("data is empty: pass a non-empty list of batches")
        return batches
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


# ----------------------------------------------------------------------------- structures
def output_tensors(outputs) -> list[Tensor]:
    """The floating tensors of a model's outputs (a tensor or a tuple/list/dict of them).

    Raises:
        UserError: the outputs hold no floating tensor.
    """
    leaves = [t for t in tree_flatten(outputs)[0]
              if torch.is_tensor(t) and t.is_floating_point()]
    if not leaves:
        raise UserError("the model's outputs must be a floating tensor or a tuple/list/dict "
                        f"of tensors; got {type(outputs).__name__}")
    return leaves


def rows(tree, index, count: int):
    """``tree`` (a tensor, or a tuple/list/dict of them) with every tensor whose first
    dimension is ``count`` indexed by ``index`` along it (other leaves unchanged)."""
    return tree_map(lambda t: t[index] if torch.is_tensor(t) and t.ndim and
                    t.shape[0] == count else t, tree)


# ----------------------------------------------------------------------------- probes
@contextlib.contextmanager
def engine_modes(model: nn.Module, bn_mode: str):
    """The modes of the engine's forward: eval, batch norm in ``bn_mode``; the caller's
    modes restored afterwards."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    try:
        model.eval()
        if bn_mode == "train":
            for m in modules:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode


def _engine_forward(model: nn.Module, bn_mode: str, x):
    with engine_modes(model, bn_mode):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return torch.func.functional_call(model, buffers, (x,)) if buffers else model(x)


def _probe_tolerance(dtype: torch.dtype) -> float:
    # relative: roundoff of different batch shapes is far below, batch statistics far above
    return float(torch.finfo(dtype).eps) ** 0.5


def batch_coupling(model: nn.Module, bn_mode: str, inputs: Tensor | None = None) -> str | None:
    """Why an example's output depends on the other examples of its batch in the engine's
    forward (so splitting the data changes the operator), or ``None`` when it does not.

    Batch norm counts in ``bn_mode="train"`` and, in any mode, with
    ``track_running_stats=False`` (it then always uses batch statistics). Other modules are
    probed when ``inputs`` [n, ...] (n >= 2) are given: two no-grad forward passes, on the
    first ``min(n, 8)`` rows and on the first half of them; the half's outputs must equal the
    same rows of the whole's to ``sqrt(eps)`` of the dtype, relative. Layer, group and
    instance norm pass; a model whose forward fails on a sub-batch counts as coupled.

    Returns:
        A short description of the coupling (for error messages), or ``None``.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if bn_mode == "train":
                return f"batch norm {name!r} in bn_mode 'train' (batch statistics)"
            if m.running_mean is None or m.running_var is None:
                return (f"batch norm {name!r} with track_running_stats=False (batch "
                        "statistics in every mode)")
    if inputs is None or not torch.is_tensor(inputs) or inputs.ndim == 0 or inputs.shape[0] < 2:
        return None
    first = next(model.parameters(), None)
    if first is not None:
        inputs = inputs.to(device=first.device,
                           dtype=first.dtype if inputs.is_floating_point() else None)
    whole = min(int(inputs.shape[0]), PROBE_ROWS)
    half = whole // 2
    with torch.no_grad():
        full = output_tensors(_engine_forward(model, bn_mode, inputs[:whole]))
        try:
            part = output_tensors(_engine_forward(model, bn_mode, inputs[:half]))
        except Exception as error:  # noqa: BLE001 - any failure means it is not per-example
            return f"a forward pass on {half} of {whole} examples fails ({error})"
    for a, b in zip(full, part):
        if a.ndim == 0 or a.shape[0] != whole or b.shape != (half, *a.shape[1:]):
            return "an output without one row per example"
        a, b = a[:half].to(torch.float64), b.to(torch.float64)
        scale = max(float(a.abs().max()), 1.0) if a.numel() else 1.0
        if not torch.allclose(a, b, rtol=0.0, atol=_probe_tolerance(full[0].dtype) * scale,
                              equal_nan=True):
            return (f"a layer that mixes the examples of a batch (the outputs of {half} "
                    f"examples change when they are evaluated among {whole})")
    return None


def loss_reduction_of(loss_fn, outputs, targets, count: int) -> str | None:
    """How ``loss_fn`` reduces over examples: ``"mean"`` or ``"sum"`` of the per-example
    losses ``loss_fn(rows(outputs, [n]), rows(targets, [n]))``, or ``None`` when it cannot
    matter or tell (fewer than 2 examples, or losses that vanish).

    Compares ``loss_fn`` on the first ``min(count, 8)`` examples with the mean and the sum
    of their per-example losses (no gradients; :func:`classify_reduction`); if both match
    (losses near 0), again at outputs moved by a fixed random step.

    Raises:
        UserError: ``loss_fn`` cannot be evaluated on one example, or is neither the mean
            nor the sum (class weights with ``reduction="mean"``, a per-batch term).
    """
    m = min(int(count), PROBE_ROWS)
    if m < 2:
        return None
    with torch.no_grad():
        outputs = rows(tree_map(lambda t: t.detach() if torch.is_tensor(t) else t, outputs),
                       slice(0, m), count)
        targets = rows(targets, slice(0, m), count)
        generator = torch.Generator().manual_seed(0)
        for attempt in range(2):
            if attempt:  # away from zero losses
                outputs = tree_map(lambda t: t + torch.randn(
                    t.shape, generator=generator, dtype=torch.float64).to(t)
                    if torch.is_tensor(t) and t.is_floating_point() else t, outputs)
            try:
                batch = loss_fn(outputs, targets)
                each = torch.stack([torch.as_tensor(loss_fn(rows(outputs, slice(n, n + 1), m),
                                                            rows(targets, slice(n, n + 1), m)))
                                    .reshape(()) for n in range(m)]).to(torch.float64)
            except Exception as error:  # noqa: BLE001 - reported as the user's problem
                raise UserError(f"loss_fn cannot be evaluated on one example ({error}): the "
                                "engine needs targets with one row per example, or wrap the "
                                "loss in BatchLoss") from None
            if not torch.is_tensor(batch) or batch.numel() != 1 or \
                    not batch.is_floating_point():
                raise UserError("loss_fn must return a floating-point scalar tensor (the mean "
                                f"loss of the batch); got {type(batch).__name__} "
                                f"{getattr(batch, 'dtype', '')}".rstrip())
            if not (torch.isfinite(batch).all() and torch.isfinite(each).all()):
                raise NonFiniteError(f"the loss of the first {m} examples is NaN or infinite: "
                                     "the inputs or the model's weights hold NaN or inf (or "
                                     "the model diverged); check them before measuring")
            found = classify_reduction(batch, each, _loss_dtype(outputs))
            if found is not None:
                return found
    return None


def classify_reduction(batch_loss, losses: Tensor, dtype: torch.dtype) -> str | None:
    """``"mean"`` or ``"sum"``: which of the per-example ``losses`` [m] the scalar
    ``batch_loss`` equals, to ``min(64 eps(dtype), 0.1)`` of ``sum |losses|``; ``None`` when it equals
    both (losses near 0, or ``m = 1``).

    Raises:
        UserError: it equals neither (e.g. class weights with ``reduction="mean"``).
    """
    batch = float(batch_loss)
    losses = losses.detach().to(torch.float64).reshape(-1)
    mean, total = float(losses.mean()), float(losses.sum())
    # at most 0.1: the mean and the sum of m >= 2 non-negative losses differ by >= half the sum
    rtol = min(64 * float(torch.finfo(dtype).eps), 0.1)
    tolerance = rtol * max(float(losses.abs().sum()), 1e-300)
    as_mean, as_sum = abs(batch - mean) <= tolerance, abs(batch - total) <= tolerance
    if as_mean and as_sum:
        return None
    if as_mean or as_sum:
        return "mean" if as_mean else "sum"
    raise UserError(f"loss_fn is neither the mean nor the sum of its per-example losses (on "
                    f"{losses.numel()} examples: {batch:.6g}, mean {mean:.6g}, sum "
                    f"{total:.6g}), e.g. class weights with reduction='mean' or padding "
                    "ignored in a mean: pass a mean- or sum-reduced loss without class "
                    "weights, or give it as BatchLoss(fn(model, batch) -> (mean, count))")


def _loss_dtype(outputs) -> torch.dtype:
    leaves = [t for t in tree_flatten(outputs)[0] if torch.is_tensor(t) and
              t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.float64


# ----------------------------------------------------------------------------- the graph


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
        names = _parameter_names(model)
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
        self._built: list[BatchGraph] | None = None
        self._versions = None
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
        if per_example:
            raise UserError(f"per-example gradients (the empirical Fisher) are undefined with "
                            f"{reason}, which couples the examples of a batch: use bn_mode "
                            "'eval' (and running statistics)")
        where = (f"the data come in {len(self._data)} batches" if several else
                 "the data are sharded over processes")
        raise UserError(f"{where}, but {reason} makes each example's output depend on the "
                        "other examples of its batch, so the split would change the operator: "
                        "pass the data as one (inputs, targets) batch without "
                        "micro_batch_size, or use bn_mode 'eval'")

    def _to_model(self, x: Tensor, y) -> tuple[Tensor, Tensor]:
        x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else None)
        if torch.is_tensor(y):
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

    # -- forward pass without side effects on the model
    def _model_modes(self):
        """Eval mode, batch norm in ``bn_mode``; the caller's modes restored afterwards."""
        return engine_modes(self.model, self.bn_mode)

    def _forward(self, x: Tensor):
        with self._model_modes():
            buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.forward_passes += 1
            with conv_double_backward(self.conv_double_backward), math_attention():
                if buffers:
                    return torch.func.functional_call(self.model, buffers, (x,))
                return self.model(x)

    def _batch_loss_term(self, batch) -> tuple[Tensor, int]:
        """``count * loss`` of a :class:`BatchLoss` batch. The modules' buffers are swapped
        for clones during the call (batch norm may update those), then put back."""
        swapped = [(m, name, b) for m in self.model.modules()
                   for name, b in m._buffers.items() if b is not None]
        with self._model_modes():
            self.forward_passes += 1
            try:
                for m, name, b in swapped:
                    m._buffers[name] = b.clone()
                with conv_double_backward(self.conv_double_backward):
                    loss, count = self.loss_fn(self.model, batch)
            finally:
                for m, name, b in swapped:
                    m._buffers[name] = b
        return loss * count, count

    def _loss_weight(self, outputs, y, count: int) -> float:
        """The batch's ``scale``: ``count`` for a mean-reduced ``loss_fn``, 1 for a sum
        (detected by :func:`loss_reduction_of` on the first batch of 2 or more examples)."""
        if self._loss_reduction_of_fn is None and outputs is not None:
            self._loss_reduction_of_fn = loss_reduction_of(self.loss_fn, outputs, y, count)
        return 1.0 if self._loss_reduction_of_fn == "sum" else float(count)

    def _scaled_loss(self, outputs, y, scale: float) -> Tensor:
        loss = self.loss_fn(outputs, y)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise UserError("loss_fn must return a scalar tensor (the mean loss of the batch)")
        return loss.reshape(()) * scale

    def _per_example_grads(self, x: Tensor, y) -> tuple:
        """``grad l_n`` per parameter [n_b, *shape] with ``l_n = loss_fn(f(x_n)[None],
        y_n[None])``, by ``torch.func.vmap(grad)``; tells (and checks) from their losses
        whether ``loss_fn`` is their mean or sum (:func:`classify_reduction`)."""
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
        found = classify_reduction(batch_loss, losses, self.dtype)
        if self._loss_reduction_of_fn is None:
            self._loss_reduction_of_fn = found
        elif found not in (None, self._loss_reduction_of_fn):
            raise UserError(f"loss_fn is a {found} over the examples of one batch and a "
                            f"{self._loss_reduction_of_fn} over another's: pass one reduction")
        return tuple(grads[n] for n in self.names)

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
        for item in self._data:
            yield self._build_batch(item, None) if self.batch_loss else self._build_batch(*item)

    def batches(self):
        """Yield one :class:`BatchGraph` per batch (cached when ``reuse_graph``)."""
        with torch.enable_grad():
            if not self.reuse_graph:
                built = []
                for batch in self._build_all():
                    built.append(batch)
                    yield batch
                self._count(built)
                return
            if self._built is None:
                self._built = list(self._build_all())
                self._versions = [p._version for p in self.params]
                self._count(self._built)
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
        for batch in self.batches():
            for k, op in enumerate(operators):
                pieces = op.batch_product(batch, parts[k])
                if pieces is None:
                    continue
                for target, piece in zip(targets[k], pieces):
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

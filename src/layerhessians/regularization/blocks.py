"""Which parameters a trace penalty covers: every trainable parameter, the paper's layers,
the middle layers by relative depth, or the original code's "middle" mask.

The trace of a set of disjoint blocks is the sum of their diagonal blocks' traces, which is
the trace of the curvature restricted to their union (the off-diagonal blocks have no
diagonal entries), so every selection is a list of leaf parameters taken once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from torch import nn

from layerhessians.curvature import layer_blocks, select_blocks
from layerhessians.errors import UserError, check_choice
from layerhessians.regularization.settings import BLOCK_RULES

#: relative depths (layer ``i`` of ``L`` sits at ``(i + 0.5) / L``) of the ``middle`` rule
MIDDLE_DEPTHS = (0.25, 0.75)


def middle_layers(model: nn.Module) -> "OrderedDict[str, list[nn.Parameter]]":
    """The middle layers: the layer blocks (:func:`~layerhessians.curvature.layer_blocks`,
    every Conv2d/Linear weight in module order) whose relative depth ``(i + 0.5) / L``
    lies in ``[0.25, 0.75]``.

    Layers, not parameter tensors, are what has a depth: the rule never splits a layer
    (the original's mask over the list of tensors could cut a weight from its bias, and
    its share of parameters depended on how many biases and batch-norm tensors a model
    has). LeNet's five layers give conv2, fc1 and fc2; a 1-layer model its only layer.

    Raises:
        UserError: the model has no Conv2d/Linear weight.
    """
    layers = layer_blocks(model)
    if not layers:
        raise UserError("blocks='middle' needs Conv2d/Linear layers; the model has none: "
                        "pass a mapping of blocks instead")
    count, (low, high) = len(layers), MIDDLE_DEPTHS
    chosen = OrderedDict((name, params) for i, (name, params) in enumerate(layers.items())
                         if low <= (i + 0.5) / count <= high)
    return chosen


def paper_middle(model: nn.Module) -> "OrderedDict[str, list[nn.Parameter]]":
    """The original code's ``middle`` mask: over the list of parameter tensors
    (``model.named_parameters()`` order, biases and batch-norm included), indices
    ``len // 4`` to ``3 * len // 4`` inclusive, one block per tensor. Reproduces its
    selection (LeNet: conv2.weight .. fc2.bias); prefer ``middle``.

    Raises:
        UserError: a selected tensor is frozen.
    """
    named = list(model.named_parameters())
    if not named:
        raise UserError("the model has no parameters")
    chosen = named[len(named) // 4: 3 * len(named) // 4 + 1]
    frozen = [name for name, p in chosen if not p.requires_grad]
    if frozen:
        raise UserError(f"blocks='paper-middle' selects frozen parameter {frozen[0]!r}: "
                        "unfreeze it or pass a mapping of blocks")
    return OrderedDict((name, [p]) for name, p in chosen)


def resolve_blocks(model: nn.Module, blocks=None) -> "OrderedDict[str, list[nn.Parameter]]":
    """The blocks a penalty sums the traces of, as ``{name: [leaf parameters]}``.

    Args:
        model: the network.
        blocks: ``None`` or ``"all"`` (one block ``"all"``: every trainable parameter, the
            full trace), a mapping ``{name: parameter(s) or module}`` (checked by
            :func:`~layerhessians.curvature.select_blocks`: disjoint, trainable leaves), or
            a rule: ``"layers"`` (every Conv2d/Linear weight), ``"middle"``
            (:func:`middle_layers`), ``"paper-middle"`` (:func:`paper_middle`).

    Returns:
        ``OrderedDict[str, list[nn.Parameter]]``, disjoint and non-empty.

    Raises:
        UserError: an unknown rule, an invalid mapping, or an empty selection.
    """
    if blocks is None or (isinstance(blocks, str) and blocks == "all"):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UserError("the model has no trainable parameters")
        return OrderedDict(all=params)
    if isinstance(blocks, Mapping):
        return select_blocks(model, mapping=blocks)
    if not isinstance(blocks, str):
        raise UserError(f"blocks must be None, a mapping {{name: parameters}} or one of "
                        f"{', '.join(BLOCK_RULES)}; got {type(blocks).__name__}")
    check_choice(blocks, BLOCK_RULES, "blocks")
    if blocks == "layers":
        chosen = layer_blocks(model)
        if not chosen:
            raise UserError("blocks='layers' found no Conv2d/Linear weight in the model: "
                            "pass a mapping of blocks instead")
        return chosen
    return middle_layers(model) if blocks == "middle" else paper_middle(model)


def block_parameters(blocks: Mapping) -> list:
    """The union of ``blocks``' parameters, each once, in order."""
    return list({id(p): p for params in blocks.values() for p in params}.values())

"""The parameters a curvature block differentiates: :func:`resolve_params` (a block given
as ``None``, a list or a ``{name: parameter}`` mapping, checked) and their qualified names."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from layerhessians.errors import UserError

__all__ = ["parameter_names", "resolve_params"]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``{id(parameter): qualified name}`` for every parameter of ``model``."""
    return {id(p): name for name, p in model.named_parameters()}


def resolve_params(model: nn.Module, params=None) -> tuple[list[nn.Parameter], list[str]]:
    """The block's parameters and their qualified names, in the order given.

    ``params``: ``None`` (every trainable parameter, in ``model.named_parameters()`` order), a
    list of parameters, or a ``{name: parameter}`` dict (names are taken from the model).
    Raises :class:`UserError` for an empty block, a frozen parameter, a parameter that is
    not the model's, or a repeated parameter.
    """
    names = parameter_names(model)
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

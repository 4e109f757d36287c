"""Parameter blocks of a model: the paper's layers, or any selection by module type,
parameter-name pattern or explicit mapping, always resolved to LEAF parameters, each once.

A *leaf* is a tensor of ``model.named_parameters()`` (what autograd differentiates). A layer
whose weight is computed (``torch.nn.utils.parametrizations.spectral_norm`` / ``weight_norm`` /
``orthogonal``, or the old hook API ``torch.nn.utils.spectral_norm`` / ``weight_norm``) is
resolved to the leaves it is computed from; a Parameter shared by two modules (a tied
embedding and LM head) is one leaf, named by its first name in ``model.named_parameters()``.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from layerhessians.errors import UserError, check_choice

__all__ = ["BLOCK_TYPES", "FULL", "LAYER_TYPES", "block_dims", "check_block_name", "is_layer",
           "is_transposed_linear", "layer_blocks", "select_blocks"]

from layerhessians.vocabulary import FULL  # noqa: F401  (re-exported: the whole Hessian's block name)

LAYER_TYPES = (nn.Conv2d, nn.Linear)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer with a transposed ``[in, out]`` weight,
    ``y = x @ weight + bias``: Hugging Face ``transformers``' ``Conv1D`` (GPT-2's layers),
    recognised by its class name and ``nf`` (out features) without importing transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and weight.shape[1] == module.nf)


def is_layer(module: nn.Module) -> bool:
    """Whether ``module``'s weight is one of the paper's layers: a Conv2d, a Linear, or a
    transposed Linear (:func:`is_transposed_linear`)."""
    return isinstance(module, LAYER_TYPES) or is_transposed_linear(module)

# module types select_blocks(by="type") uses by default
BLOCK_TYPES = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm,
    nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MultiheadAttention, nn.RNNBase,
)
BY = ("layer", "type", "pattern", "mapping")
GROUPS = ("parameter", "module")

Blocks = "OrderedDict[str, list[nn.Parameter]]"


@dataclass(frozen=True)
class _Unit:
    """One tensor a module uses (``module.<attr>``) and the leaf parameters it is made of."""

    module_name: str
    attr: str
    leaves: tuple  # nn.Parameter, in order
    holder: str  # name for several leaves: "fc.parametrizations.weight" or "fc.weight"

    @property
    def logical_name(self) -> str:
        return _join(self.module_name, self.attr)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hooked(module: nn.Module) -> dict[str, list[str]]:
    """``{attr: leaf attribute names}`` of the old hook API (spectral_norm, weight_norm)."""
    hooked = {}
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            hooked[hook.name] = [hook.name + "_orig"]
        elif isinstance(hook, WeightNorm):
            hooked[hook.name] = [hook.name + "_g", hook.name + "_v"]
    return hooked


def _units(model: nn.Module) -> list[_Unit]:
    """Every tensor each module uses, with its leaves, in ``named_modules()`` order; every
    parameter of the model is a leaf of at least one unit."""
    units, internal = [], set()
    for module_name, module in model.named_modules():
        if id(module) in internal:  # parametrization internals belong to their module's unit
            continue
        if parametrize.is_parametrized(module):
            internal.update(id(m) for m in module.parametrizations.modules())
            for attr, plist in module.parametrizations.items():
                holder = _join(module_name, f"parametrizations.{attr}")
                units.append(_Unit(module_name, attr, tuple(plist.parameters()), holder))
        hooked = _hooked(module)
        owner = {leaf: attr for attr, leaves in hooked.items() for leaf in leaves}
        emitted = set()
        for pname, p in module._parameters.items():
            if p is None:
                continue
            attr = owner.get(pname)
            if attr is None:
                units.append(_Unit(module_name, pname, (p,), _join(module_name, pname)))
            elif attr not in emitted:
                emitted.add(attr)
                leaves = tuple(module._parameters[n] for n in hooked[attr]
                               if module._parameters.get(n) is not None)
                units.append(_Unit(module_name, attr, leaves, _join(module_name, attr)))
    return units


class _Claims:
    """Builds blocks: trainable leaves only, each leaf in the first block that claims it."""

    def __init__(self, model: nn.Module):
        self.names = {id(p): n for n, p in model.named_parameters()}  # first name if tied
        self.claimed: set[int] = set()
        self.blocks: OrderedDict = OrderedDict()

    def free(self, leaves: Iterable) -> list:
        out, seen = [], set()
        for p in leaves:
            if p.requires_grad and id(p) not in self.claimed and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def add(self, name: str, leaves: Sequence) -> None:
        if leaves:
            self.claimed.update(id(p) for p in leaves)
            self.blocks.setdefault(name, []).extend(leaves)

    def unit_name(self, unit: _Unit, leaves: Sequence) -> str:
        return self.names[id(leaves[0])] if len(leaves) == 1 else unit.holder


def layer_blocks(model: nn.Module) -> Blocks:
    """The paper's layers: ``{name: [leaf parameters]}`` for the weight of every Conv2d/Linear
    (and transposed Linear, ``transformers.Conv1D``: :func:`is_transposed_linear`).

    In ``model.named_modules()`` order (input to output as defined). A plain weight is one
    leaf named by its qualified name (``"conv1.weight"``); a parametrized weight is resolved to
    its leaves (``"fc.parametrizations.weight.original"`` for spectral_norm or orthogonal,
    ``"fc.weight_orig"`` for the old ``torch.nn.utils.spectral_norm``; several leaves, as
    weight_norm's magnitude and direction, are named by what holds them:
    ``"fc.parametrizations.weight"`` or ``"fc.weight"``). A weight tied between modules is
    listed once, under its first name in ``model.named_parameters()``. Biases, normalisation
    parameters and frozen weights are not layer blocks.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``OrderedDict[str, list[nn.Parameter]]``, possibly empty.
    """
    claims = _Claims(model)
    modules = dict(model.named_modules())
    for unit in _units(model):
        if unit.attr == "weight" and is_layer(modules[unit.module_name]):
            leaves = claims.free(unit.leaves)
            if leaves:
                claims.add(claims.unit_name(unit, leaves), leaves)
    return claims.blocks


def select_blocks(model: nn.Module, by: str | None = None, *, types=None, patterns=None,
                  mapping=None, group: str = "parameter") -> Blocks:
    """Parameter blocks of any architecture, resolved to trainable leaf parameters, each once.

    Args:
        model: any ``nn.Module``.
        by: ``"layer"`` (:func:`layer_blocks`), ``"type"`` (modules that are instances of
            ``types``), ``"pattern"`` (parameter names matching ``patterns``) or ``"mapping"``
            (``mapping`` as given). Default: the one of ``types`` / ``patterns`` /
            ``mapping`` that is given, else ``"layer"``.
        types: module classes for ``by="type"`` (default :data:`BLOCK_TYPES`: Linear,
            Conv*, Embedding, LayerNorm, BatchNorm, MultiheadAttention, ...). A matching
            module contributes every parameter of its subtree (MultiheadAttention:
            ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``)
            not claimed by an earlier block.
        patterns: ``fnmatch`` globs on qualified parameter names (``"*"`` also matches
            dots), as a list (each must match a trainable parameter; grouped by ``group``)
            or a ``{block name: glob or list of globs}`` mapping (one block per entry; the
            entries must not share a parameter). A parametrized weight matches by its
            leaves' names or by its module name plus attribute (``"fc.weight"``).
        mapping: ``{block name: parameter, module or list of them}``: every parameter a
            trainable leaf of the model (a module stands for its trainable parameters), no
            parameter in two blocks, no empty block, ``"full"`` reserved.
        group: for ``by="type"`` and a list of patterns: ``"parameter"`` (one block per
            tensor a module uses, named as in :func:`layer_blocks`) or ``"module"`` (one
            block per module, named by its qualified name; the model itself: ``"model"``).

    Returns:
        ``OrderedDict[str, list[nn.Parameter]]`` in module order (mapping: in its order).
        Frozen parameters are skipped (a mapping refuses them).

    Raises:
        UserError: an unknown ``by``/``group``, arguments that do not fit ``by``, a pattern
            matching nothing, an invalid mapping, or an empty selection.
    """
    given = [k for k, v in (("type", types), ("pattern", patterns), ("mapping", mapping))
             if v is not None]
    if by is None:
        if len(given) > 1:
            raise UserError(f"pass only one of types, patterns, mapping (got {', '.join(given)})")
        by = given[0] if given else "layer"
    check_choice(by, BY, "by")
    unused = [k for k in given if k != by]
    if unused:
        raise UserError(f"by={by!r} does not use the {unused[0]} argument; drop it or pass "
                        f"by={unused[0]!r}")
    if group not in GROUPS:
        raise UserError(f"group must be 'parameter' or 'module'; got {group!r}")
    if by == "layer":
        blocks = layer_blocks(model)
    elif by == "type":
        blocks = _by_type(model, BLOCK_TYPES if types is None else types, group)
    elif by == "pattern":
        blocks = _by_pattern(model, patterns, group)
    else:
        blocks = _by_mapping(model, mapping)
    if not blocks:
        raise UserError(f"select_blocks(by={by!r}) selected no trainable parameter of the model")
    return blocks


def block_dims(blocks: Mapping) -> "OrderedDict[str, int]":
    """``{block name: number of scalar parameters}`` of blocks ``{name: parameter(s)}``."""
    return OrderedDict((name, sum(p.numel() for p in _as_list(params)))
                       for name, params in blocks.items())


def _as_list(params) -> list:
    return [params] if isinstance(params, (torch.Tensor, nn.Module)) else list(params)


def _module_block_name(name: str) -> str:
    return name if name else "model"


def _by_type(model, types, group) -> Blocks:
    types = tuple(types) if isinstance(types, (list, tuple)) else (types,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise UserError("types must be nn.Module classes, e.g. (nn.Linear, nn.LayerNorm)")
    units = _units(model)
    internal = {id(m) for _, mod in model.named_modules() if parametrize.is_parametrized(mod)
                for m in mod.parametrizations.modules()}
    claims = _Claims(model)
    for module_name, module in model.named_modules():
        if id(module) in internal or not isinstance(module, types):
            continue
        inside = [u for u in units if u.module_name == module_name or not module_name
                  or u.module_name.startswith(module_name + ".")]
        if group == "module":
            claims.add(_module_block_name(module_name),
                       claims.free(p for u in inside for p in u.leaves))
            continue
        for unit in inside:
            leaves = claims.free(unit.leaves)
            if leaves:
                claims.add(claims.unit_name(unit, leaves), leaves)
    return claims.blocks


def _matches(unit: _Unit, leaf, names, globs) -> bool:
    return any(fnmatch.fnmatchcase(names[id(leaf)], g) or fnmatch.fnmatchcase(unit.logical_name, g)
               for g in globs)


def _globs(value, what: str) -> list[str]:
    globs = [value] if isinstance(value, str) else list(value)
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise UserError(f"{what} must be a glob string or a list of them, e.g. 'blocks.*.attn.*'")
    return globs


def _by_pattern(model, patterns, group) -> Blocks:
    units = _units(model)
    claims = _Claims(model)
    trainable = [(u, p) for u in units for p in u.leaves if p.requires_grad]
    example = ", ".join(dict.fromkeys(claims.names[id(p)] for _, p in trainable[:3]))
    if isinstance(patterns, Mapping):
        for name, value in patterns.items():
            check_block_name(name)
            globs = _globs(value, f"the patterns of block {name!r}")
            leaves = [p for u, p in trainable if _matches(u, p, claims.names, globs)]
            if not leaves:
                raise UserError(f"block {name!r}: {globs} match no trainable parameter "
                                f"(names look like {example})")
            taken = [p for p in leaves if id(p) in claims.claimed]
            if taken:
                raise UserError(f"parameter {claims.names[id(taken[0])]!r} matches the "
                                f"patterns of block {name!r} and an earlier block; make "
                                "the blocks disjoint")
            claims.add(str(name), claims.free(leaves))
        return claims.blocks
    globs = _globs(patterns, "patterns")
    for g in globs:
        if not any(_matches(u, p, claims.names, [g]) for u, p in trainable):
            raise UserError(f"pattern {g!r} matches no trainable parameter "
                            f"(names look like {example})")
    for unit in units:
        leaves = claims.free(p for p in unit.leaves if _matches(unit, p, claims.names, globs))
        if leaves:
            name = (_module_block_name(unit.module_name) if group == "module"
                    else claims.unit_name(unit, leaves))
            claims.add(name, leaves)
    return claims.blocks


def check_block_name(name) -> None:
    """Refuse a block name that is not a non-empty string or is the reserved ``"full"``
    (the one check of block names, for every way of selecting blocks).

    Raises:
        UserError: naming the problem.
    """
    if not isinstance(name, str) or not name:
        raise UserError(f"block names must be non-empty strings; got {name!r}")
    if name == FULL:
        raise UserError(f"{FULL!r} is reserved for the full Hessian: rename that block")


def _graph_leaves(tensor: torch.Tensor, names) -> list[str]:
    """Names of the model parameters a computed tensor is made from (walks its autograd graph)."""
    found, stack, seen = [], [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in names:
            found.append(names[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return sorted(set(found))


def _by_mapping(model, mapping) -> Blocks:
    if not isinstance(mapping, Mapping):
        raise UserError("mapping must be a {block name: parameter(s)} dict")
    claims = _Claims(model)
    modules = {id(m) for m in model.modules()}
    units = _units(model)
    for name, value in mapping.items():
        check_block_name(name)
        items = _as_list(value)
        leaves = []
        for item in items:
            if isinstance(item, nn.Module):
                if id(item) not in modules:
                    raise UserError(f"block {name!r}: a module of the block is not a module of "
                                    "the model")
                own = {id(p) for p in item.parameters()}
                leaves.extend(dict.fromkeys(p for u in units for p in u.leaves
                                            if id(p) in own and p.requires_grad))
                continue
            if not isinstance(item, torch.Tensor):
                raise UserError(f"block {name!r}: items must be parameters or modules; got "
                                f"{type(item).__name__}")
            if id(item) not in claims.names:
                computed = _graph_leaves(item, claims.names) if item.grad_fn is not None else []
                hint = (f"it is computed from {', '.join(computed)}: pass those" if computed
                        else "pass tensors of model.parameters()")
                raise UserError(f"block {name!r}: a tensor of the block is not a leaf "
                                f"parameter of the model; {hint}")
            if not item.requires_grad:
                raise UserError(f"block {name!r}: parameter {claims.names[id(item)]!r} is "
                                "frozen (requires_grad=False); blocks need trainable parameters")
            leaves.append(item)
        if not leaves:
            raise UserError(f"block {name!r} is empty: give it at least one trainable parameter")
        seen = set()
        for p in leaves:
            if id(p) in claims.claimed:
                raise UserError(f"parameter {claims.names[id(p)]!r} is in block {name!r} and "
                                "an earlier block; each parameter may be in one block")
            if id(p) in seen:
                raise UserError(f"parameter {claims.names[id(p)]!r} appears twice in block "
                                f"{name!r}")
            seen.add(id(p))
        claims.add(name, leaves)
    return claims.blocks

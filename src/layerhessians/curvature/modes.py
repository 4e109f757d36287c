"""The engine's forward and backward passes and what they leave behind: nothing.

Every pass the engine runs or triggers (a graph's forward, a :class:`BatchLoss`, per-example
gradients, the probes, and the products, whose backward passes may re-run forwards through
checkpointed blocks) runs inside :func:`engine_context`, which

- enables autograd locally (calls from ``torch.no_grad()`` or ``torch.inference_mode()``
  work; inference-mode inputs are cloned into normal tensors by the graph);
- puts every module in eval mode, batch norm per ``bn_mode``, and ``nn.Embedding`` /
  ``nn.EmbeddingBag`` with ``sparse=False`` (same values, gradients dense; sparse gradients
  have no second derivative), the caller's settings restored afterwards;
- runs attention on its twice-differentiable math path (:func:`~.attention.math_attention`);
- swaps every module buffer for a clone during the pass (batch norm's running statistics and
  ``num_batches_tracked`` are never changed);
- forks the random number generators (CPU and every initialised CUDA device), seeded with
  :data:`ENGINE_SEED`: a forward that draws random numbers (a VAE's sampling) is then one
  fixed function, the same at every pass (each forward starts by :func:`reseed`), and the caller's streams continue as if the engine
  had never run;
- refuses ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``, whose recomputation
  second-order autograd cannot see (its block would count as zero curvature).
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

from layerhessians.curvature.attention import math_attention
from layerhessians.errors import UserError

__all__ = ["ENGINE_SEED", "call_model", "engine_context", "engine_forward", "engine_modes",
           "mode_difference", "reseed"]

#: the seed of the random number generators inside the engine's passes
ENGINE_SEED = 0

REENTRANT_CHECKPOINT = (
    "the model uses torch.utils.checkpoint with use_reentrant=True, whose recomputation "
    "second-order autograd cannot differentiate (the block would count as zero curvature): "
    "pass use_reentrant=False to checkpoint")


class _RefuseReentrant(torch.autograd.Function):
    """Stands in for torch's reentrant checkpoint function inside the engine's passes."""

    @staticmethod
    def forward(ctx, *args):  # pragma: no cover - apply refuses first
        raise UserError(REENTRANT_CHECKPOINT)

    @classmethod
    def apply(cls, *args, **kwargs):
        raise UserError(REENTRANT_CHECKPOINT)


@contextlib.contextmanager
def engine_modes(model: nn.Module, bn_mode: str):
    """The modes of the engine's passes: eval, batch norm in ``bn_mode``, embeddings with
    dense gradients; the caller's modes restored afterwards."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    sparse = [m for m in modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
              and getattr(m, "sparse", False)]
    try:
        model.eval()
        if bn_mode == "train":
            for m in modules:
                if _is_batch_norm(m):
                    m.train()
        for m in sparse:
            m.sparse = False
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.training = mode
        for m in sparse:
            m.sparse = True


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _codes(function):
    code = getattr(function, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        yield code
        stack += [c for c in code.co_consts if hasattr(c, "co_names")]


def _reads_training(functions) -> bool:
    return any("training" in code.co_names for f in functions for code in _codes(f))


def _class_functions(cls) -> list:
    """The functions a module class defines below ``nn.Module`` (properties' getters too)."""
    found = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for value in vars(klass).values():
            value = value.fget if isinstance(value, property) else value
            found.append(getattr(value, "__func__", value))
    return found


def mode_difference(model: nn.Module, bn_mode: str) -> str | None:
    """Why ``model`` called in its current modes may compute other values than inside
    :func:`engine_modes` ``(model, bn_mode)``, or ``None`` when both calls are one function.

    A module whose mode the engine switches counts as different when any code of its class
    (below ``nn.Module``) or of its forward hooks reads ``training`` (dropout, batch norm in
    the other mode, an RNN's or attention's dropout); a sparse embedding counts too (the
    engine makes its gradients dense). A static, conservative test: a module that reads its
    mode and happens to behave alike in both is still reported.
    """
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and getattr(module, "sparse",
                                                                            False):
            return f"{label} has sparse gradients"
        engine_training = bn_mode == "train" and _is_batch_norm(module)
        if module.training == engine_training:
            continue
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if _reads_training(_class_functions(type(module))) or _reads_training(hooks):
            mode = "train" if module.training else "eval"
            return f"{label} ({type(module).__name__}) reads its mode and is in {mode} mode"
    return None


@contextlib.contextmanager
def _cloned_buffers(model: nn.Module):
    swapped = [(m, name, b) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    try:
        for m, name, b in swapped:
            m._buffers[name] = b.clone()
        yield
    finally:
        for m, name, b in swapped:
            m._buffers[name] = b


def reseed(seed: int = ENGINE_SEED) -> None:
    """Seed the CPU and every initialised CUDA generator: called at the start of each engine
    forward, so that a forward that draws random numbers draws the same ones every time (only
    inside :func:`engine_context`, whose generators are forked)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.default_generators[device].manual_seed(seed)


@contextlib.contextmanager
def _forked_rng(seed: int):
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


@contextlib.contextmanager
def _no_reentrant_checkpoint():
    previous = torch_checkpoint.CheckpointFunction
    torch_checkpoint.CheckpointFunction = _RefuseReentrant
    try:
        yield
    finally:
        torch_checkpoint.CheckpointFunction = previous


@contextlib.contextmanager
def engine_context(model: nn.Module, bn_mode: str, seed: int = ENGINE_SEED):
    """The context of every pass the engine runs or triggers (see the module docstring).

    Args:
        model: the network.
        bn_mode: ``"eval"`` or ``"train"`` (batch norm's mode).
        seed: the seed of the forked random number generators.

    Yields:
        None.

    Raises:
        UserError: (inside) the model uses a reentrant checkpoint.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(engine_modes(model, bn_mode))
        stack.enter_context(math_attention())
        stack.enter_context(_cloned_buffers(model))
        stack.enter_context(_forked_rng(seed))
        stack.enter_context(_no_reentrant_checkpoint())
        yield


def call_model(model: nn.Module, x):
    """``model(x)``: every forward pass the engine runs goes through here, so that a forward
    that fails on the data (inputs of the wrong shape or dtype for the model) is one line
    naming the model and the inputs, not a traceback from inside the user's layers.

    Raises:
        UserError: the model's forward raised on ``x`` (its error is quoted).
    """
    try:
        return model(x)
    except UserError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the model's forward pass fails on the data (inputs {shape}): "
                        f"{first}; pass inputs the model takes (shape, dtype, device)") from None


def engine_forward(model: nn.Module, bn_mode: str, x, grad: bool = False,
                   seed: int = ENGINE_SEED):
    """``model(x)`` inside :func:`engine_context` (no gradients unless ``grad``)."""
    with engine_context(model, bn_mode, seed), torch.set_grad_enabled(grad):
        return call_model(model, x)

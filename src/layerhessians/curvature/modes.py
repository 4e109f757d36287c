"""The engine's forward pass: the modes it runs in (:func:`engine_modes`: eval, batch norm
per ``bn_mode``, the caller's modes restored afterwards) and a forward without side effects on
the model (:func:`engine_forward`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["engine_forward", "engine_modes"]


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


def engine_forward(model: nn.Module, bn_mode: str, x):
    """``model(x)`` in the engine's modes, with cloned buffers (the model's are not changed)."""
    with engine_modes(model, bn_mode):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return torch.func.functional_call(model, buffers, (x,)) if buffers else model(x)

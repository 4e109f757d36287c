"""The run store: the run directory (atomic writes, lock, journal, resume, reading runs back)
and the original code's file layout (legacy export).

``Run``, ``RunStore`` and ``load_run`` are imported on first use, so that modules needing
only :mod:`layerhessians.store.atomic` (figures, downloads) do not import torch.
"""

from importlib import import_module

__all__ = ["Run", "RunStore", "load_run"]


def __getattr__(name):
    if name in __all__:
        return getattr(import_module("layerhessians.store.runs"), name)
    raise AttributeError(f"module 'layerhessians.store' has no attribute {name!r}")

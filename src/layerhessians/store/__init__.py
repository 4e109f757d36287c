"""The run store: the run directory (atomic writes, lock, journal, resume, reading runs back)
and the original code's file layout (legacy export). One module per concept: names,
oserrors, atomic, manifest, journal, readers, checkpoints, consistency, place, recovery,
resume, writer (:class:`RunStore`), reader (:class:`Run`, :func:`load_run`), legacy; ``runs`` re-exports
the public names.

``Run``, ``RunStore`` and ``load_run`` are imported on first use, so that modules needing
only :mod:`layerhessians.store.atomic` (figures, downloads) do not import torch.
"""

from importlib import import_module

__all__ = ["Run", "RunStore", "load_run"]
_HOMES = {"Run": "reader", "RunStore": "writer", "load_run": "reader"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(f"layerhessians.store.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'layerhessians.store' has no attribute {name!r}")

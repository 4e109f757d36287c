"""The run store: the run directory (atomic writes, lock, resume, reading runs back) and
the original code's file layout (legacy export)."""

from layerhessians.store.runs import Run, RunStore, load_run

__all__ = ["Run", "RunStore", "load_run"]

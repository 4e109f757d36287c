"""The journal of a run directory's unfinished operation (``.layerhessians-op.json``).

Creating, overwriting and rewinding a run are journalled: the entry (``{"op": "create" |
"overwrite" | "rewind", ...}``) is written before the first destructive step and removed
after the last. The store's writer (:class:`~layerhessians.store.writer.RunStore`) finishes
an operation it finds there; readers refuse such a directory.
"""

import json
import os
from pathlib import Path

from layerhessians.store.atomic import fsync_dir
from layerhessians.store.manifest import write_json
from layerhessians.store.names import JOURNAL
from layerhessians.store.oserrors import os_errors

#: what an unreadable journal stands for: the deletion is the safe completion
_UNREADABLE = {"op": "overwrite"}


def begin(root, entry: dict):
    """Record the operation ``entry`` (with this process's PID) in the journal of ``root``."""
    write_json(Path(root) / JOURNAL, {**entry, "pid": os.getpid()})


def end(root):
    """Remove the journal of ``root`` (the operation is complete), durably."""
    root = Path(root)
    with os_errors("remove", root / JOURNAL):
        (root / JOURNAL).unlink(missing_ok=True)
        fsync_dir(root)


def pending(root) -> bool:
    """Whether ``root`` holds an unfinished operation (its journal)."""
    return (Path(root) / JOURNAL).exists()


def read(root) -> dict | None:
    """The unfinished operation of ``root`` (a dict with ``"op"``), or ``None`` without one;
    an unreadable journal reads as an overwrite."""
    path = Path(root) / JOURNAL
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return dict(_UNREADABLE)
    return entry if isinstance(entry, dict) and "op" in entry else dict(_UNREADABLE)

"""The journal of a run directory's unfinished operation (``.layerhessians-op.json``).

Creating, overwriting and rewinding a run are journalled: the entry (``{"op": "create" |
"overwrite" | "rewind", ...}``) is written before the first destructive step and removed
after the last. The store's writer (:class:`~layerhessians.store.writer.RunStore`) finishes
an operation it finds there; readers refuse such a directory.

A journal is only acted on when it is the store's own: a regular file (not a link) holding a
JSON object with exactly the keys its operation writes, of the right types, the SHA-256
digest of those keys, and the identity (inode) of the folder it was written in, so that a
journal copied from another run is not acted on (:func:`read`). Whether its operation fits the run (the manifest it
was written over, a checkpoint inside the run of the epoch it names) is checked by the
writer before it deletes anything. Anything else is refused in one line naming the journal,
and every file is left in place.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.store import atomic
from layerhessians.store.atomic import fsync_dir
from layerhessians.store.names import JOURNAL
from layerhessians.store.oserrors import os_errors

#: the keys each operation's entry holds (besides ``op``, ``pid`` and ``digest``)
KEYS = {"create": {}, "overwrite": {"manifest": str}, "rewind": {"epoch": int, "source": str}}
DIGEST = "digest"


def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def refusal(root, why: str) -> UserError:
    """The one-line refusal of the journal of ``root`` (nothing is changed)."""
    path = Path(root) / JOURNAL
    return UserError(f"{path} is not a journal this tool wrote or does not fit the run "
                     f"({why}); nothing was changed: if no layerhessians process is writing "
                     f"{Path(root)}, check its files and move the journal away, then run again")


def begin(root, entry: dict):
    """Record the operation ``entry`` (with this process's PID and the entry's digest) in
    the journal of ``root``."""
    entry = {**entry, "pid": os.getpid(), "folder": os.stat(root).st_ino}
    path = Path(root) / JOURNAL
    with os_errors("write", path), atomic.atomic_path(path) as tmp:  # not registered in the
        tmp.write_text(json.dumps({**entry, DIGEST: _digest(entry)}, indent=2) + "\n",
                       encoding="utf-8")  # manifest: an overwrite must not delete its journal


def end(root):
    """Remove the journal of ``root`` (the operation is complete), durably."""
    root = Path(root)
    with os_errors("remove", root / JOURNAL):
        (root / JOURNAL).unlink(missing_ok=True)
        fsync_dir(root)


def pending(root) -> bool:
    """Whether ``root`` holds an unfinished operation (its journal, or anything at its name)."""
    return os.path.lexists(Path(root) / JOURNAL)


def read(root) -> dict | None:
    """The unfinished operation of ``root`` (a dict with ``"op"``), or ``None`` without one.

    Raises:
        UserError: the journal is not the store's own (a link or not a regular file, not
            UTF-8 JSON, an unknown operation, missing, extra or mistyped keys, a digest that
            does not match); nothing is changed.
    """
    path = Path(root) / JOURNAL
    with os_errors("read", path):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(info.st_mode):
            raise refusal(root, "not a regular file")
        if info.st_size > 1 << 16:
            raise refusal(root, f"{info.st_size} bytes")
        raw = atomic.read_regular(path)
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refusal(root, "not JSON") from None
    if not isinstance(entry, dict) or entry.get("op") not in KEYS:
        raise refusal(root, "no known operation")
    keys = KEYS[entry["op"]]
    if set(entry) != {"op", "pid", "folder", DIGEST, *keys}:
        raise refusal(root, f"unexpected keys for a {entry['op']}")
    for key, kind in {"pid": int, "folder": int, **keys}.items():
        if isinstance(entry[key], bool) or not isinstance(entry[key], kind):
            raise refusal(root, f"{key} is not a {kind.__name__}")
    if entry[DIGEST] != _digest(entry):
        raise refusal(root, "its digest does not match its contents")
    with os_errors("read", root):
        if entry["folder"] != os.stat(root).st_ino:
            raise refusal(root, "it was written in another folder (copied here?)")
    return entry

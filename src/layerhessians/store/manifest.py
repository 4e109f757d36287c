"""The files a run directory's store wrote: its manifest (``.layerhessians-files.json``) and
the writers that record a file in it before creating it.

The store only ever deletes what its manifest lists, so ``--overwrite`` never removes a
user's own files, and it refuses to write over a file at one of its names that it did not
write. A run of an earlier version (no manifest, but a config.json this tool wrote) is
adopted with the names that version owned.
"""

import errno
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from layerhessians.errors import UserError
from layerhessians.store import atomic
from layerhessians.store.atomic import fsync_dir, remove_temporaries
from layerhessians.store.names import FIXED_FILES, FOLDERS, LEGACY_OWNED, MANIFEST
from layerhessians.store.oserrors import os_errors


# ----------------------------------------------------------------------------- writers
@contextmanager
def atomic_path(path):
    """The run directory's writer: :func:`layerhessians.store.atomic.atomic_path` for a file
    first added to the run's manifest (so ``--overwrite`` may delete it later), with OS errors
    as one-line :class:`UserError` s."""
    path = Path(path)
    with os_errors("write", path):
        register_output(path)
        with atomic.atomic_path(path) as tmp:
            yield tmp


def write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` atomically (registered in the run's manifest)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    """Write ``text`` (UTF-8) to ``path`` atomically (registered in the run's manifest)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (registered)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path, frame: pd.DataFrame):
    """Write ``frame`` as CSV (no index) to ``path`` atomically (registered)."""
    write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


# ----------------------------------------------------------------------------- manifest
def manifest_root(path: Path):
    """The run directory holding ``path`` (its parent or grandparent with a manifest)."""
    for parent in (path.parent, path.parent.parent):
        if (parent / MANIFEST).is_file():
            return parent
    return None


def read_manifest(root: Path) -> dict:
    """The manifest of the run directory ``root``: ``{"files": [...], "dirs": [...]}``
    (paths relative to ``root``).

    Raises:
        UserError: the manifest is unreadable or of the wrong shape.
    """
    try:
        data = json.loads(atomic.read_regular(root / MANIFEST).decode("utf-8"))
        files, dirs = data["files"], data["dirs"]
        if not isinstance(files, list) or not isinstance(dirs, list) or \
                not all(isinstance(x, str) for x in [*files, *dirs]):
            raise TypeError("non-string entry")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(f"{root / MANIFEST} (the list of files this tool wrote) is damaged "
                        f"({type(err).__name__}); delete the run directory's contents by hand, "
                        "or choose another -r") from None
    stray = next((x for x in [*files, *dirs] if not inside(x)), None)
    if stray is not None:
        raise UserError(f"{root / MANIFEST} (the list of files this tool wrote) names "
                        f"{stray[:80]!r}, which is not a path inside the run; nothing was "
                        "deleted: delete the run directory's contents by hand, or choose "
                        "another -r")
    return {"files": list(files), "dirs": list(dirs)}


def inside(rel: str) -> bool:
    """Whether the manifest entry ``rel`` names a path strictly inside the run directory:
    relative, not empty, without ``..``, ``.`` or empty components, backslashes or NUL."""
    parts = rel.split("/")
    return bool(rel) and not os.path.isabs(rel) and "\\" not in rel and "\0" not in rel \
        and all(p not in ("", ".", "..") for p in parts)


def manifest_digest(root: Path) -> str:
    """SHA-256 of the manifest's bytes (``""`` without one): the journal of an overwrite
    records it, so that only the manifest it was written over is acted on."""
    try:
        return hashlib.sha256(atomic.read_regular(Path(root) / MANIFEST)).hexdigest()
    except FileNotFoundError:
        return ""


def write_manifest(root: Path, manifest: dict):
    """Replace the manifest of ``root`` atomically."""
    with atomic.atomic_path(root / MANIFEST) as tmp:  # not atomic_path: it registers
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def register_output(path, root=None):
    """Record ``path`` (and its folders not yet created) in the manifest of the run
    directory that holds it (no-op outside a run). Call it before creating a file in a run
    directory by other means than the store's writers (figures, logs), so that
    ``--overwrite`` may delete it later."""
    path = Path(path)
    root = Path(root) if root is not None else manifest_root(path)
    if root is None:
        return
    try:
        rel = path.relative_to(root)
    except ValueError:
        return
    manifest = read_manifest(root)
    folders = [p.as_posix() for p in rel.parents if p != Path(".") and not (root / p).exists()]
    new_dirs = [d for d in folders if d not in manifest["dirs"]]
    if rel.as_posix() not in manifest["files"] or new_dirs:
        manifest["files"] = [*dict.fromkeys([*manifest["files"], rel.as_posix()])]
        manifest["dirs"] += new_dirs
        write_manifest(root, manifest)


def no_links_below(root: Path, rel: str) -> bool:
    """True when no component of ``root/rel`` below ``root`` is a symbolic link."""
    current = root
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            return False
    return True


def owned_file(root: Path, rel: str) -> bool:
    """Whether the manifest entry ``rel`` is a regular file (not a link) inside ``root``
    reached without following a link: the only kind of file the store deletes."""
    if not inside(rel) or not no_links_below(root, str(Path(rel).parent)):
        return False
    try:
        return stat.S_ISREG(os.lstat(root / rel).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False



# ----------------------------------------------------------------------------- ownership
def ensure_manifest(root: Path) -> dict:
    """The manifest of ``root``; a run of an earlier version (no manifest, but a config.json
    this tool wrote) gets one listing the names that version owned."""
    if (root / MANIFEST).exists():
        return read_manifest(root)
    files, dirs = [], []
    for name in LEGACY_OWNED:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            dirs.append(name)
            files += [p.relative_to(root).as_posix() for p in target.rglob("*")
                      if p.is_file() or p.is_symlink()]
        elif os.path.lexists(target):
            files.append(name)
    manifest = {"files": sorted(set(files) | set(FIXED_FILES)), "dirs": dirs}
    with os_errors("write", root / MANIFEST):
        write_manifest(root, manifest)
    return manifest


def foreign_files(root: Path) -> list:
    """The store's fixed names in ``root`` that hold something it did not write (files,
    links; folders shown with a trailing ``/`` when a link or a file stands there)."""
    owned = set(read_manifest(root)["files"]) if (root / MANIFEST).exists() else set()
    foreign = [n for n in FIXED_FILES if n not in owned and os.path.lexists(root / n)]
    foreign += [f"{d}/" for d in FOLDERS if (root / d).is_symlink()
                or (root / d).exists() and not (root / d).is_dir()]
    return foreign


def delete_owned(root: Path):
    """Delete the files and (if empty) folders the manifest of ``root`` lists, then the
    manifest: only regular files inside ``root`` (:func:`owned_file`; links, and anything
    below a link, are kept). A manifest naming a path outside the run is refused first,
    before anything is deleted (:func:`read_manifest`)."""
    if not (root / MANIFEST).exists():
        return
    manifest = read_manifest(root)
    with os_errors("delete files in", root):
        for rel in manifest["files"]:
            if owned_file(root, rel):
                (root / rel).unlink()
        for rel in sorted(manifest["dirs"], key=lambda r: -len(Path(r).parts)):
            target = root / rel
            if no_links_below(root, rel) and target.is_dir():
                remove_temporaries(target)
                try:
                    target.rmdir()
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
        (root / MANIFEST).unlink(missing_ok=True)
        fsync_dir(root)

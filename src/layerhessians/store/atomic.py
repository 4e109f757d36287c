"""The one atomic file writer: a temporary file ``.NAME.XXXXXXXX.tmp`` in the destination's
folder, fsynced, then ``os.replace``d over the destination, and the folder fsynced, so a reader
(or a crash, or a power loss) sees the old file or the new one, never a part. Files get the mode
the umask gives new files (``0o666 & ~umask``), not ``mkstemp``'s 0600.

Inside a run directory (a folder holding the store's manifest) no write follows a symbolic
link: a destination whose folder is reached through a link below the run directory is
refused (:func:`check_no_link`), so ``images/`` linked to another folder receives nothing.
Temporary names end in ``.tmp`` (``.NAME.XXXXXXXX.tmp.png`` when a writer needs the format's
suffix), so that :func:`remove_temporaries` finds every one a kill left."""

import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.store.names import MANIFEST

__all__ = ["DURABLE", "atomic_path", "check_no_link", "fsync_dir", "read_regular",
           "remove_temporaries"]

#: fsync files and folders at each replace (benchmarks switch it off to measure its cost)
DURABLE = True
# a temporary file of atomic_path: .NAME.XXXXXXXX.tmp (8 hex digits)
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]{1,8})?$")
#: how many folders above a destination are searched for the run directory holding it
_RUN_DEPTH = 4


def check_no_link(path) -> None:
    """Refuse ``path`` when it lies in a run directory (the nearest of its
    :data:`_RUN_DEPTH` folders above holding the store's manifest) but is reached through a
    symbolic link below it.

    Raises:
        UserError: naming the link.
    """
    parent = Path(path).parent
    chain = [parent, *list(parent.parents)[:_RUN_DEPTH - 1]]
    for depth, folder in enumerate(chain):
        if os.path.lexists(folder / MANIFEST) and not folder.is_symlink():
            for below in chain[:depth]:
                if below.is_symlink():
                    raise UserError(f"{below} is a symbolic link inside the run directory "
                                    f"{folder}; the store never writes through a link: "
                                    "remove it and run again")
            return


def read_regular(path) -> bytes:
    """The bytes of the regular file ``path``; anything else (a named pipe, a device, a
    folder) is refused before it is opened, so that it cannot hang the reader.

    Raises:
        UserError: ``path`` is not a regular file; OSError: it cannot be read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"{path} is not a regular file (a pipe, device or folder); the "
                        "store reads only its own files: remove it and run again")
    with open(path, "rb") as fh:
        return fh.read()


def fsync_dir(folder) -> None:
    """Call fsync on ``folder``, making a rename or a new entry in it durable (no-op if not DURABLE)."""
    if not DURABLE:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - folders cannot be opened on some systems
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a new, empty temporary path beside ``path`` (folders created); when the block
    ends without an exception, the file written there replaces ``path`` atomically (after
    fsync of the file and then of the folder). On an exception it is removed.

    Args:
        path: the destination file.
        suffix: the temporary file's suffix (writers that infer a format from it pass
            ``path``'s own suffix).
    """
    path = Path(path)
    check_no_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix == ".tmp" else ".tmp" + suffix
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - a name clash: draw another
            continue
    try:
        yield tmp
        if DURABLE:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(folder) -> None:
    """Delete the temporary files that killed :func:`atomic_path` writes left in ``folder``
    (``.NAME.XXXXXXXX.tmp``, ``.NAME.XXXXXXXX.tmp.SUFFIX``; links and sub-folders are not
    touched)."""
    for entry in os.scandir(folder):
        if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)

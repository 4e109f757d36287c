"""Where a run directory's writer writes: the directory it opened (held open by a file
descriptor, so that a rename, move or deletion of the folder while the run is written is
noticed before the next write), and no symbolic link below it."""

import os
from pathlib import Path

from layerhessians.errors import UserError

__all__ = ["OpenedFolder", "refuse_link"]


class OpenedFolder:
    """A folder held open (its identity: device and inode) to check that a path still names
    it. ``close()`` releases the descriptor."""

    def __init__(self, path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                           | getattr(os, "O_CLOEXEC", 0))

    def check(self):
        """Refuse to go on when ``self.path`` no longer names the folder opened (renamed,
        moved or deleted; a new folder at the same path is another one).

        Raises:
            UserError: one line naming the path.
        """
        if self._fd is None:
            return
        opened = os.fstat(self._fd)
        try:
            now = os.stat(self.path)
            same = (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)
        except OSError:
            same = False
        if not same or opened.st_nlink == 0:
            raise UserError(f"{self.path} is no longer the run directory this process opened "
                            "(it was renamed, moved or deleted during the run); stopped without "
                            "writing there: the committed epochs are where the folder went, "
                            "resume it from there with --resume")

    def close(self):
        """Release the folder's descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_link(*paths):
    """Refuse any of ``paths`` that is a symbolic link, or exists but is neither a regular
    file nor a folder (the store writes only into its own files and folders).

    Raises:
        UserError: naming the path.
    """
    for path in map(Path, paths):
        if path.is_symlink() or (path.exists() and not (path.is_file() or path.is_dir())):
            raise UserError(f"{path} is a symbolic link or not a regular file; the store "
                            "writes only into its own files and folders: remove it and run "
                            "again")

"""Operating-system errors (permissions, read-only or virtual file systems, a file where a
folder is expected, a full disk) as one :class:`~layerhessians.errors.UserError` line:
``cannot DOING PATH: reason; what to do``."""

import errno
from contextlib import contextmanager

from layerhessians.errors import UserError


def os_message(err: OSError, doing: str, path) -> str:
    """``cannot DOING PATH: reason; what to do`` for ``err`` (the hint follows its errno)."""
    reason = err.strerror or type(err).__name__
    if isinstance(err, PermissionError) or err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "check its permissions, or choose another location"
    elif err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        hint = "a file stands where a folder is expected (or the reverse); choose another path"
    elif err.errno == errno.ENOSPC:
        hint = "free some disk space"
    else:
        hint = "choose another location"
    return f"cannot {doing} {path}: {reason}; {hint}"


@contextmanager
def os_errors(doing: str, path):
    """Turn an ``OSError`` raised inside into one :class:`UserError` line
    (``cannot DOING PATH: reason; what to do``)."""
    try:
        yield
    except UserError:
        raise
    except OSError as err:
        raise UserError(os_message(err, doing, path)) from None


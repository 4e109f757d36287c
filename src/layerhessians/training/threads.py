"""The CPU thread count of torch's intra-op parallelism (``--threads N``).

torch uses one thread per core by default. When other processes share the cores, that
oversubscribes them and the same work runs several times slower; and reductions split across threads add in a different order, so float32
results depend on the thread count. A run therefore records the count it used (the
``threads`` key of ``config.json``) and a resumed run keeps it unless told otherwise.

- :func:`check_threads` ``(value) -> int | None``: validate a requested count.
- :func:`set_threads` ``(threads) -> int``: apply it (``None`` keeps torch's default) and
  return the count in effect, the value to record.
- :func:`resume_threads` ``(recorded, requested) -> (int | None, str | None)``: the count
  a resumed run uses and, when it differs from the recorded one, the warning to log.

- :func:`thread_limits` ``(threads)``: a context in which torch and the BLAS libraries of
  numpy/scipy (through threadpoolctl) use the same count, both restored afterwards. The exact
  layer spectra's eigenvalues come from LAPACK, whose rounding depends on its thread count,
  so a run is bit-identical to its resumed self only when BLAS threads are pinned too.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import Optional

import torch
from threadpoolctl import threadpool_limits

from layerhessians.errors import UserError

#: Key of the thread count in a run's ``config.json``.
THREADS_KEY = "threads"


def check_threads(value) -> Optional[int]:
    """Validate a requested thread count.

    Args:
        value: a positive integer, or ``None`` for torch's default.

    Returns:
        ``value`` as an ``int``, or ``None``.

    Raises:
        UserError: ``value`` is not a positive integer (booleans are refused).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise UserError(f"--threads must be a positive integer (e.g. 1 when other processes share the "
                        f"cores), got {value!r}")
    return int(value)


def set_threads(threads: Optional[int]) -> int:
    """Set the number of threads torch uses within an operation (``torch.set_num_threads``).

    Args:
        threads: a positive integer, or ``None`` to keep the current (by default one per core).

    Returns:
        The count now in effect (``torch.get_num_threads()``): what a run records.

    Raises:
        UserError: ``threads`` is not ``None`` or a positive integer.
    """
    threads = check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resume_threads(recorded, requested) -> tuple[Optional[int], Optional[str]]:
    """The thread count for continuing a run, and a warning if it breaks bit-identity.

    Without a request the run continues with its recorded count, so the continuation is
    the same, bit for bit, as an uninterrupted run on the same machine. A different request
    is honoured with a warning; the caller keeps ``recorded`` in ``config.json`` (the
    record says how the run started).

    Args:
        recorded: the ``threads`` value of the run's ``config.json`` (``None`` if absent).
        requested: ``--threads`` of the resuming command (``None`` if not given).

    Returns:
        ``(threads, warning)``: the count to pass to :func:`set_threads` (``None``: keep
        torch's default) and a one-line warning, or ``None`` when nothing changes.

    Raises:
        UserError: either count is not ``None`` or a positive integer.
    """
    recorded, requested = check_threads(recorded), check_threads(requested)
    if requested is None or requested == recorded:
        return recorded, None
    if recorded is None:
        return requested, (f"the run did not record its thread count; continuing with {requested} "
                           "thread(s): the continuation may not be bit-identical")
    return requested, (f"the run was trained with {recorded} thread(s) and continues with {requested}: "
                       f"the continuation is not bit-identical (config.json keeps threads={recorded})")


@contextmanager
def thread_limits(threads: Optional[int]) -> Iterator[int]:
    """Run a block with ``threads`` torch threads and as many BLAS threads (numpy, scipy).

    Args:
        threads: a positive integer, or ``None`` for torch's current count (BLAS follows it).

    Yields:
        The count in effect (what a run records).

    Raises:
        UserError: ``threads`` is not ``None`` or a positive integer.
    """
    previous = torch.get_num_threads()
    count = set_threads(threads)
    try:
        with threadpool_limits(limits=count):
            yield count
    finally:
        torch.set_num_threads(previous)

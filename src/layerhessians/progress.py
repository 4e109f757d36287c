"""Progress of long loops (training batches, epochs, Lanczos steps), on a terminal or not.

On a terminal, :class:`Progress` is a tqdm bar. When the output is not a terminal (a log
file, a batch job, a pipe) a bar would print nothing useful, so it logs a line instead at
most every ``interval`` seconds (30 by default) while the loop advances, and a background
heartbeat logs one even when a single step takes longer than that::

    Lanczos (full): 40/128 steps (31%), 1m02s elapsed, about 2m16s left

The estimate is linear: elapsed time per unit done times the units left. A loop that
logged anything ends with a "done" line. Lines go to a
:mod:`logging` logger at INFO (a run's logger writes them to its log file and console);
when that logger has no handlers or is not enabled for INFO they are written to ``stream``
(stderr) directly.

Usage mirrors tqdm's (``update``, ``set_postfix``, ``set_description``, ``close``, and
use as a context manager).
"""

import logging
import sys
import threading
import time
from typing import Callable, Optional

from tqdm import tqdm

#: Default seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL_S = 30.0

_log = logging.getLogger("layerhessians.progress")


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"2m05s"``, ``"1h02m"``: a duration for humans (rounded down to the second)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def is_terminal(stream) -> bool:
    """True when ``stream`` is an interactive terminal (``isatty``), False otherwise."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # closed or detached stream
        return False


class Progress:
    """Progress over ``total`` units: a tqdm bar on a terminal, else periodic log lines.

    Args:
        total: number of units expected (``None`` if unknown: no percentage or estimate).
        desc: what is being done, e.g. ``"epoch 3"`` or ``"Lanczos (full)"``.
        unit: the unit's name, e.g. ``"batch"``, ``"step"``.
        initial: units already done (a resumed loop); the estimate counts only new ones.
        disable: show nothing at all.
        logger: where the log lines go (default ``layerhessians.progress``).
        interval: seconds between log lines (> 0).
        stream: the output whose terminal-ness decides the mode; tqdm draws on it, and log
            lines are written to it when ``logger`` has no handlers. Default stderr.
        clock: monotonic clock in seconds (a fake one in tests).
        heartbeat: in log mode, a daemon thread that logs every ``interval`` seconds even
            when ``update`` is not called (a single slow step).
        leave: keep the tqdm bar on screen when closed.

    Raises:
        ValueError: ``interval`` is not positive.
    """

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", *, initial: int = 0,
                 disable: bool = False, logger: Optional[logging.Logger] = None,
                 interval: float = LOG_INTERVAL_S, stream=None, clock: Callable[[], float] = time.monotonic,
                 heartbeat: bool = True, leave: bool = False):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = int(initial)
        self.interval, self.clock = float(interval), clock
        self.logger = logger or _log
        self.stream = sys.stderr if stream is None else stream
        self.postfix = ""
        self.lines = 0
        self.start = self.last_line = clock()
        self._closed = False
        self._lock = threading.Lock()
        self._bar = None
        self._stop = threading.Event()
        self._thread = None
        self.mode = "off" if disable else ("bar" if is_terminal(self.stream) else "log")
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                             file=self.stream, dynamic_ncols=True)
        elif self.mode == "log" and heartbeat:
            self._thread = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ tqdm-like API
    def update(self, n: int = 1) -> None:
        """Record ``n`` more units done; in log mode, log a line if ``interval`` has passed."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            self._maybe_log()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        """Extra ``key=value`` pairs shown after the counts (e.g. the running loss)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix(refresh=refresh, **values)

    def set_description(self, desc: str) -> None:
        """Change what the progress is about."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        """Stop the heartbeat and close the bar (idempotent). In log mode, a loop that logged
        progress ends with a line saying it is done and how long it took."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        if self.lines:
            elapsed = format_duration(self.clock() - self.start)
            self._emit(f"{self.desc or 'progress'}: done, {self.n} {self.unit}s in {elapsed}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ log mode
    def line(self, now: Optional[float] = None) -> str:
        """The progress line: what, how far, time elapsed and (when ``total`` is known and
        some units are done) the estimated time left."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        done = self.n - self.initial
        if self.total:
            count = f"{self.n}/{self.total} {self.unit}s ({100.0 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {self.unit}s"
        text = f"{self.desc or 'progress'}: {count}, {format_duration(elapsed)} elapsed"
        if self.total and done > 0:
            left = elapsed / done * max(self.total - self.n, 0)
            text += f", about {format_duration(left)} left"
        elif self.total:
            text += ", time left unknown yet"
        if self.postfix:
            text += f" [{self.postfix}]"
        return text

    def _maybe_log(self) -> None:
        with self._lock:
            now = self.clock()
            if self._closed or now - self.last_line < self.interval:
                return
            self.last_line = now
            self.lines += 1
            text = self.line(now)
        self._emit(text)

    def _emit(self, text: str) -> None:
        if self.logger.isEnabledFor(logging.INFO) and self.logger.hasHandlers():
            self.logger.info(text)
        else:
            print(text, file=self.stream, flush=True)

    def _beat(self) -> None:
        # wake often enough that a line is never much later than `interval`
        pause = min(self.interval, max(self.interval / 10, 0.01))
        while not self._stop.wait(pause):
            self._maybe_log()


"""What a run prints: its log file and console lines on stderr (that do not break progress
bars), progress (a bar on a terminal, else log lines), and the one-line summary of an epoch."""

import logging
import math
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

from layerhessians import progress as _progress

log = logging.getLogger("layerhessians.training")
#: the engine's loggers whose lines also go to the run's log (fallbacks, memory choices,
#: progress of the Lanczos steps)
ENGINE_LOGGERS = ("layerhessians.spectra", "layerhessians.progress")


class TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break progress bars."""

    def emit(self, record):
        """Write ``record`` through ``tqdm.write`` (above any progress bar)."""
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class Silent:
    """The logger of the ranks that do not write."""

    def info(self, *args, **kwargs):
        """Drop the message (``warning`` is the same)."""
        pass

    warning = info


@contextmanager
def run_logging(log_path, console=True):
    """Log to ``log_path`` (appended, timestamped) and, if ``console``, to stderr: the run's
    lines and those of :data:`ENGINE_LOGGERS` (their other handlers are kept)."""
    handlers = [logging.FileHandler(log_path, encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if console:
        handlers.append(TqdmHandler(sys.stderr))
        handlers[-1].setFormatter(logging.Formatter("%(message)s"))
    loggers = [log, *map(logging.getLogger, ENGINE_LOGGERS)]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)
    try:
        yield log
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            for handler in handlers:
                logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        for handler in handlers:
            handler.close()


def progress_bar(disable, **kwargs) -> _progress.Progress:
    """Progress on stderr (:class:`~layerhessians.progress.Progress`): a tqdm bar on a
    terminal, else a line in the run's log at least every
    :data:`~layerhessians.progress.LOG_INTERVAL_S` seconds with the time left.
    ``disable``: ``True`` shows nothing; ``None`` or ``False`` show it."""
    kwargs.setdefault("interval", _progress.LOG_INTERVAL_S)  # read now: tests may lower it
    return _progress.Progress(disable=disable is True, logger=log, **kwargs)


def format_row(epoch: int, num_epochs: int, row: dict) -> str:
    """The log line of an epoch's metrics row (losses in nats, accuracies in percent)."""
    text = (f"epoch {epoch}/{num_epochs}  lr {row['lr']:.3g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"[train {row['train_seconds']:.1f}s, spectra {row['spectra_seconds']:.1f}s]")
    if math.isfinite(row["top_eigenvalue"]):
        text += f"  top eigenvalue {row['top_eigenvalue']:.4g}"
    return text

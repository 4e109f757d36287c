"""What a run prints: its log file and console lines (that do not break progress bars),
progress bars, and the one-line summary of an epoch."""

import logging
import math
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

log = logging.getLogger("layerhessians.training")


class TqdmHandler(logging.StreamHandler):
    """Console log lines that do not break progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class Silent:
    """The logger of the ranks that do not write."""

    def info(self, *args, **kwargs):
        pass

    warning = info


@contextmanager
def run_logging(log_path, console=True):
    """Log to ``log_path`` (appended, timestamped) and, if ``console``, to stdout."""
    log.setLevel(logging.INFO)
    log.propagate = False
    handlers = [logging.FileHandler(log_path, encoding="utf-8")]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if console:
        handlers.append(TqdmHandler(sys.stdout))
        handlers[-1].setFormatter(logging.Formatter("%(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


def progress_bar(disable, **kwargs):
    """A tqdm bar on stderr (``disable``: ``None`` shows it on a terminal only)."""
    return tqdm(disable=disable, dynamic_ncols=True, file=sys.stderr, **kwargs)


def format_row(epoch: int, num_epochs: int, row: dict) -> str:
    """The log line of an epoch's metrics row (losses in nats, accuracies in percent)."""
    text = (f"epoch {epoch}/{num_epochs}  lr {row['lr']:.3g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"[train {row['train_seconds']:.1f}s, spectra {row['spectra_seconds']:.1f}s]")
    if math.isfinite(row["top_eigenvalue"]):
        text += f"  top eigenvalue {row['top_eigenvalue']:.4g}"
    return text

"""Names in a run directory: its fixed files and folders, and the checks on run names given
by users (``-r``) and grid files.

Layout (see docs/architecture.md)::

    RUN/config.json          the run record (store/record.py: facts, spectra, blocks, ...)
    RUN/metrics.csv          one row per epoch (or per update of a SpectraTracker)
    RUN/spectra.csv          long table: epoch, block, vector, node, weight[, method]
    RUN/slq_fidelity.csv     with --validate-layer-spectra (written by the trainer)
    RUN/checkpoints/last.pt  latest full training state (the commit point of an epoch)
    RUN/checkpoints/epoch_EEEE.pt   weights every --save_freq epochs
    RUN/logs/train.log       what was printed
    RUN/images/              figures
    RUN/.lock                the writer's lock (holds its PID)
    RUN/.layerhessians-files.json   the files and folders the store wrote (its manifest)
    RUN/.layerhessians-op.json      an unfinished create/overwrite/rewind (its journal)
"""

import os
from pathlib import Path

from layerhessians.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.csv"
SPECTRA = "spectra.csv"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
LOCK = ".lock"
MANIFEST = ".layerhessians-files.json"
JOURNAL = ".layerhessians-op.json"
# the store's folders, and the files it writes at fixed names (registered on creation)
FOLDERS = (CHECKPOINTS, "logs", "images")
FIXED_FILES = (CONFIG, METRICS, SPECTRA, f"{CHECKPOINTS}/{LAST_CHECKPOINT}", "logs/train.log",
               "images/loss.png", "images/acc.png")
# names an earlier version of the store owned (adopted when a run has no manifest)
LEGACY_OWNED = (CONFIG, METRICS, SPECTRA, CHECKPOINTS, "logs", "images", "ckpt")


def run_path(value) -> Path:
    """``value`` (a ``-r`` argument) as a ``Path``; refuses an empty name.

    Raises:
        UserError: ``value`` is empty or blank (``-r ""`` would mean the working directory).
    """
    if value is None or not str(value).strip():
        raise UserError('the run directory is empty (-r ""); name a directory, e.g. -r runs/lenet')
    return Path(value)


def safe_child(root, name) -> Path:
    r"""``root / name`` for a run name from a grid file, refusing names that leave ``root``.

    Args:
        root: the folder the runs belong under.
        name: one path component: not empty, not absolute, no ``/`` or ``\\``, no ``..``,
            no NUL character.

    Returns:
        ``Path(root) / name``.

    Raises:
        UserError: the name could place the run outside ``root``.
    """
    text = name if isinstance(name, str) else None
    bad = (text is None or not text.strip() or text in (".",) or ".." in text or "/" in text
           or "\\" in text or "\0" in text or os.path.isabs(text)
           or (os.altsep is not None and os.altsep in text))
    if bad:
        raise UserError(f"run name {name!r} is not a plain folder name (no '/', '\\', '..', "
                        f"absolute paths or empty names); runs are placed under {root}")
    return Path(root) / text


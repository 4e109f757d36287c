"""The run directory: what a training run writes, how it resumes, and how it is read back.

Layout (see docs/architecture.md)::

    RUN/config.json          every setting, versions, device, dataset checksum, start time
    RUN/metrics.csv          one row per epoch
    RUN/spectra.csv          long table: epoch, block, vector, node, weight
    RUN/checkpoints/last.pt  latest full training state (the commit point of an epoch)
    RUN/checkpoints/epoch_EEEE.pt   weights every --save_freq epochs
    RUN/logs/train.log       what was printed
    RUN/images/              figures

Every file is written atomically (temporary file in the same folder, then ``os.replace``).
An epoch is committed in the order spectra -> metrics -> checkpoint; the checkpoint's epoch
is the last completed one. Rows of later epochs (a crash between the writes) are dropped
when the run resumes, and recomputed identically.
"""

import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from layerhessians.errors import UserError
from layerhessians.store.atomic import atomic_path
from layerhessians.vocabulary import FULL

CONFIG = "config.json"
METRICS = "metrics.csv"
SPECTRA = "spectra.csv"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
LOCK = ".lock"
SPECTRA_COLUMNS = ["epoch", "block", "vector", "node", "weight"]
METRICS_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                   "train_seconds", "spectra_seconds"]
# settings that may differ between a run and its resumption
VOLATILE_KEYS = frozenset({
    "num_epochs", "device", "resume", "overwrite", "run", "start_time", "versions",
    "progress", "save_freq", "export_legacy", "dataset_root", "download", "workers",
    "host", "resumed_at", "world_size", "micro_batch_size",
})
# files this package owns inside a run directory (removed by --overwrite)
OWNED = (CONFIG, METRICS, SPECTRA, CHECKPOINTS, "logs", "images", "ckpt")


# ----------------------------------------------------------------------------- atomic I/O
def write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path, frame: pd.DataFrame):
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_torch(path, obj):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path):
    """Load a checkpoint written by :func:`save_torch` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path, columns) -> pd.DataFrame:
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=columns)
    return pd.read_csv(path)


def config_differences(old: dict, new: dict, ignore=VOLATILE_KEYS) -> list:
    """``["key: old -> new", ...]`` for the settings that differ (``ignore`` keys skipped)."""
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in ignore]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)]


# ----------------------------------------------------------------------------- writer
class RunStore:
    """Writes one run directory; holds an exclusive lock on it while open.

    Use :meth:`create`; close (or use as a context manager) to release the lock.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock_fh = None
        self._metrics = None
        self._spectra = None

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: dict, *, resume=False, overwrite=False,
               ignore=VOLATILE_KEYS) -> "RunStore":
        """Open ``path`` for writing the run described by ``config``.

        A directory that already holds a run is continued with ``resume=True`` (same
        settings required, apart from ``ignore`` keys such as ``num_epochs``), replaced with
        ``overwrite=True``, and otherwise refused. ``resume=True`` on an empty directory
        starts a new run.
        """
        store = cls(path)
        if store.path.exists() and not store.path.is_dir():
            raise UserError(f"run path {store.path} exists and is not a directory; choose another -r")
        store.path.mkdir(parents=True, exist_ok=True)
        store._lock()
        try:
            store._prepare(config, resume=resume, overwrite=overwrite, ignore=ignore)
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self, config, *, resume, overwrite, ignore):
        old = self.config if (self.path / CONFIG).exists() else None
        if old is not None and overwrite:
            for name in OWNED:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            old = None
        if old is not None:
            diffs = config_differences(old, config, ignore)
            started = self.completed_epoch is not None or self.metrics.shape[0] > 0
            if diffs:
                raise UserError(
                    f"{self.path} holds a run with different settings ({'; '.join(diffs[:4])}"
                    f"{'; ...' if len(diffs) > 4 else ''}); use --overwrite to replace it, "
                    "or another run directory")
            if started and not resume:
                raise UserError(
                    f"{self.path} already holds this run (completed epoch "
                    f"{self.completed_epoch}); use --resume to continue it or --overwrite "
                    "to start over")
            merged = {**old, **{k: v for k, v in config.items() if k in ignore}}
            merged["start_time"] = old.get("start_time")
            merged["resumed_at"] = [*old.get("resumed_at", []), config.get("start_time")]
            config = merged
        for sub in (CHECKPOINTS, "logs", "images"):
            (self.path / sub).mkdir(exist_ok=True)
        write_json(self.path / CONFIG, config)
        self.truncate_after(self.completed_epoch)

    def _lock(self):
        fh = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise UserError(f"{self.path} is being written by another process (pid {owner}); "
                            "wait for it to finish or choose another run directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._lock_fh = fh

    def close(self):
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- state -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text())

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINTS / LAST_CHECKPOINT

    @property
    def log_path(self) -> Path:
        return self.path / "logs" / "train.log"

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def metrics(self) -> pd.DataFrame:
        if self._metrics is None:
            self._metrics = read_csv(self.path / METRICS, METRICS_COLUMNS)
        return self._metrics

    @property
    def spectra(self) -> pd.DataFrame:
        if self._spectra is None:
            self._spectra = read_csv(self.path / SPECTRA, SPECTRA_COLUMNS)
        return self._spectra

    def load_checkpoint(self):
        """The latest committed training state (a dict with ``"epoch"``), or ``None``."""
        if not self.checkpoint_path.exists():
            return None
        return load_torch(self.checkpoint_path)

    @property
    def completed_epoch(self):
        """The last committed epoch (0 = initialisation), or ``None`` before any."""
        state = self.load_checkpoint()
        return None if state is None else int(state["epoch"])

    # -- writing -----------------------------------------------------------------------
    def truncate_after(self, epoch):
        """Drop metrics and spectra rows after ``epoch`` (all rows if ``None``)."""
        limit = -1 if epoch is None else epoch
        for name, frame in ((METRICS, self.metrics), (SPECTRA, self.spectra)):
            if len(frame) and (frame["epoch"] > limit).any():
                kept = frame[frame["epoch"] <= limit].reset_index(drop=True)
                write_csv(self.path / name, kept)
                setattr(self, "_" + name.split(".")[0], kept)

    def commit_epoch(self, epoch: int, metrics_row: dict, spectra=None, checkpoint=None):
        """Write one completed epoch: its spectra, its metrics row, then its checkpoint.

        ``spectra``: mapping ``block -> measure`` (anything with ``to_frame()`` giving
        columns vector, node, weight) or ``None``. ``checkpoint``: a dict of tensors and
        plain containers (saved with ``"epoch"`` added) or ``None``.
        """
        if spectra:
            frames = [m.to_frame().assign(epoch=epoch, block=block)
                      for block, m in spectra.items()]
            new = pd.concat(frames, ignore_index=True)[SPECTRA_COLUMNS]
            self._spectra = self._replace_epoch(self.spectra, new, epoch)
            write_csv(self.path / SPECTRA, self._spectra)
        row = pd.DataFrame([{"epoch": epoch, **metrics_row}])
        self._metrics = self._replace_epoch(self.metrics, row, epoch)
        write_csv(self.path / METRICS, self._metrics)
        if checkpoint is not None:
            save_torch(self.checkpoint_path, {**checkpoint, "epoch": epoch})

    @staticmethod
    def _replace_epoch(frame, new, epoch):
        old = frame[frame["epoch"] != epoch] if len(frame) else None
        if old is None or not len(old):
            return new.reset_index(drop=True)
        return pd.concat([old, new], ignore_index=True)

    def save_weights(self, epoch: int, state_dict: dict):
        """Keep the model weights of ``epoch`` (``checkpoints/epoch_EEEE.pt``)."""
        save_torch(self.path / CHECKPOINTS / f"epoch_{epoch:04d}.pt", state_dict)


# ----------------------------------------------------------------------------- reader
@dataclass
class Run:
    """A run directory read back: settings, per-epoch metrics and the spectra."""

    path: Path
    config: dict
    metrics: pd.DataFrame
    spectra: pd.DataFrame = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self):
        return self.config.get("model")

    @property
    def dataset(self):
        return self.config.get("dataset")

    @property
    def blocks(self) -> list:
        """Block names: ``"full"`` first, then the layers from input to output."""
        present = list(dict.fromkeys(self.spectra["block"]))
        listed = [b for b in self.config.get("blocks", []) if b in present]
        return listed + [b for b in present if b not in listed]

    @property
    def layers(self) -> list:
        return [b for b in self.blocks if b != FULL]

    @property
    def epochs(self) -> list:
        """Epochs that have spectra, ascending (0 = at initialisation)."""
        return sorted(int(e) for e in self.spectra["epoch"].unique())

    def measure(self, block: str, epoch: int):
        """The :class:`~layerhessians.spectra.SpectralMeasure` of ``block`` at ``epoch``."""
        from layerhessians.spectra import SpectralMeasure

        rows = self.spectra[(self.spectra["epoch"] == epoch) & (self.spectra["block"] == block)]
        if rows.empty:
            raise UserError(f"run {self.path} has no spectrum for block {block!r} at epoch "
                            f"{epoch}; blocks: {', '.join(self.blocks)}; epochs: {self.epochs}")
        return SpectralMeasure.from_frame(rows[["vector", "node", "weight"]])

    def density(self, block: str, epoch: int, **kwargs):
        """``(grid, density)`` of ``block`` at ``epoch``; kwargs go to ``measure.density``."""
        return self.measure(block, epoch).density(**kwargs)


def load_run(path) -> Run:
    """Read the run directory ``path`` (written by ``layerhessians train``)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a LayerHessians run directory (no {CONFIG}); "
                        "pass the -r directory of a `layerhessians train` run")
    return Run(path=path, config=json.loads((path / CONFIG).read_text()),
               metrics=read_csv(path / METRICS, METRICS_COLUMNS),
               spectra=read_csv(path / SPECTRA, SPECTRA_COLUMNS))

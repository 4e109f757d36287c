"""Reading a run directory back (:func:`load_run`, :class:`Run`): settings, per-epoch
metrics and the spectra, each file read strictly (:mod:`layerhessians.store.readers`)."""

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from layerhessians.errors import UserError
from layerhessians.store import journal
from layerhessians.store.names import (
    CHECKPOINTS,
    CONFIG,
    LAST_CHECKPOINT,
    MANIFEST,
    METRICS,
    SPECTRA,
    run_path,
)
from layerhessians.store.oserrors import os_errors
from layerhessians.store.readers import METHOD, problem, read_config, read_metrics, read_spectra
from layerhessians.store.record import RunRecord
from layerhessians.vocabulary import FULL

__all__ = ["Run", "load_run"]


@dataclass
class Run:
    """A run directory read back: settings, per-epoch metrics and the spectra.

    ``config`` is config.json as stored; :attr:`record` reads it (whichever writer, whichever
    release wrote it) as a :class:`~layerhessians.store.record.RunRecord`."""

    path: Path
    config: dict
    metrics: pd.DataFrame
    spectra: pd.DataFrame = field(repr=False)

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.name

    @cached_property
    def record(self) -> RunRecord:
        """The run's record (:meth:`RunRecord.from_dict` of :attr:`config`)."""
        return RunRecord.from_dict(self.config)

    @property
    def model(self):
        """The model name recorded in config.json (``None`` if absent)."""
        return self.record.model

    @property
    def dataset(self):
        """The dataset name recorded in config.json (``None`` if absent)."""
        return self.record.dataset

    @property
    def blocks(self) -> list:
        """Block names: ``"full"`` first, then the layers from input to output."""
        present = list(dict.fromkeys(self.spectra["block"]))
        listed = [b for b in self.record.block_names if b in present]
        return listed + [b for b in present if b not in listed]

    @property
    def layers(self) -> list:
        """The layer blocks' names (every block but ``"full"``), input to output."""
        return [b for b in self.blocks if b != FULL]

    @property
    def epochs(self) -> list:
        """Epochs that have spectra, ascending (0 = at initialisation)."""
        return sorted(int(e) for e in self.spectra["epoch"].unique())

    def measure(self, block: str, epoch: int):
        """The :class:`~layerhessians.spectra.SpectralMeasure` of ``block`` at ``epoch``."""
        from layerhessians.spectra import SpectralMeasure  # imports torch: only when used

        rows = self.spectra[(self.spectra["epoch"] == epoch) & (self.spectra["block"] == block)]
        if rows.empty:
            raise UserError(f"run {self.path} has no spectrum for block {block!r} at epoch "
                            f"{epoch}; blocks: {', '.join(self.blocks)}; epochs: {self.epochs}")
        measure = SpectralMeasure.from_frame(rows[["vector", "node", "weight"]])
        if METHOD in rows.columns and rows[METHOD].notna().any():
            measure.method = str(rows[METHOD].dropna().iloc[0])
        return measure

    def density(self, block: str, epoch: int, **kwargs):
        """``(grid, density)`` of ``block`` at ``epoch``; kwargs go to ``measure.density``."""
        return self.measure(block, epoch).density(**kwargs)


def load_run(path) -> Run:
    """Read the run directory ``path`` (written by ``layerhessians train``): committed
    epochs only (rows after the checkpoint's epoch, written by a run killed before its
    checkpoint, are left out; the next ``--resume`` cuts them off).

    Raises:
        UserError: one line when ``path`` is not a run directory, an operation on it was
            interrupted (rerun the train command), or a file is unreadable or damaged.
    """
    path = run_path(path)
    with os_errors("read", path):
        if journal.pending(path):
            raise UserError(f"{path} has an unfinished operation (a create, overwrite or rewind "
                            "was interrupted); run the same `layerhessians train` command again "
                            "to finish it")
        if not (path / CONFIG).is_file():
            raise UserError(f"{path} is not a LayerHessians run directory (no {CONFIG}); "
                            "pass the -r directory of a `layerhessians train` run")
    config = read_config(path / CONFIG)
    try:
        RunRecord.from_dict(config)
    except UserError as err:
        raise problem(path / CONFIG, f"is not a run record: {err}") from None
    metrics, spectra = read_metrics(path / METRICS), read_spectra(path / SPECTRA)
    epoch = committed_epoch(path)
    if epoch is not False:  # the checkpoint is the commit point: later rows are not shown
        limit = -1 if epoch is None else epoch
        metrics = metrics[metrics["epoch"] <= limit].reset_index(drop=True)
        spectra = spectra[spectra["epoch"] <= limit].reset_index(drop=True)
    return Run(path=path, config=config, metrics=metrics, spectra=spectra)


def committed_epoch(path):
    """The last committed epoch of the run directory ``path``: that of its checkpoint
    (``checkpoints/last.pt``, read and digest-checked), ``None`` when the store wrote the
    run (it has a manifest) but committed no epoch yet, ``False`` for a run made by other
    means (no checkpoint, no manifest: every row counts)."""
    from layerhessians.store.checkpoints import checkpoint_epoch, load_torch  # imports torch

    last = Path(path) / CHECKPOINTS / LAST_CHECKPOINT
    with os_errors("read", last):
        if not last.is_file():
            return None if (Path(path) / MANIFEST).is_file() else False
    return checkpoint_epoch(load_torch(last), last)


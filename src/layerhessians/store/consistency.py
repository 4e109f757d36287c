"""Whether a run's files agree with each other and with the settings asked for: the epochs
of metrics.csv against the checkpoint's, the spectra's epochs and blocks against
metrics.csv and config.json, and the settings that must not change on resume."""

from pathlib import Path

from layerhessians.store.names import METRICS, SPECTRA
from layerhessians.store.readers import problem
from layerhessians.store.record import RunRecord

# settings that may differ between a run and its resumption
VOLATILE_KEYS = frozenset({
    "num_epochs", "device", "resume", "overwrite", "run", "start_time", "versions",
    "progress", "save_freq", "export_legacy", "dataset_root", "download", "workers",
    "host", "resumed_at", "world_size", "micro_batch_size",
})

def check_consistent(path, record: RunRecord, metrics, spectra, epoch):
    """Refuse a run whose files disagree: metrics.csv must hold each epoch exactly once,
    consecutively from 0 or 1 up to the checkpoint's ``epoch`` (none when ``epoch`` is
    ``None``); spectra.csv only measured epochs among those, each with every block.

    A run whose indices are not consecutive (:attr:`RunRecord.consecutive` false: a
    SpectraTracker's, updated every k steps or epochs) may skip indices: its metrics.csv
    must hold strictly increasing indices ending at the checkpoint's ``epoch``.

    Args:
        path: the run directory (named in the refusals).
        record: its config.json (:class:`~layerhessians.store.record.RunRecord`).
        metrics: its metrics.csv (:func:`~layerhessians.store.readers.read_metrics`).
        spectra: its spectra.csv (:func:`~layerhessians.store.readers.read_spectra`).
        epoch: the checkpoint's epoch (update index), or ``None`` without a checkpoint.

    Raises:
        UserError: naming the file and the disagreement.
    """
    path = Path(path)
    epochs = [int(e) for e in metrics["epoch"]]
    if epoch is None:
        if epochs:
            raise problem(path / METRICS, f"holds epochs {epochs[0]}..{epochs[-1]} but the "
                                          "run has no checkpoint (checkpoints/last.pt)")
    else:
        shown = f"{epochs[0]}..{epochs[-1]} ({len(epochs)} rows)" if epochs else "none"
        if not record.consecutive:
            increasing = all(a < b for a, b in zip(epochs, epochs[1:]))
            if not (epochs and epochs[0] >= 0 and increasing and epochs[-1] == epoch):
                raise problem(path / METRICS, f"does not hold increasing indices, each once, "
                                              f"ending at the checkpoint's {epoch} (holds "
                                              f"{shown})")
        else:
            first = epochs[0] if epochs else None
            if first not in (0, 1) or epochs != list(range(first, epoch + 1)):
                raise problem(path / METRICS, f"does not hold each epoch up to the "
                                              f"checkpoint's epoch {epoch} once (holds {shown})")
    if not len(spectra):
        return
    measured = sorted(set(int(e) for e in spectra["epoch"]))
    stray = [e for e in measured if e not in set(epochs)]
    if stray:
        raise problem(path / SPECTRA, f"holds epoch {stray[0]}, which metrics.csv lacks")
    expected = record.block_names or None
    pairs = spectra.groupby("epoch")["block"].agg(lambda s: set(s))
    for e in measured:
        have = pairs.loc[e]
        want = set(expected) if expected else set(spectra["block"])
        if have != want:
            lacking = sorted(want - have) or sorted(have - want)
            raise problem(path / SPECTRA, f"does not hold exactly the run's blocks at epoch "
                                          f"{e} (differs in {', '.join(lacking[:3])})")


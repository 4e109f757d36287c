"""``--export-legacy``: the original ``training_eigenspectrum.py``'s output files, for
scripts built on them (its ``plot_training_eigenspectrum.py`` and ``match_distros.py``).

Layouts (read from the original's writers and readers, yashkhasbage25/HTR,
``LayerHessians/experiments``):

- ``RUN/ckpt/training_eigenspectrum_full.npy``: float64 ``[2 * E, points]``; rows ``2i`` and
  ``2i + 1`` are the eigenvalue grid and the density of the full Hessian after the
  ``i``-th measured training epoch (the original measured every epoch, so row pair ``i`` is
  epoch ``i + 1``).
- ``RUN/ckpt/training_eigenspectrums_epoch_{i}_layer_{NAME}.npz``: arrays ``eigval`` (grid)
  and ``eigval_density`` (``[points]`` each) of layer block ``NAME`` (e.g.
  ``conv1.weight``) after training epoch ``i + 1`` (the original numbered from 0).

Densities are the SLQ quadrature smoothed on ``points`` grid points
(:meth:`SpectralMeasure.density`). The spectra at initialisation (epoch 0) have no slot in
these layouts and are not exported; with ``--hessian-every N > 1`` only the measured
epochs are written (the original's readers assume every epoch).
"""

import re
from pathlib import Path

import numpy as np

from layerhessians.errors import UserError
from layerhessians.store.manifest import atomic_path
from layerhessians.store.run import load_run
from layerhessians.vocabulary import FULL

LEGACY_DIR = "ckpt"
FULL_FILE = "training_eigenspectrum_full.npy"
LAYER_FILE = "training_eigenspectrums_epoch_{index}_layer_{name}.npz"
# a layer block's name as PyTorch spells parameters (``features.0.weight``): a file-name part
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def layer_file(run_dir, epoch: int, name: str) -> Path:
    """Path of the legacy ``.npz`` of layer ``name`` after training epoch ``epoch`` (>= 1).

    Raises:
        UserError: ``name`` is not a parameter name (path separators, ``..``, a leading dot
            or other characters), which could place the file outside ``RUN/ckpt/``.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise UserError(f"{Path(run_dir) / 'spectra.csv'} names a block {str(name)[:60]!r} "
                        "that is not a parameter name (letters, digits, '_', '.', '-'); the "
                        "legacy export writes nothing: fix or restore spectra.csv")
    return Path(run_dir) / LEGACY_DIR / LAYER_FILE.format(index=epoch - 1, name=name)


def _save_npz(path, **arrays):
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def _save_npy(path, array):
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def export_legacy(run_dir, epochs=None, points: int = 1024) -> list:
    """Write the legacy files of the run in ``run_dir``; returns the paths written.

    ``epochs``: the epochs whose layer files are (re)written (default: every measured epoch
    >= 1 whose files are missing). The full-Hessian ``.npy`` is always rebuilt from every
    measured epoch >= 1.
    """
    run = load_run(run_dir)
    for layer in run.layers:  # refuse hostile names before writing anything
        layer_file(run.path, 1, layer)
    measured = [e for e in run.epochs if e >= 1]
    present = set(zip(run.spectra["block"], run.spectra["epoch"].astype(int)))
    written = []
    for epoch in measured:
        for layer in run.layers:
            path = layer_file(run.path, epoch, layer)
            wanted = epoch in epochs if epochs is not None else not path.exists()
            if wanted and (layer, epoch) in present:
                grid, density = run.density(layer, epoch, points=points)
                _save_npz(path, eigval=np.asarray(grid, np.float64),
                          eigval_density=np.asarray(density, np.float64))
                written.append(path)
    rows = []
    for epoch in measured:
        if (FULL, epoch) in present:
            rows += [np.asarray(a, np.float64) for a in run.density(FULL, epoch, points=points)]
    if rows:
        path = run.path / LEGACY_DIR / FULL_FILE
        _save_npy(path, np.stack(rows))
        written.append(path)
    return written

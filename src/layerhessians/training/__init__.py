"""Training: typed run settings (:mod:`.config`), devices, distributed helpers, the run's
setup, seeding, checkpoint state, logging, the spectra hook and the epoch loop
(:func:`train`, in :mod:`.loop`).

``train`` is imported lazily, so that reading the settings (the CLI's ``--help``) does not
import torch.
"""

from importlib import import_module

__all__ = ["train", "TrainConfig", "HessianConfig", "TrainingDiverged"]
_API = {"train": "layerhessians.training.loop",
        "TrainingDiverged": "layerhessians.training.loop",
        "TrainConfig": "layerhessians.training.config",
        "HessianConfig": "layerhessians.training.config"}


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'layerhessians.training' has no attribute {name!r}")

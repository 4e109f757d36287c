"""Seeds of a run: one independent stream per (epoch, purpose), so that a resumed epoch sees
the same randomness as an uninterrupted run."""

import random

import numpy as np
import torch

_STREAMS = {"init": 0, "batches": 1, "train": 2, "spectra": 3, "certify": 4, "htr": 5}
STREAMS = tuple(_STREAMS)


def derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for ``stream`` (init, batches, train, spectra, certify) of ``epoch``, from
    ``seed`` (numpy ``SeedSequence``): independent of what ran before, so a resumed epoch
    sees the same randomness."""
    words = np.random.SeedSequence([int(seed), int(epoch), _STREAMS[stream]]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices) from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

"""Shared test settings: headless plotting, no progress bars, no network downloads."""

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
# tests never reach the real mirrors: an unset mirror would try the internet
os.environ.setdefault("LAYERHESSIANS_DATASET_MIRROR", "http://127.0.0.1:9/unreachable")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny problems: one torch thread avoids contention on the shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

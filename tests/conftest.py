"""Shared test settings: headless plotting, no progress bars, no network downloads."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
# tests never reach the real mirrors: an unset mirror would try the internet
os.environ.setdefault("LAYERHESSIANS_DATASET_MIRROR", "http://127.0.0.1:9/unreachable")

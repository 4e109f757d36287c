#!/usr/bin/env python3
"""Seed-compatible wrapper: ``python match_distros.py [RUN ...] [options]``.

Same as ``layerhessians match``: with no RUN it uses the 12 seed run directories
(``model=M,dataset=D,te,run1``) found in the working directory, and writes
``match_distros_wasserstein.png``, ``match_distros_peak.png`` and ``match_distros.csv``
in the working directory, as the original did (``layerhessians match`` writes next to the
runs instead), unless ``--out`` says otherwise; runs from any working directory.
"""

import sys
from pathlib import Path

try:
    import layerhessians  # noqa: F401
except ImportError:  # not installed: use the source tree next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerhessians.cli.main import main


def seed_arguments(argv) -> list:
    """``match`` arguments with the original's output folder (the working directory)."""
    argv = list(argv)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", "."]
    return ["match", *argv]


if __name__ == "__main__":
    sys.exit(main(seed_arguments(sys.argv[1:])))

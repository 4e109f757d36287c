#!/usr/bin/env python3
"""Seed-compatible wrapper: ``python plot_training_eigenspectrum.py -r RUN -m M -d D``.

Same as ``layerhessians plot -r RUN -m M -d D`` (figures into ``RUN/images/``); runs from
any working directory.
"""

import sys
from pathlib import Path

try:
    import layerhessians  # noqa: F401
except ImportError:  # not installed: use the source tree next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerhessians.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))

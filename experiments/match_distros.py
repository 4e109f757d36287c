#!/usr/bin/env python3
"""Seed-compatible wrapper: ``python match_distros.py [RUN ...] [options]``.

Same as ``layerhessians match``: with no RUN it uses the 12 seed run directories
(``model=M,dataset=D,te,run1``) found in the working directory, and writes
``match_distros_wasserstein.png``, ``match_distros_peak.png`` and ``match_distros.csv``
there; runs from any working directory.
"""

import sys
from pathlib import Path

try:
    import layerhessians  # noqa: F401
except ImportError:  # not installed: use the source tree next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerhessians.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["match", *sys.argv[1:]]))

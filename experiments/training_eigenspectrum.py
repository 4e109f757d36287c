#!/usr/bin/env python3
r"""The seed's ``training_eigenspectrum.py``, as a thin wrapper over ``layerhessians train``.

Accepts the seed README's command lines verbatim, e.g.::

    python3 training_eigenspectrum.py -lr 1e-2 -l2 0 -n 50 -o sgd -d MNIST -b 256 -m LeNet \
        --cuda 2 -r "model=LeNet,dataset=MNIST,te,run1"

Every flag and default is the seed's (``layerhessians train --help``); ``--cuda N`` on a
machine without that GPU stops with a message listing the devices (use ``--device cpu``).
Differences: ``--dataset_root`` defaults to this repository's ``datasets/`` (the seed's
``../datasets`` when run from ``experiments/``); the outputs follow the run-directory
layout of ``layerhessians train`` (add ``--export-legacy`` for the original's
``ckpt/*.npy``/``*.npz`` files); ``--resume`` alone continues the run in ``-r``.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from layerhessians.cli.main import main as cli_main
    except ImportError:  # a source checkout that was not installed
        sys.path.insert(0, str(REPO / "src"))
        from layerhessians.cli.main import main as cli_main
    if not any(a == "--dataset_root" or a.startswith("--dataset_root=") for a in argv) \
            and not any(a in ("-h", "--help") for a in argv):
        argv += ["--dataset_root", str(REPO / "datasets")]
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())

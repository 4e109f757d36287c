#!/usr/bin/env python3
"""The original's ``plot_penalization.py -r RUN``: the last epoch's test top-1 and top-5
accuracy over the reruns ``RUN,run1`` .. ``RUN,runR`` (or ``RUN`` alone) as mean +- sample
std (n stated; the original printed numpy's ddof=0 std), and the generalisation gap."""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import layerhessians  # noqa: F401
except ImportError:  # a source checkout that was not installed
    sys.path.insert(0, str(REPO / "src"))


def main(argv=None) -> int:
    from layerhessians.analysis.regularization import format_summary
    from layerhessians.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-r", required=True, metavar="RUN", help="run directory (without ,runK)")
    args = p.parse_args(argv)
    try:
        print(format_summary(args.r))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The original's ``middle_penalization.py`` (Regularization/experiments), its flags verbatim,
over ``layerhessians train`` (see penalization.py beside this file for the flags, the
defaults and the differences from the original)."""

import sys

from penalization import main

if __name__ == "__main__":
    sys.exit(main("middle"))

"""``python -m layerhessians``: the ``layerhessians`` command (:func:`layerhessians.cli.main.main`)."""

import sys

from layerhessians.cli.main import main

sys.exit(main())

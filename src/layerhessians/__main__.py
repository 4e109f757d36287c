import sys

from layerhessians.cli.main import main

sys.exit(main())

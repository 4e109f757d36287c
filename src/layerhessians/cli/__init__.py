"""The ``layerhessians`` command line: parsing only; every subcommand calls the library."""

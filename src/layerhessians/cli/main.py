"""The ``layerhessians`` command: ``train | plot | match | reproduce | sweep | datasets``.

Each subcommand lives in ``layerhessians.cli.<name>`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. User errors (:class:`UserError`) are
printed as one line, without a traceback, and exit with status 2.
"""

import argparse
import sys
from importlib import import_module

from layerhessians import __version__
from layerhessians.errors import UserError

COMMANDS = ("train", "plot", "match", "reproduce", "sweep", "datasets")


def _load(name):
    try:
        return import_module(f"layerhessians.cli.{name}")
    except ModuleNotFoundError as err:  # a subcommand not built yet
        if err.name == f"layerhessians.cli.{name}":
            return None
        raise


def build_parser(only=None) -> argparse.ArgumentParser:
    """The argument parser; ``only`` restricts it to one subcommand (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="layerhessians",
        description="Full and layer-wise Hessian eigenspectra of deep networks through training.",
    )
    parser.add_argument("--version", action="version", version=f"layerhessians {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        module = _load(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if only is not None:  # the top-level help lists the commands only (fast start-up)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"layerhessians {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerhessians {args.command}: interrupted; completed work is kept "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``layerhessians`` command: ``train | plot | match | reproduce | sweep | datasets``.

Each subcommand lives in ``layerhessians.cli.<name>`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Every error the user can fix is printed
as ONE line, without a traceback, and exits with status 2: a :class:`UserError` (settings
errors in the CLI's spelling, see :class:`~layerhessians.errors.SettingError`), a bad
command line (:class:`UsageError`, with a close match for a mistyped option or choice) and
an operating-system error (a path that cannot be created, read or written).
"""

import argparse
import re
import sys
from importlib import import_module

from layerhessians import __version__
from layerhessians.errors import SettingError, UserError, suggest

COMMANDS = ("train", "plot", "match", "reproduce", "sweep", "datasets")


class UsageError(UserError):
    """A command line that argparse rejects (unknown option, bad value, missing argument)."""


def did_you_mean(word: str, options) -> str:
    """``" (did you mean X?)"`` for the option closest to ``word`` (:func:`suggest`), or
    ``""``."""
    close = suggest(word, options)
    return f" (did you mean {close[0]}?)" if close else ""


def _explain(message: str, parser: argparse.ArgumentParser) -> str:
    """Rewrite argparse's message in our words, with a close match where one exists."""
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        words = unknown.group(1).split()
        options = [w for w in words if w.startswith("-")]
        if not options:
            return f"unexpected argument {words[0]}"
        name = options[0].split("=", 1)[0]
        known = [s for a in parser._actions for s in a.option_strings]
        return f"unknown option {name}{did_you_mean(name, known)}"
    choice = re.match(r"(argument [^:]+): invalid choice: '?([^' ]*)'? \(choose from (.*)\)$",
                      message)
    if choice:
        label, value, choices = choice.groups()
        names = [c.strip().strip("'\"") for c in choices.split(",")]
        return (f"{label}: invalid choice {value!r}{did_you_mean(value, names)}; choose one of "
                f"{', '.join(names)}")
    return message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` (one line, exit 2, printed by
    :func:`main`) instead of printing the usage; subcommand parsers are of this class too.
    ``command_parser``: on the top-level parser, the chosen subcommand's (whose options a
    misspelled one is matched against)."""

    command_parser = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --hessian-iteration is a typo, not a prefix
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Raise argparse's complaint as a one-line :class:`UsageError` (never prints or exits).

        Args:
            message: argparse's error message.

        Raises:
            UsageError: always; the message names the offending option or choice, a close
                match where one exists, and the ``--help`` to read.
        """
        target = self.command_parser or self
        raise UsageError(f"{_explain(message, target)}; see `{target.prog} --help`")


def _load(name):
    try:
        return import_module(f"layerhessians.cli.{name}")
    except ModuleNotFoundError as err:  # a subcommand not built yet
        if err.name == f"layerhessians.cli.{name}":
            return None
        raise


def build_parser(only=None) -> argparse.ArgumentParser:
    """The argument parser; ``only`` restricts it to one subcommand (fast start-up)."""
    parser = Parser(
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
            parser.command_parser = p
    return parser


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, what to do."""
    reason = err.strerror or type(err).__name__
    where = f": {err.filename}" if err.filename is not None else ""
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    hint = {
        "PermissionError": "choose a folder you may write to, or fix its permissions",
        "FileExistsError": "a file is in the way of a folder: remove it or choose another path",
        "NotADirectoryError": "a file is in the way of a folder: remove it or choose another path",
        "IsADirectoryError": "a folder is in the way of a file: choose another path",
        "FileNotFoundError": "check the path (its parent folders must exist or be creatable)",
    }.get(type(err).__name__, "check the path, its permissions and the free disk space")
    return f"{reason}{where}; {hint}"


def main(argv=None) -> int:
    """Run the ``layerhessians`` command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: the subcommand's (0 on success), 0 for bare ``--help``, 2 for an
        error the user can fix (printed as one line on stderr: a :class:`UserError`, a bad
        command line, an operating-system error) or a missing command, 130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    command = only or "COMMAND"
    try:
        parser = build_parser(only)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv else 2
        return int(args._run(args) or 0)
    except UsageError as err:
        prog = "layerhessians" if only is None else f"layerhessians {only}"
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        message = err.spelled("cli") if isinstance(err, SettingError) else str(err)
        print(f"layerhessians {command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"layerhessians {command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerhessians {command}: interrupted; completed work is kept "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

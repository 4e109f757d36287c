"""Run grids: a list of training runs (run directory name + ``layerhessians train`` flags).

A grid file is JSON: ``{"description": ..., "runs": [{"run": NAME, "flags": {dest: value}}]}``
where each flag is named by its ``layerhessians train`` destination (``learning_rate``,
``weight_decay``, ``hessian_iterations``, ...; see ``layerhessians train --help``). The
shipped grids are in ``layerhessians/configs/``: ``seed.json`` (the seed README's 12 runs)
and ``quick.json`` (the embedded-default grid on Digits).
"""

import argparse
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.store.runs import RunStore

SHIPPED = ("seed", "quick")


@dataclass
class GridRun:
    """One run of a grid: its directory name and its ``train`` flags (by destination)."""

    run: str
    flags: dict = field(default_factory=dict)

    def path(self, root) -> Path:
        return Path(root) / self.run

    def argv(self, root, extra=()) -> list:
        """The ``layerhessians train`` command line of this run, under ``root``."""
        return ["-r", str(self.path(root)), *flags_to_argv(self.flags), *extra]

    def completed_epoch(self, root):
        """The last committed epoch of this run under ``root``, or ``None``."""
        path = self.path(root)
        return RunStore(path).completed_epoch if path.is_dir() else None

    def is_complete(self, root) -> bool:
        done = self.completed_epoch(root)
        return done is not None and done >= int(self.flags.get("num_epochs", 0))


def load_grid(name_or_path) -> list:
    """The runs of a shipped grid (``"seed"``, ``"quick"``) or of a grid JSON file."""
    if str(name_or_path) in SHIPPED:
        text = resources.files("layerhessians.configs").joinpath(f"{name_or_path}.json").read_text()
        source = f"shipped grid {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"grid file {path} not found; pass a JSON grid file or one of "
                            f"{', '.join(SHIPPED)}")
        text, source = path.read_text(), str(path)
    try:
        entries = json.loads(text)["runs"]
        runs = [GridRun(run=str(e["run"]), flags=dict(e.get("flags", {}))) for e in entries]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{source} is not a grid file ({err}); expected "
                        '{"runs": [{"run": NAME, "flags": {...}}, ...]}') from None
    names = [r.run for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{source} names a run directory twice; run names must be unique")
    return runs


def _train_parser() -> argparse.ArgumentParser:
    from layerhessians.cli import train

    parser = argparse.ArgumentParser(add_help=False)
    train.add_arguments(parser)
    return parser


def flags_to_argv(flags: dict) -> list:
    """``{"learning_rate": 0.01, "augment": True}`` -> ``["--learning_rate", "0.01", "--augment"]``.

    Flags are matched to ``layerhessians train`` options by destination name, so a grid file
    stays valid whatever spelling (``-lr``, ``--learning_rate``) the option has.
    """
    options = {}
    for action in _train_parser()._actions:
        if action.option_strings:
            long = [s for s in action.option_strings if s.startswith("--")]
            options[action.dest] = (long or action.option_strings)[0], action
    argv = []
    for dest, value in flags.items():
        if dest not in options:
            raise UserError(f"grid flag {dest!r} is not a `layerhessians train` option; see "
                            "`layerhessians train --help` (use destination names such as "
                            "learning_rate)")
        option, action = options[dest]
        if action.nargs == 0:  # store_true / store_false switches
            if bool(value) == (action.const if action.const is not None else True):
                argv.append(option)
        elif isinstance(value, (list, tuple)):
            argv += [option, *map(str, value)]
        elif value is not None:
            argv += [option, str(value)]
    return argv

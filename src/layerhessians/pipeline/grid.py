"""Run grids: a list of training runs (run directory name + settings), read into typed
:class:`~layerhessians.training.config.TrainConfig` objects (no command line in between).

A grid file is JSON: ``{"description": ..., "runs": [{"run": NAME, "flags": {dest: value}}]}``
where each setting is named by its ``layerhessians train`` destination (``learning_rate``,
``weight_decay``, ``hessian_iterations``, ...; see ``layerhessians train --help`` and
:func:`~layerhessians.training.config.apply_flags`). The shipped grids are in
``layerhessians/configs/``: ``seed.json`` (the seed README's 12 runs) and ``quick.json``
(the embedded-default grid on Digits).
"""

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.store.names import safe_child
from layerhessians.store.writer import RunStore
from layerhessians.training.config import (
    TrainConfig,
    apply_flags,
    check_types,
    setting_flags,
)

SHIPPED = ("seed", "quick", "htr-seed", "htr-quick")  # htr-*: pipeline.regularization_grid


def flags_to_config(flags: dict, validate: bool = True) -> TrainConfig:
    """The :class:`TrainConfig` of settings named by ``layerhessians train`` destinations
    (defaults for the others).

    Raises:
        UserError: an unknown name (listing the valid ones) or, with ``validate``, a value
            of the wrong type or range.
    """
    config = apply_flags(TrainConfig(), flags)
    return config.validated() if validate else config


@dataclass
class GridRun:
    """One run of a grid: its directory name and its settings (by ``train`` destination)."""

    run: str
    flags: dict = field(default_factory=dict)

    def path(self, root) -> Path:
        """``root / run``; a run name that would leave ``root`` is refused (UserError)."""
        return safe_child(root, self.run)

    def config(self, overrides=None, validate: bool = True) -> TrainConfig:
        """This run's settings, with ``overrides`` (same names) applied on top."""
        return flags_to_config({**self.flags, **(overrides or {})}, validate=validate)

    def completed_epoch(self, root):
        """The last committed epoch of this run under ``root``, or ``None``."""
        path = self.path(root)
        return RunStore(path).completed_epoch if path.is_dir() else None

    def is_complete(self, root) -> bool:
        """Whether the run under ``root`` has trained all its ``num_epochs`` epochs.

        Args:
            root: the folder holding the grid's run directories.

        Returns:
            ``True`` when its last committed epoch is at least the run's ``num_epochs``.
        """
        done = self.completed_epoch(root)
        return done is not None and done >= int(self.flags.get("num_epochs", 0))


def load_grid(name_or_path) -> list:
    """The runs of a shipped grid (``"seed"``, ``"quick"``) or of a grid JSON file.

    Raises:
        UserError: a missing or malformed file, a repeated run name, a setting name that
            ``layerhessians train`` does not have, or a value of the wrong type
            (``"num_epochs": [1, 2]``; values themselves are checked per run).
    """
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
    valid = setting_flags()
    for r in runs:
        safe_child(".", r.run)  # a run stays under --root: no '..', '/', absolute names
        unknown = [k for k in r.flags if k not in valid]
        if unknown:
            raise UserError(f"grid flag {unknown[0]!r} of run {r.run!r} in {source} is not a "
                            f"`layerhessians train` setting; use one of {', '.join(valid)}")
        check_types(r.flags, where=f"grid run {r.run!r} in {source}: ")
    return runs


def select(runs, only) -> list:
    """The grid runs named by ``only`` (all when ``only`` is empty), in grid order."""
    if not only:
        return runs
    unknown = sorted(set(only) - {r.run for r in runs})
    if unknown:
        raise UserError(f"--only names runs not in the grid: {', '.join(unknown)}")
    return [r for r in runs if r.run in only]

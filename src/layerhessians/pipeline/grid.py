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

from layerhessians.errors import UserError, suggest
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


#: the largest grid file read (a grid of thousands of runs is a few hundred KiB)
MAX_GRID_BYTES = 16 << 20


def load_grid(name_or_path) -> list:
    """The runs of a shipped grid (``"seed"``, ``"quick"``) or of a grid JSON file.

    Raises:
        UserError: a missing or malformed file (every field is checked, see
            :func:`parse_grid`), a repeated run name, a setting name that ``layerhessians
            train`` does not have, or a value of the wrong type (``"num_epochs": [1, 2]``),
            in one line naming the file and run. Values themselves (``"learning_rate": -1``)
            are checked per run before anything trains
            (:func:`~layerhessians.pipeline.run_grid.check_settings`): a refused run is
            reported and the others go on.
    """
    if str(name_or_path) in SHIPPED:
        text = resources.files("layerhessians.configs").joinpath(f"{name_or_path}.json").read_text()
        source = f"shipped grid {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"grid file {path} not found; pass a JSON grid file or one of "
                            f"{', '.join(SHIPPED)}")
        if path.stat().st_size > MAX_GRID_BYTES:
            raise UserError(f"grid file {path} has {path.stat().st_size} bytes, more than the "
                            f"{MAX_GRID_BYTES} a grid file may have; split it")
        text, source = path.read_text(), str(path)
    runs = parse_grid(text, source)
    names = [r.run for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{source} names a run directory twice; run names must be unique")
    valid = setting_flags()
    for r in runs:
        where = f"grid run {r.run!r} in {source}: "
        unknown = [k for k in r.flags if k not in valid]
        if unknown:
            close = suggest(unknown[0], valid)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"grid flag {unknown[0]!r} of run {r.run!r} in {source} is not a "
                            f"`layerhessians train` setting{hint}; use one of {', '.join(valid)}")
        check_types(r.flags, where=where)
    return runs


#: The keys of a grid file and of each of its runs.
GRID_KEYS, RUN_KEYS = ("description", "runs"), ("run", "flags")
_GRID_FORM = '{"runs": [{"run": NAME, "flags": {SETTING: VALUE, ...}}, ...]}'


def parse_grid(text: str, source: str) -> list:
    """The :class:`GridRun` s of a grid file's JSON ``text``, every field checked for its
    type (an object with a list ``runs``, an optional string ``description``; each run an
    object with a string ``run`` naming a plain folder and an optional object ``flags``).

    Raises:
        UserError: one line naming ``source``, the field and what is expected.
    """
    try:
        grid = json.loads(text)
    except RecursionError:
        raise UserError(f"{source} is not a grid file (nested too deeply); a grid file is "
                        f"{_GRID_FORM}") from None
    except ValueError as err:
        raise UserError(f"{source} is not JSON ({err}); a grid file is {_GRID_FORM}") from None
    if not isinstance(grid, dict):
        raise UserError(f"{source}: a grid file is a JSON object, {_GRID_FORM}; "
                        f"got a {type(grid).__name__}")
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; a grid file has "
                        f"{' and '.join(GRID_KEYS)}")
    if not isinstance(grid.get("description", ""), str):
        raise UserError(f"{source}: description must be a string")
    entries = grid.get("runs")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: runs must be a non-empty list of runs, {_GRID_FORM}")
    runs = []
    for index, entry in enumerate(entries):
        where = f"{source}: run {index + 1}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be an object {{\"run\": NAME, \"flags\": {{...}}}}; "
                            f"got {entry!r}")
        unknown = [k for k in entry if k not in RUN_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; a run has "
                            f"{' and '.join(RUN_KEYS)}")
        name, flags = entry.get("run"), entry.get("flags", {})
        if not isinstance(name, str):
            raise UserError(f"{where}: run must be a folder name (a string); got {name!r}")
        safe_child(".", name)  # a run stays under --root: no '..', '/', absolute names
        if not isinstance(flags, dict):
            raise UserError(f"{where} ({name!r}): flags must be an object "
                            f"{{SETTING: VALUE}}; got {flags!r}")
        runs.append(GridRun(run=name, flags=dict(flags)))
    return runs
    return runs


def select(runs, only) -> list:
    """The grid runs named by ``only`` (all when ``only`` is empty), in grid order."""
    if not only:
        return runs
    unknown = sorted(set(only) - {r.run for r in runs})
    if unknown:
        raise UserError(f"--only names runs not in the grid: {', '.join(unknown)}")
    return [r for r in runs if r.run in only]

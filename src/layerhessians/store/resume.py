"""What ``--resume PATH`` names: a run directory, or a checkpoint inside one."""

from pathlib import Path

from layerhessians.errors import SettingError, UserError
from layerhessians.store.checkpoints import load_torch
from layerhessians.store.names import CHECKPOINTS, CONFIG, LAST_CHECKPOINT
from layerhessians.store.oserrors import os_errors

__all__ = ["RUN_OPTIONS", "options_error", "resume_source"]


#: The run-directory options as the Python API (SpectraTracker) and the CLI spell them.
RUN_OPTIONS = {"run": ("another run_dir", "another -r"), "resume": ("resume=True", "--resume"),
               "overwrite": ("overwrite=True", "--overwrite")}


def options_error(fact: str, advice: str, spelling: str = "cli") -> UserError:
    """``fact`` (literal text) then ``advice`` naming :data:`RUN_OPTIONS` as ``{resume}``...,
    spelled for the caller's interface (``"cli"`` or ``"api"``)."""
    template = fact.replace("{", "{{").replace("}", "}}") + advice
    return UserError(SettingError(template, RUN_OPTIONS).spelled(spelling))


def resume_source(value):
    """What ``--resume PATH`` names: ``(run directory, checkpoint or None)``.

    ``PATH`` is a run directory or ``RUN/checkpoints/last.pt`` (checkpoint ``None``: the last
    committed epoch), or another ``RUN/checkpoints/*.pt`` holding a full training state
    (returned, to be passed to :meth:`RunStore.create` as ``checkpoint``).

    Raises:
        UserError: empty or missing path, a file outside a run's checkpoints folder, an
            unreadable checkpoint, or one holding only weights (``epoch_EEEE.pt``).
    """
    if value is None or not str(value).strip():
        raise UserError('--resume "" names nothing; pass a run directory or its '
                        "checkpoints/last.pt")
    path = Path(value)
    with os_errors("read", path):
        if not path.exists():
            raise UserError(f"--resume {value}: no such file or directory; pass a run directory "
                            "or its checkpoints/last.pt")
        if path.is_dir():
            return path, None
        run = path.parent.parent
        if path.parent.name != CHECKPOINTS or not (run / CONFIG).is_file():
            raise UserError(f"--resume {value} is not inside a run directory "
                            "(RUN/checkpoints/*.pt); pass the run directory instead")
    if path.name == LAST_CHECKPOINT:
        return run, None
    state = load_torch(path)
    if not (isinstance(state, dict) and {"epoch", "model", "optimizer"} <= set(state)):
        raise UserError(f"--resume {value}: the file holds only model weights (no optimizer, "
                        "schedule or random state), so training cannot continue exactly from "
                        f"it; resume the run from its last checkpoint (--resume {run})")
    return run, path

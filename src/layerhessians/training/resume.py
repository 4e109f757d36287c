"""Which run ``layerhessians train`` continues, with which settings: :func:`resolve` (the
typed flags, a stored run's ``config.json``, ``--resume PATH``) and :func:`resume_target`.

Flags not typed take their defaults, or, when resuming, the values stored in the run's
``config.json``; typed flags must agree with a stored run except the volatile ones (checked
by the store when the run is opened). Free of torch (imported by the CLI's parser).
"""

from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.store.names import CONFIG
from layerhessians.store.record import RunRecord
from layerhessians.training.config import TrainConfig, apply_flags

__all__ = ["RUNS_ROOT", "RUN_FLAGS", "reruns", "resolve", "resume_target"]

#: default parent of run directories (when -r is not given)
RUNS_ROOT = "runs"
#: flags that say which run and how, not what it trains
RUN_FLAGS = ("run", "resume", "overwrite", "progress", "with_pdb", "reruns")


def resume_target(value, run):
    """The run directory that ``--resume PATH`` continues (with ``-r RUN``, if given).

    ``PATH`` is a run directory or its ``checkpoints/last.pt``: a run continues from its last
    completed epoch. Any other checkpoint (the seed's ``--resume RUN/checkpoints/
    epoch_0001.pt``) is refused: ``train`` resumes exactly, from the full training state
    (optimizer, schedule, random generators) of the last committed epoch. This function is
    the one place that decides; the store checks the path
    (:func:`~layerhessians.store.resume.resume_source`).

    Raises:
        UserError: a path that does not exist, a checkpoint other than ``last.pt`` or
            outside a run directory, or a ``-r`` that names another run.
    """
    # torch: imported only when running, not for --help
    from layerhessians.store.names import CHECKPOINTS, LAST_CHECKPOINT
    from layerhessians.store.resume import resume_source

    path = Path(value)
    if path.is_file() and path.parent.name == CHECKPOINTS and path.name != LAST_CHECKPOINT:
        run_dir = path.parent.parent
        raise UserError(f"--resume {value}: --resume continues a run from its last "
                        f"completed epoch ({run_dir / CHECKPOINTS / LAST_CHECKPOINT}), "
                        "not from another checkpoint (epoch_EEEE.pt files hold only model "
                        f"weights); run `layerhessians train --resume {run_dir}` (to start "
                        "again from these weights, use a new run)")
    path, _ = resume_source(value)
    if run is not None and Path(run).resolve() != path.resolve():
        raise UserError(f"--resume {value} and -r {run} name different runs; give one of them")
    return path


def _apply(config: TrainConfig, flags: dict) -> TrainConfig:
    return apply_flags(config, {k: v for k, v in flags.items() if k not in RUN_FLAGS})


def _stored(path: Path) -> TrainConfig:
    """The settings a run's config.json holds.

    Raises:
        UserError: the file is unreadable or not a run's settings.
    """
    import json

    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        record = RunRecord.from_dict(data)
    except (ValueError, TypeError, UserError) as err:
        raise UserError(f"{path} is unreadable ({err}); use --overwrite to start over") from None
    if record.training is None:
        raise UserError(f"{path} records no training settings (not a `layerhessians train` "
                        "run); use --overwrite to start over, or another -r")
    return TrainConfig.from_dict(record.training_settings())


def resolve(flags: dict):
    """``(config, run_dir, resume, overwrite)`` from the typed flags of ``layerhessians
    train`` (by destination, as :func:`~layerhessians.training.config.apply_flags`) and,
    when resuming, the stored run's settings: untyped flags take the stored values.

    ``resume`` is ``True`` (continue the run; ``--resume`` alone, where no run is there, is
    refused before anything is loaded), ``"allow"`` (``--resume`` with settings, as a grid's
    command lines: continue the run, or start it) or ``False``.

    Raises:
        UserError: contradicting flags, an empty ``-r``, a ``--resume`` that names no run or
            another run, an unreadable stored config, or a bad setting.
    """
    resume = flags.get("resume")
    overwrite = bool(flags.get("overwrite", False))
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one")
    run = flags.get("run")
    if run is not None and not str(run).strip():
        raise UserError("-r/--run is empty; give a run directory, e.g. -r runs/lenet-digits "
                        f"(or leave -r out for {RUNS_ROOT}/model=...)")
    if "hessian_total" in flags and "examples_per_class" in flags:
        raise UserError("--hessian-examples and --examples_per_class both set the Hessian "
                        "set's size; give one")
    if isinstance(resume, str):
        run = resume_target(resume, run)
    if "cuda" in flags or "device" in flags:  # check devices before loading any data
        # torch: imported only when running, not for --help
        from layerhessians.training.devices import resolve_device

        flags = {**flags, "device": str(resolve_device(flags.get("device"), flags.get("cuda")))}
    settings_given = any(k not in RUN_FLAGS for k in flags)
    if resume and run is not None and (Path(run) / CONFIG).is_file():
        # the stored run's settings, with the typed flags over them: validated once
        return _apply(_stored(Path(run) / CONFIG), flags).validated(), Path(run), True, overwrite
    config = _apply(TrainConfig(), flags).validated()
    run_dir = Path(run) if run is not None else Path(RUNS_ROOT) / config.run_name()
    stored = run_dir / CONFIG
    if resume and stored.is_file():
        config = _apply(_stored(stored), flags).validated()
    elif resume and isinstance(flags.get("resume"), str):
        raise UserError(f"--resume {flags['resume']}: {run_dir} holds no run (no config.json)")
    elif resume and not settings_given:  # issue 21 item 17: nothing to resume, no settings
        raise UserError(f"--resume: {run_dir} holds no run to resume (no {CONFIG}); drop "
                        "--resume to start a new run there")
    elif resume:
        resume = "allow"  # issue 12: settings given (grids): continue the run, or start it
    return config, run_dir, resume if resume == "allow" else bool(resume), overwrite


def reruns(config: TrainConfig, run_dir: Path, count) -> list:
    """``[(run directory, settings)]`` of ``--reruns R``: ``RUN`` itself for 1, else
    ``RUN,run1`` .. ``RUN,runR`` with seeds ``seed`` .. ``seed + R - 1``
    (:func:`~layerhessians.pipeline.replicates.replicate_configs`), trained one after
    another (a complete replicate is skipped on ``--resume``, an interrupted one resumed).

    Raises:
        UserError: ``R`` is not an integer >= 1.
    """
    from layerhessians.pipeline.replicates import replicate_configs

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--reruns {count!r} must be an integer >= 1 (runs of these settings, "
                        "each with the next seed)")
    if count == 1:
        return [(run_dir, config)]
    return [(run_dir.parent / name, replicate)
            for name, replicate in replicate_configs(config, count, base_name=run_dir.name)]

"""``layerhessians reproduce``: the seed README's whole pipeline in one command.

Trains every run of a grid (skipping complete runs, resuming interrupted ones), plots each
run, then matches layer spectra to full spectra across the runs
(``match_distros_wasserstein.png``, ``match_distros_peak.png``, ``match_distros.csv``).
Training runs in this process by default; ``--gpus 0,1`` or ``--launcher slurm`` hand the
runs to submitit jobs instead (see :mod:`layerhessians.pipeline.launchers`).
"""

import shlex
import sys
import time
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.pipeline import launchers
from layerhessians.pipeline.grid import load_grid

HELP = ("run the seed's pipeline: train the grid's runs (skipping complete ones, resuming "
        "interrupted ones), plot each, and match layers to the full Hessian")
QUICK_ROOT = "runs/quick"


def add_common_arguments(parser):
    """The flags ``reproduce`` and ``sweep`` share (besides how the grid is chosen)."""
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN",
                        help="run only these grid entries (run directory names)")
    parser.add_argument("--train-args", default="",
                        help="extra `layerhessians train` flags for every run, quoted, e.g. "
                             "\"--device cuda --dataset_root /data\"")
    parser.add_argument("--no-plots", action="store_true", help="skip the per-run figures")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands that would run, and which runs are complete")
    launchers.add_arguments(parser)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="the embedded-default grid (Digits, offline, a few minutes on a "
                             f"laptop CPU) instead of the seed's 12 runs; root {QUICK_ROOT}")
    parser.add_argument("--grid", default=None,
                        help="a grid JSON file (default: the seed's 12 runs, or the quick grid)")
    parser.add_argument("--root", default=None,
                        help="folder holding the run directories and the match outputs "
                             f"(default: the working directory, or {QUICK_ROOT} with --quick)")
    add_common_arguments(parser)


def _call(argv) -> int:
    from layerhessians.cli.main import main

    print(f"$ layerhessians {shlex.join(argv)}", flush=True)
    return main(argv)


def select(runs, only) -> list:
    """The grid runs named by ``--only`` (all when ``only`` is empty), in grid order."""
    if not only:
        return runs
    unknown = sorted(set(only) - {r.run for r in runs})
    if unknown:
        raise UserError(f"--only names runs not in the grid: {', '.join(unknown)}")
    return [r for r in runs if r.run in only]


def run_pipeline(runs, root, args, *, command="reproduce", match=True) -> int:
    """Train ``runs`` under ``root`` with the launcher ``args`` ask for, then plot and match.

    Complete runs are skipped; the others train with ``--resume``. Returns the exit status:
    0, or 1 when a run, a plot or the match failed.
    """
    root = Path(root)
    launcher = launchers.make_launcher(args, root)
    if not args.dry_run:
        launcher.check()
    job_root = root if isinstance(launcher, launchers.SequentialLauncher) else root.absolute()
    extra = ["--resume", *shlex.split(args.train_args)]
    failed, started, tasks = [], time.time(), []

    for i, entry in enumerate(runs, 1):
        done = entry.completed_epoch(root)
        complete = entry.is_complete(root)
        status = "complete" if complete else (
            f"resumes after epoch {done}" if done is not None else "new")
        print(f"[{i}/{len(runs)}] {entry.run}: {status}", flush=True)
        task = launchers.Task(entry.run, tuple(entry.argv(job_root, extra)))
        if args.dry_run:
            print(f"  {launcher.task_command(task)}")
        if not complete:
            tasks.append(task)
    if args.dry_run:
        print(f"{command}: {len(tasks)} of {len(runs)} runs to train, {launcher.describe()}")
        return 0

    if tasks and not isinstance(launcher, launchers.SequentialLauncher):
        print(f"{command}: {len(tasks)} runs to train, {launcher.describe()}", flush=True)
    failed += [o.run for o in launcher.launch(tasks) if not o.ok]

    present = [r for r in runs if r.run not in failed and r.completed_epoch(root) is not None]
    if not args.no_plots:
        for entry in present:
            if _call(["plot", "-r", str(entry.path(root))]) != 0:
                failed.append(entry.run)
    match_rc = 0
    if match and present:
        match_rc = _call(["match", *(str(r.path(root)) for r in present), "--out", str(root)])
    elif match:
        match_rc = 1
        print(f"{command}: no run has spectra yet; nothing to match", file=sys.stderr)

    minutes = (time.time() - started) / 60
    print(f"{command}: {len(present)}/{len(runs)} runs with spectra, {minutes:.1f} min; "
          f"figures in {root}", flush=True)
    if failed:
        print(f"{command}: failed: {', '.join(dict.fromkeys(failed))} (see their messages above; "
              "run the same command again to resume)", file=sys.stderr)
    return 1 if failed or match_rc != 0 else 0


def run(args) -> int:
    grid = args.grid or ("quick" if args.quick else "seed")
    runs = select(load_grid(grid), args.only)
    root = Path(args.root or (QUICK_ROOT if args.quick else "."))
    return run_pipeline(runs, root, args, command="reproduce")

"""The flags ``reproduce`` and ``sweep`` share, and their one implementation: parse, then
call :func:`layerhessians.pipeline.run_grid.run_grid`."""

import shlex
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.vocabulary import INSTALL_HINT, LAUNCHERS, SLURM_DEFAULT_MINUTES

#: typed ``--train-args`` that are not settings (the pipeline chooses the run and resumes)
_NOT_SETTINGS = ("run", "resume", "overwrite", "with_pdb")


def add_common_arguments(parser):
    """The flags ``reproduce`` and ``sweep`` share (besides how the grid is chosen)."""
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN",
                        help="run only these grid entries (run directory names in the grid file; with "
                             "--replicates, every replicate of each)")
    parser.add_argument("--train-args", default="",
                        help="extra `layerhessians train` flags for every run, quoted, e.g. "
                             "\"--device cuda --dataset_root /data\"")
    parser.add_argument("--replicates", type=int, default=1, metavar="R",
                        help="runs per grid entry, named as the original does (NAME,run1 .. "
                             "NAME,runR) with training seeds seed .. seed+R-1; match pools "
                             "them (default 1: the grid's runs as named)")
    parser.add_argument("--vary-subset", action="store_true",
                        help="with --replicates: replicate k also measures its spectra on "
                             "another Hessian subset (subset seed + k - 1)")
    parser.add_argument("--no-plots", action="store_true", help="skip the per-run figures")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands that would run, and which runs are complete")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads of every run (and of plotting and matching); "
                             "set 1 when other processes share the cores (default: torch's, "
                             "one per core; a resumed run keeps its recorded count)")
    add_launcher_arguments(parser)


def add_launcher_arguments(parser):
    """Where the runs train (see :mod:`layerhessians.pipeline.launchers`)."""
    group = parser.add_argument_group(
        "launcher", "where the runs train: by default in this process, one after another")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: this machine (in this process, or one job per GPU with "
                            "--gpus); slurm: one Slurm job per run through submitit "
                            f"({INSTALL_HINT})")
    group.add_argument("--gpus", default=None, metavar="0,1",
                       help="local: train in parallel, one submitit job per listed GPU at a "
                            "time (CUDA_VISIBLE_DEVICES set per job, --device cuda:0)")
    group.add_argument("--partition", default=None, help="slurm: the partition (sbatch --partition)")
    group.add_argument("--time", type=float, default=None, metavar="MINUTES",
                       help="time limit of each job in minutes; a job reaching it is requeued "
                            f"and resumes (slurm default {SLURM_DEFAULT_MINUTES}; local: none)")
    group.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                       help="slurm: GPUs per job (default 1; a run trains on one GPU, "
                            "0 trains on CPU)")
    group.add_argument("--cpus-per-task", type=int, default=None, metavar="N",
                       help="slurm: CPU cores per job (default: the cluster's)")
    group.add_argument("--mem", type=float, default=None, metavar="GB",
                       help="slurm: memory per job in GB (default: the cluster's)")
    group.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                       help="slurm: any other sbatch option, repeatable (account=abc, qos=high)")


def train_overrides(text: str) -> tuple:
    """``(settings, progress)`` from ``--train-args``, parsed by ``layerhessians train``'s
    own parser (settings by destination; ``progress``: ``None`` or ``False``)."""
    from layerhessians.cli.main import (  # the train parser, on demand
        UsageError,
        build_parser,
    )

    try:
        args = build_parser("train").parse_args(["train", *shlex.split(text)])
    except UsageError as err:
        raise UserError(f"--train-args {text!r}: {err}") from None
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    given = [k for k in _NOT_SETTINGS if k in flags]
    if given:
        raise UserError(f"--train-args may not set {', '.join(given)}: the pipeline chooses "
                        "each run's directory and resumes it")
    progress = None if flags.pop("progress", True) else False
    return flags, progress


def run_grid_command(runs, root, args, *, command, match=True) -> int:
    """Parse the shared flags and run the grid; exit status 0, or 1 when anything failed."""
    from layerhessians.pipeline import launchers
    from layerhessians.pipeline.replicates import replicate_grid
    from layerhessians.pipeline.run_grid import run_grid
    from layerhessians.training.threads import check_threads, set_threads

    if args.vary_subset and args.replicates == 1:
        raise UserError("--vary-subset varies the Hessian subset across replicates: add "
                        "--replicates R (R >= 2)")
    runs = replicate_grid(runs, args.replicates, args.vary_subset)
    overrides, progress = train_overrides(args.train_args)
    replicated = [k for k in ("seed", "hessian_subset_seed") if k in overrides
                  and (k == "seed" and args.replicates > 1 or args.vary_subset)]
    if replicated:
        raise UserError(f"--train-args sets {replicated[0]} for every run, but --replicates "
                        "gives each replicate its own; set it in the grid file instead")
    threads = check_threads(getattr(args, "threads", None))
    if threads is not None:
        if overrides.get("threads", threads) != threads:
            raise UserError(f"--threads {threads} and --train-args --threads "
                            f"{overrides['threads']} disagree; give one")
        overrides["threads"] = threads
        set_threads(threads)  # plotting and matching in this process
    launcher = launchers.make_launcher(args, Path(root))
    ok = run_grid(runs, root, launcher, overrides=overrides, progress=progress,
                  plots=not args.no_plots, match=match, dry_run=args.dry_run, command=command)
    return 0 if ok else 1

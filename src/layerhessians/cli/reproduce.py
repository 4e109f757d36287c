"""``layerhessians reproduce``: the seed README's whole pipeline in one command.

Trains every run of a grid (skipping complete runs, resuming interrupted ones), plots each
run, then matches layer spectra to full spectra across the runs
(``match_distros_wasserstein.png``, ``match_distros_peak.png``, ``match_distros.csv``).
``--regularization`` runs the paper's second half instead: the original's regularisation
settings (grid ``htr-seed``; ``--quick``: ``htr-quick``, offline), then per setting the
methods' test-error table with Welch's tests against SGD and L2, and the figures
(:func:`layerhessians.analysis.method_comparison.report_root`).
Training runs in this process by default; ``--gpus 0,1`` or ``--launcher slurm`` hand the
runs to submitit jobs instead (see :mod:`layerhessians.pipeline.launchers`); the pipeline itself is
:func:`layerhessians.pipeline.run_grid.run_grid`, shared with ``sweep``.
"""

from pathlib import Path

from layerhessians.cli.grid_args import add_common_arguments, run_grid_command

HELP = ("run the seed's pipeline: train the grid's runs (skipping complete ones, resuming "
        "interrupted ones), plot each, and match layers to the full Hessian")
QUICK_ROOT = "runs/quick"
#: ``--regularization``'s grid and default root, plain and ``--quick``
REGULARIZATION = {False: ("htr-seed", "runs/htr"), True: ("htr-quick", "runs/htr-quick")}


def add_arguments(parser):
    """Add the ``reproduce`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    parser.add_argument("--quick", action="store_true",
                        help="the quick-start grid (LeNet on MNIST5k and Digits, offline, "
                             "minutes on a laptop CPU; see the README) instead of the seed's 12 "
                             f"runs; root {QUICK_ROOT}")
    parser.add_argument("--regularization", action="store_true",
                        help="the paper's regularisation half: the original's scripts.sh "
                             "settings (grid htr-seed; with --quick htr-quick, offline), then "
                             "the methods' test-error table and figures, no spectra match; "
                             "root runs/htr (runs/htr-quick); add --replicates R for reruns")
    parser.add_argument("--grid", default=None,
                        help="a grid JSON file (default: the seed's 12 runs, or the quick grid)")
    parser.add_argument("--root", default=None,
                        help="folder holding the run directories and the match outputs "
                             f"(default: the working directory, or {QUICK_ROOT} with --quick)")
    add_common_arguments(parser)


def run(args) -> int:
    """Train, plot and match the seed's grid (or ``--quick``'s, or ``--grid``'s) under the root.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status: 0 when every run, plot and the match succeeded, else 1.

    Raises:
        UserError: an unknown or malformed grid, bad settings, a launcher that cannot run here.
    """
    from layerhessians.pipeline.grid import load_grid, select

    if args.regularization:
        from layerhessians.analysis.method_comparison import report_root

        grid, default_root = REGULARIZATION[bool(args.quick)]
        root = Path(args.root or default_root)
        status = run_grid_command(select(load_grid(args.grid or grid), args.only), root, args,
                                  command="reproduce", match=False)
        if not args.dry_run:
            print("\n".join(report_root(root)))
        return status
    grid = args.grid or ("quick" if args.quick else "seed")
    runs = select(load_grid(grid), args.only)
    root = Path(args.root or (QUICK_ROOT if args.quick else "."))
    return run_grid_command(runs, root, args, command="reproduce")

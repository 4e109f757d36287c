"""``layerhessians sweep CONFIG``: train a grid file's runs, then plot and match them.

``CONFIG`` is a grid JSON file (``{"runs": [{"run": NAME, "flags": {...}}]}``, see
:mod:`layerhessians.pipeline.grid`) or a shipped grid name (``seed``, ``quick``). Runs train in this
process one after another (default), in parallel one per local GPU (``--gpus 0,1``), or as
Slurm jobs (``--launcher slurm``); complete runs are skipped and interrupted or requeued
runs resume. Job logs go to ``ROOT/.jobs/``.
"""

from pathlib import Path

from layerhessians.cli.grid_args import add_common_arguments, run_grid_command

HELP = ("train a grid file's runs (in this process, one job per local GPU, or Slurm jobs), "
        "skipping complete runs, then plot and match them")


def add_arguments(parser):
    """Add the ``sweep`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    parser.add_argument("config", metavar="CONFIG",
                        help="grid JSON file ({\"runs\": [{\"run\": NAME, \"flags\": {...}}]}) "
                             "or a shipped grid: seed, quick, htr-seed (the original's regularisation "
                             "scripts.sh), htr-quick (offline HTR grid on MNIST5k)")
    parser.add_argument("--root", default=".",
                        help="folder holding the run directories, the match outputs and the "
                             "job logs (.jobs/) (default: the working directory)")
    add_common_arguments(parser)
    parser.add_argument("--no-match", action="store_true",
                        help="skip matching layer spectra to the full spectrum")


def run(args) -> int:
    """Train (then plot and match) the runs of the grid file ``args.config`` under ``args.root``.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status: 0 when every run, plot and the match succeeded, else 1.

    Raises:
        UserError: an unknown or malformed grid, bad settings, a launcher that cannot run here.
    """
    from layerhessians.pipeline.grid import load_grid, select

    runs = select(load_grid(args.config), args.only)
    return run_grid_command(runs, Path(args.root), args, command="sweep", match=not args.no_match)

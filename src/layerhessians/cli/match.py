"""``layerhessians match [RUN ...]``: which layer's Hessian spectrum matches the full one.

For every run, layer and epoch: the distance between the layer's spectrum and the full
spectrum by each ``--metric`` (:data:`layerhessians.analysis.distances.DISTANCES`; default
``w1-maxabs``, W1 after dividing each spectrum by its own largest |eigenvalue|; ``paper``
the original's computation; ``both`` = the default and ``paper``), with a bootstrap spread
and a verdict (:mod:`layerhessians.analysis.matching`;
:func:`layerhessians.analysis.report.match_runs`). Writes into ``--out`` (default: the
folder that holds the runs, i.e. their common parent; ``experiments/match_distros.py``
keeps the original's working directory), prints the summary with its verdicts and the
paths it wrote:

- ``match_distros.csv``: every distance with its interval, the layer's share of the
  parameters and the full spectrum's distance to the block-diagonal mixture
  (:data:`~layerhessians.analysis.matching.CSV_COLUMNS`);
- ``match_distros_summary.csv``: per run and metric, the peak epoch and best layers with
  their spread and verdicts;
- ``match_distros_settings.csv``: per setting (runs that differ only in the training seed
  and the Hessian-subset seed are replicates of one setting), metric, scope (summed over
  training, at the peak) and layer: the distance averaged over the replicates with a
  hierarchical-bootstrap interval, ``closest_in`` (replicates in which the layer is the
  closest), the verdict and the parameter-share mixture baseline
  (:mod:`layerhessians.analysis.pooling`); ``match_distros_groups.csv``: which setting
  each run joined and why it was not pooled with the nearest other setting;
- ``match_distros_wasserstein.<fmt>``: per setting (one line, its replicates pooled), each
  layer's distance summed over the epochs, divided by the maximum over layers, against relative depth ``i / (L - 1)``, one panel
  per metric, error bars = the interval;
- ``match_distros_peak.<fmt>``: the same at each run's peak epoch.

The peak epoch is computed (:func:`layerhessians.analysis.matching.peak_epoch`: the epoch at which
the best-matching layer is closest to the full spectrum) unless ``--peak`` gives it.
With no RUN arguments the 12 seed run directories (``model=M,dataset=D,te,run1``) are
looked up in the working directory.
"""

import argparse
import sys
from pathlib import Path

from layerhessians.errors import UserError
from layerhessians.vocabulary import DEFAULT_REPLICATES

#: fewer bootstrap draws than this get a note: verdicts at the 95% rule are unsteady
FEW_DRAWS = 100

HELP = "compare every layer's Hessian spectrum with the full spectrum across runs"


def add_arguments(parser):
    """Add the ``match`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    # matplotlib and scipy: only when this command is chosen (fast `layerhessians --help`)
    from layerhessians.analysis import distances
    from layerhessians.analysis import figures as plots

    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories (default: the 12 seed runs in the working "
                             "directory, model=M,dataset=D,te,run1)")
    parser.add_argument("-r", "--run", action="append", default=[], dest="run_flags",
                        metavar="RUN", help="a run directory (repeatable; same as RUN)")
    parser.add_argument("--out", default=None,
                        help="folder for the figures and CSVs (default: the runs' common "
                             "parent folder)")
    parser.add_argument("--metric", nargs="+", metavar="NAME",
                        choices=(*distances.METRICS, "wasserstein", "both"),
                        default=[distances.DEFAULT_DISTANCE],
                        help=f"one or more of {', '.join(distances.METRICS)} (default "
                             f"{distances.DEFAULT_DISTANCE}; w1-minmax is the former, degenerate "
                             "default); both = the default and paper; wasserstein = W1 on the "
                             "--normalize axis")
    parser.add_argument("--normalize", choices=tuple(distances.LEGACY_W1), default="maxabs",
                        help="axis of --metric wasserstein: maxabs (x / max|x|, default), "
                             "minmax (each support -> [0, 1]), none")
    parser.add_argument("--draws", type=int, default=DEFAULT_REPLICATES,
                        dest="replicates", metavar="B",
                        help="bootstrap draws behind each distance's spread and the verdicts "
                             f"(default {DEFAULT_REPLICATES}; 0: no spread, no verdicts); "
                             "--replicates is its former name (replicated runs are found "
                             "by their settings and pooled)")
    parser.add_argument("--replicates", type=int, default=None, dest="old_replicates",
                        help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="compute the runs' distances in N processes, one thread each "
                             "(default 1; the same numbers)")
    parser.add_argument("--peak", action="append", default=[], metavar="RUN=EPOCH|paper",
                        help="peak epoch of a run (repeatable), or 'paper' for the original's "
                             "12 hard-coded epochs; default: computed per run")
    parser.add_argument("--epochs", help="epochs to compare, e.g. 1-50 (default: every "
                                         "training epoch >= 1 of each run)")
    parser.add_argument("--points", type=int, default=distances.PAPER_POINTS,
                        help="density grid points for --metric paper (default: 1024)")
    parser.add_argument("--format", choices=plots.FORMATS, default="png",
                        help="image format (default: png)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of PNGs (default: 200)")


def run(args) -> int:
    """Match every layer's spectrum to the full spectrum across the runs of ``args``.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status, 0 (the figures and CSVs are written to the output folder).

    Raises:
        UserError: bad options, missing or unreadable run directories, runs without the
            spectra to compare.
    """
    from layerhessians.analysis import seed_grid
    from layerhessians.analysis.distances import resolve_metrics
    from layerhessians.analysis.report import (
        check_dpi,
        check_points,
        check_replicates,
        find_seed_runs,
        match_runs,
        parse_epochs_within,
        parse_peaks,
        run_ids,
    )
    from layerhessians.cli.plot import run_paths
    from layerhessians.store.run import load_run

    check_points(args.points)
    check_dpi(args.dpi)
    if args.old_replicates is not None:
        args.replicates = args.old_replicates
    check_replicates(args.replicates)  # a user error is one line: the note comes after
    if args.old_replicates is not None:
        print("note: --replicates is the former name of --draws (bootstrap draws per run); "
              "replicated runs need no option: runs are pooled by their settings",
              file=sys.stderr)
    if 0 < args.replicates < FEW_DRAWS:
        print(f"note: {args.replicates} draws: supports near the 95% rule are unsteady "
              f"from one run of match to the next; use --draws {DEFAULT_REPLICATES} or more "
              "for verdicts", file=sys.stderr)
    metrics = resolve_metrics(args.metric, args.normalize)
    paths = [Path(p) for p in run_paths(args, "match")]
    if not paths:
        paths, missing = find_seed_runs(".")
        if not paths:
            raise UserError(f"none of the 12 seed run directories ({seed_grid.SEED_RUNS[0]}, ...) "
                            f"is in {Path.cwd()}; pass run directories as arguments or run "
                            "from the folder that holds them")
        if missing:
            print(f"using {len(paths)} of the 12 seed runs; missing: {', '.join(missing)}",
                  file=sys.stderr)
    for path in paths:
        if not path.is_dir():
            raise UserError(f"run directory {path} does not exist; pass the -r folder of a "
                            "`layerhessians train` run")
    runs = [load_run(p) for p in paths]
    ids = run_ids(runs)
    available = sorted({e for r in runs for e in r.epochs}) or [0]
    epochs = parse_epochs_within(args.epochs, available, "the runs") if args.epochs else None
    peaks = parse_peaks(args.peak, runs, ids)
    _, _, written = match_runs(runs, metrics=metrics, peaks=peaks, epochs=epochs,
                               points=args.points, out=args.out, fmt=args.format,
                               dpi=args.dpi, ids=ids, replicates=args.replicates,
                               workers=args.workers)
    for path in written:
        print(f"saved: {path}")
    return 0

"""``layerhessians plot RUN [RUN ...]`` (or ``-r RUN``): the figures of each run, written
into ``RUN/images/``.

- ``spectrum_<block>.<fmt>``: each block's (full and every layer's) spectral density at the
  epochs of training, colour = epoch, log density against the eigenvalue;
- ``overview_full.<fmt>``: the full Hessian's density as an epoch x eigenvalue heat map,
  with its top eigenvalue and trace per epoch;
- ``layer_distances.<fmt>``: each layer's distance to the full spectrum (layers x epochs);
- ``best_match.<fmt>``: the full spectrum overlaid with its best-matching layer's at the
  peak epoch (see :mod:`layerhessians.analysis.matching`);
- ``training_curves.<fmt>``: loss and accuracy per epoch.

It shows its progress (a bar on a terminal, else a line every few seconds on stderr) and
says which figures of an earlier plot it replaced.
"""

import sys
from pathlib import Path

from layerhessians.errors import UserError

HELP = "plot a run's spectra, layer distances and training curves into RUN/images/"


def add_arguments(parser):
    """Add the ``plot`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    # matplotlib and scipy: only when this command is chosen (fast `layerhessians --help`)
    from layerhessians.analysis import distances
    from layerhessians.analysis import figures as plots

    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories (from `train -r`); also accepted as -r RUN")
    parser.add_argument("-r", "--run", action="append", default=[], dest="run_flags",
                        metavar="RUN", help="a run directory (repeatable; same as RUN)")
    parser.add_argument("-m", "--model", help="model name; checked against the run's config.json")
    parser.add_argument("-d", "--dataset", help="dataset name; checked against config.json")
    parser.add_argument("--points", type=int, default=1024,
                        help="grid points per density curve (default: 1024)")
    parser.add_argument("--format", choices=plots.FORMATS, default="png",
                        help="image format (default: png)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of PNGs (default: 200)")
    parser.add_argument("--epochs", help="epochs to plot, e.g. 0-50 or 1,10,20 (default: all)")
    parser.add_argument("--metric", choices=(*distances.METRICS, "wasserstein"),
                        default=distances.DEFAULT_DISTANCE,
                        help="distance for the layer heat map and best match (default: "
                             f"{distances.DEFAULT_DISTANCE}; wasserstein = W1 on the "
                             "--normalize axis)")
    parser.add_argument("--normalize", choices=tuple(distances.LEGACY_W1), default="maxabs",
                        help="axis of --metric wasserstein (default: maxabs, x / max|x|)")


def _check_identity(run, args):
    for key, given in (("model", args.model), ("dataset", args.dataset)):
        stored = getattr(run.record, key)
        if given is not None and stored is not None and str(given).lower() != str(stored).lower():
            raise UserError(f"-{key[0]} {given} does not match the run {run.path} "
                            f"({key} {stored} in config.json); drop -{key[0]} or fix -r")


def run_paths(args, command: str) -> list:
    """The run directories given positionally and with ``-r`` (in that order, once each)."""
    paths = list(dict.fromkeys([*args.runs, *args.run_flags]))
    for path in paths:
        if not str(path).strip():
            raise UserError("an empty run directory was given; pass the -r folder of a "
                            "`layerhessians train` run")
    if not paths and command == "plot":
        raise UserError("give a run directory: layerhessians plot RUN (or -r RUN)")
    return paths


def run(args) -> int:
    """Plot every run of ``args`` into its ``images/`` folder, printing each file written.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status, 0.

    Raises:
        UserError: bad options, a missing or unreadable run directory, or a run whose
            config.json does not name the ``--model``/``--dataset`` given.
    """
    from layerhessians.analysis.report import check_dpi, make_figures
    from layerhessians.store.run import load_run

    check_dpi(args.dpi)
    runs = [load_run(path) for path in run_paths(args, "plot")]  # every run read first
    for run_ in runs:
        _check_identity(run_, args)
    for run_ in runs:
        before = _existing(run_.path / "images")
        written = make_figures(run_, points=args.points, fmt=args.format, dpi=args.dpi,
                               epochs=args.epochs, metric=args.metric, normalize=args.normalize,
                               progress=True)
        replaced = [path for path in written if _resolved(path) in before]
        for path in written:
            note = " (replaced the earlier one)" if _resolved(path) in before else ""
            print(f"image saved at: {path}{note}")
        if replaced:
            print(f"plot: replaced {len(replaced)} figure(s) of an earlier plot in "
                  f"{run_.path / 'images'}", file=sys.stderr)
    return 0


def _resolved(path) -> str:
    return str(Path(path).resolve())


def _existing(folder) -> set:
    """The files in ``folder`` now (resolved paths), to say which a plot replaces."""
    folder = Path(folder)
    return {_resolved(p) for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()

"""``layerhessians match [RUN ...]``: which layer's Hessian spectrum matches the full one.

For every run, layer and epoch: the distance between the layer's spectrum and the full
spectrum by each ``--metric`` (:data:`layerhessians.analysis.distances.DISTANCES`; default
``w1-maxabs``, W1 after dividing each spectrum by its own largest |eigenvalue|; ``paper``
the original's computation; ``both`` = the default and ``paper``), with a bootstrap spread
and a verdict (:mod:`layerhessians.analysis.matching`). Writes into ``--out`` (default: the
working directory, as the original did):

- ``match_distros.csv``: every distance with its interval, the layer's share of the
  parameters and the full spectrum's distance to the block-diagonal mixture
  (:data:`~layerhessians.analysis.matching.CSV_COLUMNS`);
- ``match_distros_summary.csv``: per run and metric, the peak epoch and best layers with
  their spread and verdicts;
- ``match_distros_wasserstein.<fmt>``: per run, each layer's distance summed over the
  epochs, divided by the run's maximum, against relative depth ``i / (L - 1)``, one panel
  per metric, error bars = the interval;
- ``match_distros_peak.<fmt>``: the same at each run's peak epoch.

The peak epoch is computed (:func:`layerhessians.analysis.matching.peak_epoch`: the epoch at which
the best-matching layer is closest to the full spectrum) unless ``--peak`` gives it.
With no RUN arguments the 12 seed run directories (``model=M,dataset=D,te,run1``) are
looked up in the working directory.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.analysis import figures as plots
from layerhessians.analysis import matching as compare
from layerhessians.errors import UserError
from layerhessians.store.runs import load_run, write_csv

HELP = "compare every layer's Hessian spectrum with the full spectrum across runs"


def add_arguments(parser):
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories (default: the 12 seed runs in the working "
                             "directory, model=M,dataset=D,te,run1)")
    parser.add_argument("--out", default=".", help="folder for the figures and CSVs (default: .)")
    parser.add_argument("--metric", nargs="+", metavar="NAME",
                        choices=(*compare.METRICS, "wasserstein", "both"),
                        default=[compare.DEFAULT_DISTANCE],
                        help=f"one or more of {', '.join(compare.METRICS)} (default "
                             f"{compare.DEFAULT_DISTANCE}; w1-minmax is the former, degenerate "
                             "default); both = the default and paper; wasserstein = W1 on the "
                             "--normalize axis")
    parser.add_argument("--normalize", choices=tuple(compare.LEGACY_W1), default="maxabs",
                        help="axis of --metric wasserstein: maxabs (x / max|x|, default), "
                             "minmax (each support -> [0, 1]), none")
    parser.add_argument("--replicates", type=int, default=compare.REPLICATES,
                        help="bootstrap draws behind each distance's spread and the verdicts "
                             f"(default {compare.REPLICATES}; 0: no spread, no verdicts)")
    parser.add_argument("--peak", action="append", default=[], metavar="RUN=EPOCH|paper",
                        help="peak epoch of a run (repeatable), or 'paper' for the original's "
                             "12 hard-coded epochs; default: computed per run")
    parser.add_argument("--epochs", help="epochs to compare, e.g. 1-50 (default: every "
                                         "training epoch >= 1 of each run)")
    parser.add_argument("--points", type=int, default=compare.PAPER_POINTS,
                        help="density grid points for --metric paper (default: 1024)")
    parser.add_argument("--format", choices=plots.FORMATS, default="png",
                        help="image format (default: png)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of PNGs (default: 200)")


# ----------------------------------------------------------------------------- inputs
def find_seed_runs(folder=".") -> tuple:
    """``(present paths, missing names)`` of the 12 seed run directories in ``folder``."""
    folder = Path(folder)
    present = [folder / n for n in compare.SEED_RUNS if (folder / n).is_dir()]
    missing = [n for n in compare.SEED_RUNS if not (folder / n).is_dir()]
    return present, missing


def _run_ids(runs) -> list:
    names = [r.path.name for r in runs]
    return [r.path.name if names.count(r.path.name) == 1 else str(r.path) for r in runs]


def parse_peaks(specs, runs, ids) -> dict:
    """``{run id: epoch or None}`` from ``--peak`` values (``RUN=EPOCH`` or ``paper``)."""
    peaks = {}
    for spec in specs:
        if spec.strip().lower() == "paper":
            for run, rid in zip(runs, ids):
                epoch = compare.paper_peak_epoch(run.config.get("model"), run.config.get("dataset"))
                if epoch is None:
                    print(f"note: no paper peak for {rid} ({run.config.get('model')}+"
                          f"{run.config.get('dataset')}); its peak is computed", file=sys.stderr)
                peaks.setdefault(rid, epoch)
            continue
        name, sep, value = spec.rpartition("=")
        try:
            epoch = int(value)
        except ValueError:
            epoch = None
        if not sep or epoch is None or epoch < 0:
            raise UserError(f"--peak {spec!r}: give RUN=EPOCH (e.g. --peak "
                            f"'{compare.SEED_RUNS[0]}=18') or --peak paper")
        matches = [rid for run, rid in zip(runs, ids)
                   if name in (rid, run.path.name, str(run.path)) or Path(name) == run.path]
        if not matches:
            raise UserError(f"--peak {spec!r}: {name!r} is not one of the runs compared "
                            f"({', '.join(ids)})")
        for rid in matches:
            peaks[rid] = epoch
    return peaks


# ----------------------------------------------------------------------------- output
def _labels(summary) -> dict:
    """``{run: "Model+Dataset"}``, with the run's name added where two runs share a label."""
    runs = summary.drop_duplicates("run")
    labels = [f"{m}+{d}" if isinstance(m, str) and isinstance(d, str) else run
              for m, d, run in zip(runs["model"], runs["dataset"], runs["run"])]
    return {run: lab if labels.count(lab) == 1 else f"{lab} ({run})"
            for run, lab in zip(runs["run"], labels)}


def _metric_label(metric):
    return compare.DISTANCES[metric].label if metric in compare.DISTANCES else str(metric)


def metric_names(requested, normalize="maxabs") -> tuple:
    """Registry names for ``--metric`` values (``both`` = the default and ``paper``;
    ``wasserstein`` = W1 on the ``--normalize`` axis), in order, without repeats."""
    names = []
    for name in requested:
        expanded = ((compare.DEFAULT_DISTANCE, "paper") if name == "both"
                    else (compare.resolve_metric(name, normalize),))
        names += [n for n in expanded if n not in names]
    return tuple(names)


def _fmt(value, low, high):
    if np.isnan(low) or np.isnan(high):
        return f"{value:.4g} (no spread)"
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def _share(value):
    return "" if value is None or np.isnan(value) else f", {100 * value:.2g}% of parameters"


def _support(value):
    return "no spread available" if np.isnan(value) else f"closest in {100 * value:.0f}% of draws"


def _layer_line(r, prefix, key):
    text = (f"#{r[prefix + '_index']} {r[prefix + '_layer']} (depth {r[prefix + '_depth']:.2f}"
            f"{_share(r[prefix + '_share'])}), distance "
            f"{_fmt(r[key], r[prefix + '_low'], r[prefix + '_high'])}")
    runner = r[prefix + "_runner_up"]
    if r[prefix + "_significant"]:
        return f"{text}; significantly closer than every other layer ({_support(r[prefix + '_support'])})"
    return (f"{compare.NO_VERDICT}: closest {text}, runner-up {runner} "
            f"({_support(r[prefix + '_support'])})")


def _print_summary(summary, stream=None):
    stream = sys.stdout if stream is None else stream
    print("best-matching layer per run (index 0-based; depth = index / (layers - 1)); "
          "[low, high] = bootstrap interval", file=stream)
    for run, rows in summary.groupby("run", sort=False):
        first = rows.iloc[0]
        print(f"{first['model']}+{first['dataset']}  [{run}]  {first['layers']} layers, "
              f"{first['epochs']} epochs; spread (full/layers): {first['spread']}, "
              f"{first['replicates']} draws, level {first['level']:.0%}", file=stream)
        for _, r in rows.iterrows():
            name = r["metric"]
            print(f"  {name:<18} at peak epoch {r['peak_epoch']} ({r['peak_source']}): "
                  f"{_layer_line(r, 'peak', 'peak_distance')}", file=stream)
            if r["peak_source"] == "computed":
                others = [e for e in str(r["peak_epochs_within_spread"]).split(",")
                          if e and e != str(r["peak_epoch"])]
                note = ("significantly closer than every other epoch" if not others else
                        f"epochs {', '.join(others)} not significantly farther")
                print(f"  {'':<18} peak epoch: {note} ({_support(r['peak_epoch_support'])})",
                      file=stream)
            print(f"  {'':<18} over training: {_layer_line(r, 'best', 'best_summed')}",
                  file=stream)
            if r["mixture_blocks"]:
                scope = ("all parameters" if r["mixture_blocks"] == "layers + rest" else
                         "the layer weights only (no spectrum of the other parameters: "
                         "biases, batch norm)")
                print(f"  {'':<18} baseline: block-diagonal mixture over {scope}: distance "
                      f"{_fmt(r['mixture_peak'], r['mixture_peak_low'], r['mixture_peak_high'])}"
                      f" at the peak, {r['mixture_summed']:.4g} summed", file=stream)
            else:
                print(f"  {'':<18} baseline: not available (block sizes unknown)", file=stream)


def _profile_entry(label, row, frame, kind):
    prefix = "peak" if kind == "peak" else "best"
    return {"label": label, "model": row["model"], "dataset": row["dataset"], "frame": frame,
            "best_index": int(row[prefix + "_index"]),
            "significant": bool(row[prefix + "_significant"])}


def match(runs, *, metrics=(compare.DEFAULT_DISTANCE,), peaks=None, epochs=None,
          points=compare.PAPER_POINTS, out=".", fmt="png", dpi=200, ids=None, stream=None,
          replicates=compare.REPLICATES, normalize=None):
    """Compare ``runs`` (loaded :class:`~layerhessians.store.runs.Run` objects) by
    ``metrics`` (registry names), write the CSVs and figures into ``out`` and print the
    summary. Returns ``(distances, summary, paths)``."""
    out = Path(out)
    ids = ids or _run_ids(runs)
    metrics = metric_names(metrics, normalize or "maxabs")
    frames = []
    for run, rid in zip(runs, ids):
        frame = compare.distance_table(run, metrics, epochs=epochs, points=points,
                                       replicates=replicates)
        frames.append(frame.assign(run=rid))
    distances = pd.concat(frames, ignore_index=True)[compare.DISTANCE_COLUMNS]
    peaks = peaks or {}
    for rid, epoch in peaks.items():
        have = set(distances.loc[distances["run"] == rid, "epoch"])
        if epoch is not None and epoch not in have:
            raise UserError(f"peak epoch {epoch} of run {rid} is not among its compared epochs "
                            f"({min(have)}..{max(have)}); give another --peak or --epochs")
    summary = compare.summarize(distances, peaks)

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "match_distros.csv", out / "match_distros_summary.csv"]
    write_csv(paths[0], distances[compare.CSV_COLUMNS])
    write_csv(paths[1], summary)

    labels = _labels(summary)
    titles = {m: _metric_label(m) for m in metrics}
    for kind, name in (("summed", "match_distros_wasserstein"), ("peak", "match_distros_peak")):
        profiles = {m: [] for m in metrics}
        for _, row in summary.iterrows():
            rows = distances[(distances["run"] == row["run"])
                             & (distances["metric"] == row["metric"])]
            frame = compare.profile(rows, row["peak_epoch"] if kind == "peak" else None)
            profiles[row["metric"]].append(_profile_entry(labels[row["run"]], row, frame, kind))
        title = ("layer vs full spectrum: distance summed over training" if kind == "summed"
                 else "layer vs full spectrum: distance at each run's peak epoch")
        fig = plots.plot_depth_profiles(profiles, titles, title=title)
        paths.append(plots.save_figure(fig, out / f"{name}.{fmt}", dpi=dpi))
    _print_summary(summary, stream)
    return distances, summary, paths


def run(args) -> int:
    if args.points < 16:
        raise UserError(f"--points {args.points} is too few for a density curve; use >= 16")
    paths = [Path(p) for p in args.runs]
    if not paths:
        paths, missing = find_seed_runs(".")
        if not paths:
            raise UserError(f"none of the 12 seed run directories ({compare.SEED_RUNS[0]}, ...) "
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
    ids = _run_ids(runs)
    if args.replicates < 0:
        raise UserError(f"--replicates {args.replicates} must be >= 0 (default "
                        f"{compare.REPLICATES})")
    metrics = metric_names(args.metric, args.normalize)
    epochs = compare.parse_epochs(args.epochs) if args.epochs else None
    peaks = parse_peaks(args.peak, runs, ids)
    _, _, written = match(runs, metrics=metrics, peaks=peaks, epochs=epochs,
                          points=args.points, out=args.out, fmt=args.format, dpi=args.dpi,
                          ids=ids, replicates=args.replicates)
    for path in written:
        print(f"saved: {path}")
    return 0

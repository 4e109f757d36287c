"""``layerhessians plot -r RUN``: the figures of one run, written into ``RUN/images/``.

- ``spectrum_<block>.<fmt>``: each block's (full and every layer's) spectral density at the
  epochs of training, colour = epoch, log density against the eigenvalue;
- ``overview_full.<fmt>``: the full Hessian's density as an epoch x eigenvalue heat map,
  with its top eigenvalue and trace per epoch;
- ``layer_distances.<fmt>``: each layer's distance to the full spectrum (layers x epochs);
- ``best_match.<fmt>``: the full spectrum overlaid with its best-matching layer's at the
  peak epoch (see :mod:`layerhessians.analysis.matching`);
- ``training_curves.<fmt>``: loss and accuracy per epoch.
"""

import numpy as np

from layerhessians.analysis import figures as plots
from layerhessians.analysis import matching as compare
from layerhessians.analysis.matching import block_dimensions
from layerhessians.errors import UserError
from layerhessians.store.runs import load_run

HELP = "plot a run's spectra, layer distances and training curves into RUN/images/"


def add_arguments(parser):
    parser.add_argument("-r", "--run", required=True, help="run directory (from `train -r`)")
    parser.add_argument("-m", "--model", help="model name; checked against the run's config.json")
    parser.add_argument("-d", "--dataset", help="dataset name; checked against config.json")
    parser.add_argument("--points", type=int, default=1024,
                        help="grid points per density curve (default: 1024)")
    parser.add_argument("--format", choices=plots.FORMATS, default="png",
                        help="image format (default: png)")
    parser.add_argument("--dpi", type=int, default=200, help="resolution of PNGs (default: 200)")
    parser.add_argument("--epochs", help="epochs to plot, e.g. 0-50 or 1,10,20 (default: all)")
    parser.add_argument("--metric", choices=(*compare.METRICS, "wasserstein"),
                        default=compare.DEFAULT_DISTANCE,
                        help="distance for the layer heat map and best match (default: "
                             f"{compare.DEFAULT_DISTANCE}; wasserstein = W1 on the "
                             "--normalize axis)")
    parser.add_argument("--normalize", choices=tuple(compare.LEGACY_W1), default="maxabs",
                        help="axis of --metric wasserstein (default: maxabs, x / max|x|)")


def _check_identity(run, args):
    for key, given in (("model", args.model), ("dataset", args.dataset)):
        stored = run.config.get(key)
        if given is not None and stored is not None and str(given).lower() != str(stored).lower():
            raise UserError(f"-{key[0]} {given} does not match the run {run.path} "
                            f"({key} {stored} in config.json); drop -{key[0]} or fix -r")


def _selected_epochs(run, spec):
    available = run.epochs
    if not available:
        raise UserError(f"run {run.path} has no spectra yet; train it first "
                        "(or wait for its first epoch)")
    if spec is None:
        return available
    wanted = compare.parse_epochs(spec)
    chosen = [e for e in wanted if e in available]
    if not chosen:
        raise UserError(f"run {run.path} has none of the epochs {spec}; it has "
                        f"{available[0]}..{available[-1]}")
    return chosen


def _title(run):
    model, dataset = run.config.get("model"), run.config.get("dataset")
    return f"{model} on {dataset}" if model and dataset else run.path.name


def make_figures(run, *, points=1024, fmt="png", dpi=200, epochs=None,
                 metric=compare.DEFAULT_DISTANCE, normalize="maxabs", out=None,
                 replicates=compare.REPLICATES) -> list:
    """Write every figure of ``run`` (a :class:`~layerhessians.store.runs.Run`) into ``out``
    (default ``RUN/images``); returns the written paths."""
    if points < 16:
        raise UserError(f"--points {points} is too few for a density curve; use >= 16 "
                        "(default 1024)")
    if fmt not in plots.FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(plots.FORMATS)}")
    out = run.path / "images" if out is None else out
    epochs = _selected_epochs(run, epochs)
    title = _title(run)
    written = []

    def save(fig, name):
        written.append(plots.save_figure(fig, out / f"{name}.{fmt}", dpi=dpi))

    present = set(zip(run.spectra["block"], run.spectra["epoch"].astype(int)))
    lookup = compare.measure_lookup(run)
    measures = {(b, e): lookup(b, e) for b in run.blocks for e in epochs if (b, e) in present}
    for block in run.blocks:
        curves = {e: measures[block, e].density(points=points) for e in epochs
                  if (block, e) in measures}
        if curves:
            save(plots.plot_block_spectra(curves, block, title=f"{title}: {block}"),
                 f"spectrum_{plots.safe_name(block)}")

    full_epochs = [e for e in epochs if ("full", e) in measures]
    if full_epochs:
        full = [measures["full", e] for e in full_epochs]
        lo = min(m.nodes[m.weights > 0].min() for m in full)
        hi = max(m.nodes[m.weights > 0].max() for m in full)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
        grid = np.linspace(lo - pad, hi + pad, points)
        densities = np.stack([m.density(grid=grid)[1] for m in full])
        top = [m.nodes[m.weights > 0].max() for m in full]
        dim = block_dimensions(run.config).get("full")
        means = np.array([np.dot(m.nodes, m.weights) for m in full])
        if dim:
            trace, label = means * dim, "trace"
        else:
            trace, label = means, "trace / dim (mean eigenvalue)"
        save(plots.plot_full_overview(grid, full_epochs, densities, top, trace, label,
                                      title=title), "overview_full")

    if "full" in run.blocks and len(run.blocks) > 1 and full_epochs:
        metric = compare.resolve_metric(metric, normalize)
        distances = compare.layer_distances(run, metric, epochs=full_epochs, points=points,
                                            measure=lookup, replicates=replicates)
        # the peak among training epochs (epoch 0 only if alone), as `match` chooses it
        trained = distances["epoch"].isin(compare.default_epochs(full_epochs))
        peak = compare.peak_epoch(distances[trained])
        label = compare.DISTANCES[metric].label
        per_epoch = distances.sort_values(["epoch", "index"]).groupby("epoch")
        closest = per_epoch.apply(lambda g: g.loc[g["distance"].idxmin()], include_groups=False)
        mixture = distances.drop_duplicates("epoch").sort_values("epoch")
        curves = {"closest layer": (closest.index.to_numpy(), closest["distance"],
                                    closest["distance_low"], closest["distance_high"])}
        if mixture["mixture_distance"].notna().any():
            curves["block-diagonal mixture"] = (mixture["epoch"].to_numpy(),
                                                mixture["mixture_distance"],
                                                mixture["mixture_low"], mixture["mixture_high"])
        save(plots.plot_distance_heatmap(compare.distance_matrix(distances), label, peak=peak,
                                         title=f"{title}: distance of each layer to the full "
                                               "spectrum",
                                         verdicts=compare.epoch_verdicts(distances),
                                         curves=curves), "layer_distances")
        best = compare.best_layer(distances, peak)
        full_m, layer_m = measures["full", peak], measures[best["layer"], peak]
        support = [(m.nodes[m.weights > 0].min(), m.nodes[m.weights > 0].max())
                   for m in (full_m, layer_m)]
        short = "distance" if metric == "paper" else "$W_1$"
        save(plots.plot_best_match(full_m.density(points=points), layer_m.density(points=points),
                                   support[0], support[1], best["layer"], peak,
                                   float(best["distance"]), short,
                                   axis="minmax" if metric == "w1-minmax" else "maxabs"),
             "best_match")

    columns = [f"{s}_{k}" for s in ("train", "test") for k in ("loss", "acc")]
    if len(run.metrics) and run.metrics.reindex(columns=columns).notna().any().any():
        save(plots.plot_training_curves(run.metrics, title=title), "training_curves")
    return written


def run(args) -> int:
    run_ = load_run(args.run)
    _check_identity(run_, args)
    written = make_figures(run_, points=args.points, fmt=args.format, dpi=args.dpi,
                           epochs=args.epochs, metric=args.metric, normalize=args.normalize)
    for path in written:
        print(f"image saved at: {path}")
    return 0

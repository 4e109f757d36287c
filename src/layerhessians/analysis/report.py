"""Reports of runs: every figure of one run (:func:`make_figures`, ``layerhessians plot``)
and the comparison of layer spectra with the full spectrum across runs (:func:`match_runs`,
``layerhessians match``): the computations of :mod:`~layerhessians.analysis.matching` drawn
by :mod:`~layerhessians.analysis.figures` and written as CSVs."""

import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.analysis import figures as plots
from layerhessians.analysis import matching, seed_grid
from layerhessians.analysis.distances import (
    DEFAULT_DISTANCE,
    DISTANCES,
    PAPER_POINTS,
    resolve_metric,
    resolve_metrics,
)
from layerhessians.analysis.matching import block_dimensions, run_record
from layerhessians.errors import UserError
from layerhessians.progress import Progress
from layerhessians.store.manifest import write_csv
from layerhessians.vocabulary import FULL

# ----------------------------------------------------------------------------- one run
#: accepted image resolutions (dots per inch)
DPI_RANGE = (10, 2400)
#: Seconds between progress lines of ``plot`` when the output is not a terminal (a plot
#: takes seconds to minutes: a line every 30 s would leave it silent).
PLOT_PROGRESS_S = 5.0


def check_dpi(dpi) -> int:
    """``dpi`` if it is an integer in :data:`DPI_RANGE`, else :class:`UserError`."""
    lo, hi = DPI_RANGE
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not lo <= dpi <= hi:
        raise UserError(f"--dpi {dpi} is not a resolution; give {lo}..{hi} dots per inch "
                        "(default 200)")
    return dpi


#: the most bootstrap draws (``--replicates``) and density grid points (``--points``): the
#: work and memory they ask for grow with them, so larger values are refused before it starts
MAX_REPLICATES = 100_000
POINTS_RANGE = (16, 1 << 16)


def check_replicates(replicates) -> int:
    """``replicates`` (bootstrap draws behind each distance's spread) if it is an integer
    in ``0..MAX_REPLICATES``, else :class:`UserError`."""
    if isinstance(replicates, bool) or not isinstance(replicates, int) or \
            not 0 <= replicates <= MAX_REPLICATES:
        raise UserError(f"--draws {replicates} must be 0..{MAX_REPLICATES} (default "
                        f"{matching.REPLICATES}; 0: no spread, no verdicts)")
    return replicates


def check_points(points) -> int:
    """``points`` (density grid points) if it is an integer in :data:`POINTS_RANGE`, else
    :class:`UserError`."""
    lo, hi = POINTS_RANGE
    if isinstance(points, bool) or not isinstance(points, int):
        raise UserError(f"--points {points!r} is not a density grid size; give {lo}..{hi} "
                        f"(default {PAPER_POINTS})")
    if not lo <= points <= hi:
        raise UserError(f"--points {points} is too {'few' if points < lo else 'many'} for a "
                        f"density curve; give {lo}..{hi} (default {PAPER_POINTS})")
    return points


def parse_epochs_within(spec, available, where) -> list:
    """The epochs of ``spec`` (``"1-50"``, ``"0,5,10"``; see
    :func:`~layerhessians.analysis.matching.parse_epochs`), checked first against the
    largest epoch in ``available`` (so that ``0-1000000000`` is refused, not expanded).

    Raises:
        UserError: an unreadable spec, or an epoch beyond what ``where`` holds.
    """
    first, last = min(available), max(available)
    numbers = [int(n) for n in re.findall(r"\d+", str(spec))]
    beyond = [n for n in numbers if n > last]
    if beyond and len(beyond) == len(numbers):
        raise UserError(f"{where}: none of the epochs {spec} (no spectra at epoch "
                        f"{beyond[0]}); available: {first}..{last}")
    if beyond:
        raise UserError(f"--epochs {spec}: no spectra at epoch {beyond[0]} ({where}: epochs "
                        f"{first}..{last}); give epochs within them")
    return matching.parse_epochs(spec)


def _selected_epochs(run, spec):
    available = run.epochs
    if not available:
        raise UserError(f"run {run.path} has no spectra yet; train it first "
                        "(or wait for its first epoch)")
    if spec is None:
        return available
    wanted = parse_epochs_within(spec, available, f"run {run.path}")
    chosen = [e for e in wanted if e in available]
    if not chosen:
        raise UserError(f"run {run.path} has none of the epochs {spec}; it has "
                        f"{available[0]}..{available[-1]}")
    return chosen


def _title(run):
    model, dataset = run_record(run).model, run_record(run).dataset
    return f"{model} on {dataset}" if model and dataset else run.path.name


def make_figures(run, *, points=1024, fmt="png", dpi=200, epochs=None,
                 metric=DEFAULT_DISTANCE, normalize="maxabs", out=None,
                 replicates=matching.REPLICATES, progress: bool = False) -> list:
    """Write every figure of ``run`` (a :class:`~layerhessians.store.run.Run`) into ``out``
    (default ``RUN/images``); returns the written paths.

    ``metric``: a registry name (:data:`~layerhessians.analysis.DISTANCES`) or
    ``"wasserstein"`` (W1 on the ``normalize`` axis) for the layer heat map and the best
    match; ``replicates``: bootstrap draws behind the verdict marks and bands;
    ``progress``: the figures written so far (a bar on a terminal, else a line every
    :data:`PLOT_PROGRESS_S` seconds, also during one slow figure)."""
    with Progress(desc=f"plot {run.path.name}", unit="figure", disable=not progress,
                  interval=PLOT_PROGRESS_S) as bar:
        return _figures(run, points, fmt, dpi, epochs, metric, normalize, out, replicates,
                        saved=bar.update)


def _figures(run, points, fmt, dpi, epochs, metric, normalize, out, replicates, saved) -> list:
    check_points(points)
    if fmt not in plots.FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(plots.FORMATS)}")
    check_dpi(dpi)
    check_replicates(replicates)
    metric = resolve_metric(metric, normalize)
    out = run.path / "images" if out is None else out
    _check_folder(out)
    epochs = _selected_epochs(run, epochs)
    title = _title(run)
    written = []

    def save(fig, name):
        written.append(plots.save_figure(fig, out / f"{name}.{fmt}", dpi=dpi))
        saved()

    present = set(zip(run.spectra["block"], run.spectra["epoch"].astype(int)))
    lookup = matching.measure_lookup(run)
    measures = {(b, e): lookup(b, e) for b in run.blocks for e in epochs if (b, e) in present}
    for block in run.blocks:
        curves = {e: measures[block, e].density(points=points) for e in epochs
                  if (block, e) in measures}
        if curves:
            save(plots.plot_block_spectra(curves, block, title=f"{title}: {block}"),
                 f"spectrum_{plots.safe_name(block)}")

    full_epochs = [e for e in epochs if (FULL, e) in measures]
    if full_epochs:
        full = [measures[FULL, e] for e in full_epochs]
        lo = min(m.nodes[m.weights > 0].min() for m in full)
        hi = max(m.nodes[m.weights > 0].max() for m in full)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
        grid = np.linspace(lo - pad, hi + pad, points)
        densities = np.stack([m.density(grid=grid)[1] for m in full])
        top = [m.nodes[m.weights > 0].max() for m in full]
        dim = block_dimensions(run_record(run)).get(FULL)
        means = np.array([np.dot(m.nodes, m.weights) for m in full])
        if dim:
            trace, label = means * dim, "trace"
        else:
            trace, label = means, "trace / dim (mean eigenvalue)"
        save(plots.plot_full_overview(grid, full_epochs, densities, top, trace, label,
                                      title=title), "overview_full")

    if FULL in run.blocks and len(run.blocks) > 1 and full_epochs:
        distances = matching.layer_distances(run, metric, epochs=full_epochs, points=points,
                                            measure=lookup, replicates=replicates)
        # the peak among training epochs (epoch 0 only if alone), as `match` chooses it
        trained = distances["epoch"].isin(matching.default_epochs(full_epochs))
        peak = matching.peak_epoch(distances[trained])
        label = DISTANCES[metric].label
        per_epoch = distances.sort_values(["epoch", "index"]).groupby("epoch")
        closest = per_epoch.apply(lambda g: g.loc[g["distance"].idxmin()], include_groups=False)
        mixture = distances.drop_duplicates("epoch").sort_values("epoch")
        curves = {"closest layer": (closest.index.to_numpy(), closest["distance"],
                                    closest["distance_low"], closest["distance_high"])}
        if mixture["mixture_distance"].notna().any():
            curves["block-diagonal mixture"] = (mixture["epoch"].to_numpy(),
                                                mixture["mixture_distance"],
                                                mixture["mixture_low"], mixture["mixture_high"])
        save(plots.plot_distance_heatmap(matching.distance_matrix(distances), label, peak=peak,
                                         title=f"{title}: distance of each layer to the full "
                                               "spectrum",
                                         verdicts=matching.epoch_verdicts(distances),
                                         curves=curves), "layer_distances")
        best = matching.best_layer(distances, peak)
        full_m, layer_m = measures[FULL, peak], measures[best["layer"], peak]
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


def _check_folder(out):
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file; choose a folder (or remove the file)")


# ----------------------------------------------------------------------------- across runs
def common_parent(paths) -> Path:
    """The deepest folder holding every one of ``paths`` (run directories): ``match``'s
    default output folder. Relative to the working directory when it lies inside it.

    Raises:
        UserError: the only common folder is the file system's root.
    """
    parent = Path(os.path.commonpath([Path(p).absolute().parent for p in paths]))
    if parent == Path(parent.anchor):
        raise UserError("the runs share no folder but the file system's root; choose where "
                        "the match outputs go with --out")
    try:
        return parent.relative_to(Path.cwd())
    except ValueError:
        return parent


def find_seed_runs(folder=".") -> tuple:
    """``(present paths, missing names)`` of the 12 seed run directories in ``folder``."""
    folder = Path(folder)
    present = [folder / n for n in seed_grid.SEED_RUNS if (folder / n).is_dir()]
    missing = [n for n in seed_grid.SEED_RUNS if not (folder / n).is_dir()]
    return present, missing


def run_ids(runs) -> list:
    """Short ids of ``runs`` for tables: the folder name, or the full path where names repeat.

    Args:
        runs: loaded runs (objects with a ``.path``), in order.

    Returns:
        One id (str) per run, in order.
    """
    names = [r.path.name for r in runs]
    return [r.path.name if names.count(r.path.name) == 1 else str(r.path) for r in runs]


def parse_peaks(specs, runs, ids) -> dict:
    """``{run id: epoch or None}`` from ``--peak`` values (``RUN=EPOCH`` or ``paper``)."""
    peaks = {}
    for spec in specs:
        if spec.strip().lower() == "paper":
            for run, rid in zip(runs, ids):
                epoch = seed_grid.paper_peak_epoch(run_record(run).model, run_record(run).dataset)
                if epoch is None:
                    print(f"note: no paper peak for {rid} ({run_record(run).model}+"
                          f"{run_record(run).dataset}); its peak is computed", file=sys.stderr)
                peaks.setdefault(rid, epoch)
            continue
        name, sep, value = spec.rpartition("=")
        try:
            epoch = int(value)
        except ValueError:
            epoch = None
        if not sep or epoch is None or epoch < 0:
            raise UserError(f"--peak {spec!r}: give RUN=EPOCH (e.g. --peak "
                            f"'{seed_grid.SEED_RUNS[0]}=18') or --peak paper")
        matches = [rid for run, rid in zip(runs, ids)
                   if name in (rid, run.path.name, str(run.path)) or Path(name) == run.path]
        if not matches:
            raise UserError(f"--peak {spec!r}: {name!r} is not one of the runs compared "
                            f"({', '.join(ids)})")
        for rid in matches:
            peaks[rid] = epoch
    return peaks


# ----------------------------------------------------------------------------- output
def _metric_label(metric):
    return DISTANCES[metric].label if metric in DISTANCES else str(metric)


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
        return (f"{text}; significantly closer than every other layer "
                f"({_support(r[prefix + '_support'])})")
    return (f"{matching.NO_VERDICT}: closest {text} ({_support(r[prefix + '_support'])}), "
            f"runner-up {runner}")


def print_summary(summary, stream=None):
    """Print ``summary`` (:func:`~layerhessians.analysis.matching.summarize`'s table) to
    ``stream`` (default stdout): per run and metric the best layer at the peak epoch and over
    training with its bootstrap interval and verdict, the peak epoch's own verdict, and the
    block-diagonal mixture baseline."""
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
                word = "epoch" if len(others) == 1 else "epochs"
                note = ("significantly closer than every other epoch" if not others else
                        f"{word} {', '.join(others)} not significantly farther")
                print(f"  {'':<18} peak epoch: {note} (the peak epoch is "
                      f"{_support(r['peak_epoch_support'])})", file=stream)
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


#: what ``match`` writes into its output folder (and the two figures, by format)
MATCH_OUTPUTS = ("match_distros.csv", "match_distros_summary.csv",
                 "match_distros_settings.csv", "match_distros_groups.csv")
MATCH_FIGURES = ("match_distros_wasserstein", "match_distros_peak")


def _one_thread():
    """A worker process of ``match --workers``: one thread (torch and BLAS)."""
    from layerhessians.training.threads import set_threads

    set_threads(1)


def _compared_epochs(run, epochs):
    available = list(run.epochs)
    chosen = matching.default_epochs(available) if epochs is None else list(epochs)
    return [e for e in chosen if e in available] or chosen


def match_runs(runs, *, metrics=(DEFAULT_DISTANCE,), normalize=None, peaks=None,
               epochs=None, points=PAPER_POINTS, out=None, fmt="png", dpi=200,
               ids=None, stream=None, replicates=matching.REPLICATES, progress=None,
               workers: int = 1):
    """Compare ``runs`` (loaded :class:`~layerhessians.store.run.Run` objects) by
    ``metrics`` (registry names, or ``--metric`` values for :func:`~layerhessians.analysis.distances.resolve_metrics` with
    ``normalize``), pool the runs that are replicates of one setting
    (:mod:`~layerhessians.analysis.pooling`), write the CSVs and figures into ``out``
    (default: the runs' :func:`common_parent`; outputs of an earlier match there are
    overwritten, with a note) and print the settings, the per-run summary
    (:func:`print_summary`) and the settings' verdicts to ``stream``.

    ``replicates`` is the number of bootstrap draws per run (``--draws``); ``progress``
    (``None``: a bar on a terminal, log lines otherwise; ``False``: none) follows the
    epochs compared; ``workers`` > 1 computes the runs' distances in that many processes
    (one thread each; the same numbers: every run's draws are seeded alike).

    Returns:
        ``(distances, summary, paths)``; ``summary.attrs["settings"]`` holds the pooled
        table (:data:`~layerhessians.analysis.pooling.SETTINGS_COLUMNS`) and
        ``summary.attrs["groups"]`` which setting each run joined (written as
        ``match_distros_settings.csv`` and ``match_distros_groups.csv`` when a setting has
        more than one replicate; otherwise the outputs are today's).

    Raises:
        UserError: bad resolution, draws, metric, output folder or peak epoch.
    """
    from layerhessians.analysis import pooling
    from layerhessians.progress import Progress
    from layerhessians.training.config import TrainConfig

    check_dpi(dpi)
    check_replicates(replicates)
    check_points(points)
    metrics = resolve_metrics(metrics, normalize or "maxabs")
    out = common_parent([r.path for r in runs]) if out is None else Path(out)
    _check_folder(out)
    ids = ids or run_ids(runs)
    stream = sys.stdout if stream is None else stream
    frames = []
    total = sum(len(_compared_epochs(r, epochs)) for r in runs)
    bar = Progress(total=total, desc=f"match: {len(runs)} runs x {', '.join(metrics)}",
                   unit="epoch", disable=progress is False)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers {workers!r} must be an integer >= 1 (processes)")
    with bar:
        if workers == 1 or len(runs) == 1:
            for run, rid in zip(runs, ids):
                frame = matching.distance_table(run, metrics, epochs=epochs, points=points,
                                               replicates=replicates, on_epoch=bar.update)
                frames.append(frame.assign(run=rid))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            spawn = multiprocessing.get_context("spawn")  # no fork of a threaded process
            with ProcessPoolExecutor(min(workers, len(runs)), mp_context=spawn,
                                     initializer=_one_thread) as pool:
                futures = [pool.submit(matching.distance_table, run, metrics, epochs=epochs,
                                       points=points, replicates=replicates) for run in runs]
                for run, rid, future in zip(runs, ids, futures):
                    frames.append(future.result().assign(run=rid))
                    bar.update(len(_compared_epochs(run, epochs)))
    distances = pd.concat(frames, ignore_index=True)[matching.DISTANCE_COLUMNS]
    peaks = peaks or {}
    for rid, epoch in peaks.items():
        have = set(distances.loc[distances["run"] == rid, "epoch"])
        if epoch is not None and epoch not in have:
            raise UserError(f"peak epoch {epoch} of run {rid} is not among its compared epochs "
                            f"({min(have)}..{max(have)}); give another --peak or --epochs")
    summary = matching.summarize(distances, peaks)
    layouts = []
    for rid in ids:
        rows = distances[distances["run"] == rid]
        layouts.append((list(rows.drop_duplicates("index").sort_values("index")["layer"]),
                        sorted(rows["epoch"].unique())))
    configs = [pooling.setting_view(run_record(r)) for r in runs]
    settings, groups = pooling.group_runs(ids, configs, layouts)
    recorded = [TrainConfig.from_dict(c) for c in configs]  # defaults where not recorded
    seeds = {rid: (c.seed, c.hessian.subset_seed) for rid, c in zip(ids, recorded)}
    table = pooling.pool_settings(distances, settings, peaks, seeds=seeds)
    summary.attrs.update(settings=table, groups=groups)

    out.mkdir(parents=True, exist_ok=True)
    pooled = any(len(s["runs"]) > 1 for s in settings)
    # one replicate per setting: today's outputs (the settings table would repeat the summary)
    paths = [out / name for name in (MATCH_OUTPUTS if pooled else MATCH_OUTPUTS[:2])]
    earlier = [p.name for p in [*paths, *(out / f"{n}.{fmt}" for n in MATCH_FIGURES)]
               if p.is_file()]
    if earlier:
        print(f"note: overwriting the outputs of an earlier match in {out}: "
              f"{', '.join(earlier)}", file=stream)
    write_csv(paths[0], distances[matching.CSV_COLUMNS])
    write_csv(paths[1], summary)
    if pooled:
        write_csv(paths[2], table)
        write_csv(paths[3], groups)

    labels = {s["setting"]: s["label"] for s in settings}
    titles = {m: _metric_label(m) for m in metrics}
    for kind, name in (("summed", MATCH_FIGURES[0]), ("peak", MATCH_FIGURES[1])):
        profiles = {m: [] for m in metrics}
        for (setting, metric), rows in table[table["scope"] == kind].groupby(
                ["setting", "metric"], sort=False):
            profiles[metric].append(_setting_entry(labels[setting], rows))
        title = ("layer vs full spectrum: distance summed over training" if kind == "summed"
                 else "layer vs full spectrum: distance at each run's peak epoch")
        if len(table) and table["replicates"].max() > 1:
            title += " (replicates pooled)"
        fig = plots.plot_depth_profiles(profiles, titles, title=title)
        paths.append(plots.save_figure(fig, out / f"{name}.{fmt}", dpi=dpi))
    if pooled:
        print_settings(settings, stream)
    else:
        print("settings: each run is a setting of its own (no two runs differ only in their "
              "training and Hessian-subset seeds); nothing pooled", file=stream)
    print_summary(summary, stream)
    if pooled:  # one replicate per setting: the summary above says it all
        print("verdicts per setting (mean distance over replicates; support = share of "
              "pooled draws):", file=stream)
        for line in pooling.setting_verdicts(table, labels):
            print(f"  {line}", file=stream)
    return distances, summary, paths


def _setting_entry(label, rows) -> dict:
    """A :func:`~layerhessians.analysis.figures.plot_depth_profiles` entry of one setting,
    metric and scope (rows of the pooled table): distances divided by their maximum."""
    frame = rows.sort_values("index").reset_index(drop=True)
    top = frame["distance"].max()
    scale = top if top > 0 else np.nan
    frame = frame.assign(relative=frame["distance"] / scale,
                         relative_low=frame["distance_low"] / scale,
                         relative_high=frame["distance_high"] / scale)
    best = int(frame["distance"].to_numpy().argmin())
    first = frame.iloc[0]
    replicates = int(first["replicates"])
    return {"label": label if replicates == 1 else f"{label} ({replicates} replicates)",
            "model": first["model"], "dataset": first["dataset"], "frame": frame,
            "best_index": best, "significant": bool(frame["significant"].iloc[best])}


def print_settings(settings, stream=None) -> None:
    """Print which setting each run joined and why settings were not pooled."""
    from layerhessians.analysis.pooling import not_pooled

    stream = sys.stdout if stream is None else stream
    print("settings (runs differing only in the training seed and the Hessian-subset seed "
          "are replicates of one setting):", file=stream)
    for s in settings:
        count = len(s["runs"])
        names = ", ".join(s["runs"]) if count <= 6 else (
            f"{', '.join(s['runs'][:3])}, ... {s['runs'][-1]}")
        print(f"  {s['setting']} {s['label']}: {count} run{'s' if count > 1 else ''} "
              f"({names})", file=stream)
        if s["nearest"] is not None:
            print(f"     {not_pooled(s['nearest'])}", file=stream)

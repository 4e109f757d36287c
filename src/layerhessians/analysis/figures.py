"""Figures: spectral densities through training, distances to the full spectrum, curves.

Every function takes plain data (numpy arrays, pandas frames) and returns a matplotlib
``Figure``; :func:`save_figure` writes it atomically and closes it. Nothing here reads run
directories or shows windows (the Agg backend is used when none was chosen).

Conventions: eigenvalues on a linear axis in the Hessian's own units (loss per parameter
squared); densities per unit eigenvalue on a log axis; epochs counted in completed training
epochs (0 = initialisation).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:  # headless by default; never plt.show
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from layerhessians.store.atomic import atomic_path  # noqa: E402

FORMATS = ("png", "pdf")
DENSITY_RANGE = 1e-6  # log-density axes reach down to at most peak * DENSITY_RANGE
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
    "image.cmap": "viridis",
}
DATASET_ORDER = ("Digits", "MNIST", "FashionMNIST", "SVHN", "CIFAR10", "CIFAR100")
MODEL_STYLES = {"LeNet": ("-", "o"), "VGG11": ("--", "s"), "VGG11_bn": ("--", "s"),
                "ResNet18": (":", "^")}


@contextmanager
def style():
    """The house style for paper-size figures (readable at ~3.3-7 in wide)."""
    with plt.rc_context(STYLE):
        yield


def save_figure(fig, path, dpi: int = 200) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file in the same folder, then
    ``os.replace``; :func:`~layerhessians.store.atomic.atomic_path`); the format follows the suffix. Closes the figure; returns the path."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def safe_name(block: str) -> str:
    """A file-name-safe version of a block name (``layer1.0.conv1.weight`` stays as is)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in block)


def wrap_label(text: str, width: int) -> str:
    """``text`` broken into lines of about ``width`` characters, never inside ``$...$``
    (mathtext cannot span lines)."""
    words, chunk = [], []
    for word in str(text).split(" "):
        chunk.append(word)
        if " ".join(chunk).count("$") % 2 == 0:  # outside math: a breakable word
            words.append(" ".join(chunk))
            chunk = []
    if chunk:
        words.append(" ".join(chunk))
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def _epoch_colors(epochs):
    epochs = list(epochs)
    norm = Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    cmap = plt.get_cmap("viridis")
    return norm, cmap


def _density_limits(curves):
    """Log-axis limits: up to twice the highest peak, down to the lowest curve's own floor
    (its smallest positive value, but no lower than its peak * DENSITY_RANGE)."""
    tops, floors = [], []
    for _, density in curves:
        density = np.asarray(density, float)
        positive = density[density > 0]
        if positive.size:
            tops.append(positive.max())
            floors.append(max(positive.min(), positive.max() * DENSITY_RANGE))
    if not tops:
        return DENSITY_RANGE, 1.0
    return min(floors) * 0.5, max(tops) * 2.0


# ----------------------------------------------------------------------------- spectra
def plot_block_spectra(curves, block: str, title: str | None = None):
    """Spectral density of one block at several epochs, colour = epoch.

    ``curves``: ``{epoch: (grid [P], density [P])}`` (eigenvalues; density per unit
    eigenvalue). Log-scaled density axis from ``peak * DENSITY_RANGE`` to ``2 * peak``.
    """
    if not curves:
        raise ValueError("no spectra to plot")
    epochs = sorted(curves)
    with style():
        fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
        norm, cmap = _epoch_colors(epochs)
        width = 1.2 if len(epochs) <= 10 else 0.8
        for epoch in epochs:
            grid, density = curves[epoch]
            ax.plot(grid, np.clip(density, 1e-300, None), color=cmap(norm(epoch)), lw=width)
        ax.set_yscale("log")
        ax.set_ylim(*_density_limits(curves.values()))
        ax.set_xlabel("eigenvalue $\\lambda$")
        ax.set_ylabel("spectral density")
        ax.set_title(title or f"Hessian spectrum: {block}")
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        bar.set_label("epoch")
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
    return fig


def plot_full_overview(grid, epochs, densities, top, trace, trace_label: str = "trace",
                       title: str | None = None):
    """The full Hessian spectrum through training, its top eigenvalue and its trace.

    ``grid`` [P] eigenvalues shared by all epochs; ``epochs`` [E]; ``densities`` [E, P]
    (per unit eigenvalue) drawn as an epoch x eigenvalue heat map with log colour;
    ``top`` [E] top eigenvalue per epoch; ``trace`` [E] (or None) trace per epoch, with
    its axis label ``trace_label``.
    """
    grid = np.asarray(grid, float)
    epochs = np.asarray(epochs)
    densities = np.asarray(densities, float)
    with style():
        fig = plt.figure(figsize=(7.2, 3.6), layout="constrained")
        outer = fig.add_gridspec(1, 2, width_ratios=[1.7, 1])
        ax = fig.add_subplot(outer[0])
        right = outer[1].subgridspec(2, 1)
        ax_top = fig.add_subplot(right[0])
        ax_trace = fig.add_subplot(right[1], sharex=ax_top)
        peak = densities.max() if densities.size and densities.max() > 0 else 1.0
        vmin = peak * DENSITY_RANGE
        mesh = ax.pcolormesh(grid, epochs, np.clip(densities, vmin, None), shading="nearest",
                             norm=LogNorm(vmin=vmin, vmax=peak), cmap="magma",
                             rasterized=True)
        ax.scatter(top, epochs, marker="x", s=22, lw=1.2, color="#4dd2ff", zorder=3,
                   label="top eigenvalue")
        ax.legend(loc="upper right", frameon=True, framealpha=0.85, fontsize=8)
        ax.set_xlabel("eigenvalue $\\lambda$")
        ax.set_ylabel("epoch")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_title("full Hessian spectral density")
        ax.grid(False)
        bar = fig.colorbar(mesh, ax=ax, pad=0.02)
        bar.set_label("density (log scale)")
        ax_top.plot(epochs, top, marker="o", ms=3, color="C3")
        ax_top.set_ylabel("top eigenvalue")
        ax_top.tick_params(labelbottom=False)
        if trace is not None:
            ax_trace.plot(epochs, trace, marker="o", ms=3, color="C0")
        ax_trace.set_ylabel(trace_label)
        ax_trace.set_xlabel("epoch")
        ax_trace.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        if title:
            fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- distances
def per_epoch_scaled(matrix: pd.DataFrame) -> pd.DataFrame:
    """Each epoch (column) of a layers x epochs table divided by its smallest distance
    (1 = the closest layer at that epoch, 3 = three times as far). A zero minimum is
    replaced by the column's smallest positive distance (a column of zeros gives 1)."""
    values = matrix.to_numpy(float)
    floor = np.min(np.where(values > 0, values, np.inf), axis=0)
    floor = np.where(np.isfinite(floor), floor, 1.0)
    scaled = np.maximum(values, 0) / floor
    scaled = np.where(values > 0, scaled, 1.0)
    return pd.DataFrame(np.where(np.isnan(values), np.nan, scaled), index=matrix.index,
                        columns=matrix.columns)


def plot_distance_heatmap(matrix: pd.DataFrame, metric_label: str, peak=None,
                          title: str | None = None, verdicts: pd.DataFrame | None = None,
                          curves=None):
    """Distance of each layer's spectrum to the full one: layers (rows, input at top) x
    epochs (columns), each epoch's column divided by its smallest distance and coloured on
    a log scale (:func:`per_epoch_scaled`), so layers within an epoch can be told apart
    whatever the epoch's overall level and however far the farthest layer is.

    ``verdicts``: optional per-epoch frame (``epoch``, ``index``, ``significant``; see
    :func:`layerhessians.analysis.matching.epoch_verdicts`): the closest layer gets a white
    dot where it is significantly closer, a black cross where no layer is. Without it, dots
    mark the closest layer. ``peak``: an epoch boxed in red. ``curves``: optional
    ``{label: (epochs, value, low, high)}`` drawn above the map on the raw scale (e.g. the
    closest layer's distance and the block-diagonal baseline) with bands for ``low``..``high``.
    """
    values = matrix.to_numpy(float)
    scaled = per_epoch_scaled(matrix).to_numpy(float)
    epochs = np.asarray(matrix.columns)
    layers = list(matrix.index)
    height = min(9.5, max(3.2, 1.8 + 0.22 * len(layers))) + (1.3 if curves else 0.0)
    with style():
        fig = plt.figure(figsize=(7.2, height), layout="constrained")
        if curves:
            grid = fig.add_gridspec(2, 1, height_ratios=[1, 2.6])
            ax_top = fig.add_subplot(grid[0])
            ax = fig.add_subplot(grid[1], sharex=ax_top)
        else:
            ax_top, ax = None, fig.add_subplot(1, 1, 1)
        rows = np.arange(len(layers))
        top = np.nanmax(scaled) if np.isfinite(scaled).any() else 1.0
        mesh = ax.pcolormesh(epochs, rows, scaled, shading="nearest", cmap="viridis_r",
                             norm=LogNorm(vmin=1.0, vmax=max(top, 1.0 + 1e-6)),
                             rasterized=True)
        best = np.nanargmin(np.where(np.isnan(values), np.inf, values), axis=0)
        if verdicts is not None:
            v = verdicts.set_index("epoch").reindex(epochs)
            sig = v["significant"].fillna(False).to_numpy(bool)
            best = v["index"].fillna(-1).to_numpy(int)
            ax.scatter(epochs[sig], best[sig], s=14, color="white", edgecolor="black", lw=0.6,
                       zorder=3, label="closest layer (significantly)")
            ax.scatter(epochs[~sig], best[~sig], s=30, marker="x", color="black", lw=1.4,
                       zorder=3, label="no layer significantly closer")
        else:
            ax.scatter(epochs, best, s=10, color="white", edgecolor="black", lw=0.5, zorder=3,
                       label="closest layer per epoch")
        if peak is not None and peak in set(epochs.tolist()):
            col = list(epochs).index(peak)
            ax.scatter([peak], [best[col]], s=90, marker="s", facecolor="none",
                       edgecolor="red", lw=1.5, zorder=4, label=f"peak epoch {peak}")
        ax.set_yticks(rows, layers, fontsize=8 if len(layers) <= 12 else 6.5)
        ax.invert_yaxis()
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_ylabel("layer (input $\\to$ output)")
        ax.grid(False)
        bar = fig.colorbar(mesh, ax=ax, pad=0.01)
        bar.set_label("distance / closest layer's\n(per epoch, log scale)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14 if height > 3.5 else -0.22),
                  ncol=3, frameon=False, fontsize=8)
        if ax_top is not None:
            for k, (label, (x, y, lo, hi)) in enumerate(curves.items()):
                color = f"C{k + 1}"  # solid first, then dashed: coinciding curves stay visible
                ax_top.plot(x, y, color=color, marker="os^"[k % 3], ms=3.5 - k, lw=1.2,
                            ls=("-", "--", ":")[k % 3], label=label)
                lo, hi = np.asarray(lo, float), np.asarray(hi, float)
                if np.isfinite(lo).any():
                    ax_top.fill_between(x, lo, hi, color=color, alpha=0.25, lw=0)
            ax_top.set_ylabel(wrap_label(metric_label, 22), fontsize=8.5)
            ax_top.tick_params(labelbottom=False)
            ax_top.legend(loc="best", frameon=False, fontsize=7.5)
            ax_top.set_title(title or "distance of each layer's spectrum to the full spectrum")
        else:
            ax.set_title(title or "distance of each layer's spectrum to the full spectrum")
    return fig


def normalized_curve(grid, density, lo: float, hi: float):
    """A density mapped to the axis ``(x - lo) / (hi - lo)``: returns ``(x, density * (hi - lo))``
    so it stays a density (integrates to the same mass) on the new axis."""
    width = hi - lo if hi > lo else 1.0
    return (np.asarray(grid) - lo) / width, np.asarray(density) * width


def plot_best_match(full_curve, layer_curve, full_support, layer_support, layer: str,
                    epoch: int, distance: float, metric_label: str, axis: str = "maxabs"):
    """The full spectrum overlaid with a layer's, on the eigenvalue axis (left) and on the
    normalised axis a W1 metric compares (right): ``axis="maxabs"`` divides each spectrum
    by its own largest ``|eigenvalue|`` (the default metric's axis), ``"minmax"`` maps each
    support to [0, 1].

    ``*_curve``: ``(grid, density)``; ``*_support``: ``(min node, max node)``.
    """
    with style():
        fig, (ax_raw, ax_norm) = plt.subplots(1, 2, figsize=(7.2, 3.0), layout="constrained")
        curves = []
        for curve, support, label, color, line in (
                (full_curve, full_support, "full Hessian", "C0", "-"),
                (layer_curve, layer_support, layer, "C1", "--")):
            grid, density = curve
            ax_raw.plot(grid, np.clip(density, 1e-300, None), color=color, ls=line, lw=1.3,
                        label=label)
            if axis == "minmax":
                lo, hi = support
            else:
                scale = max(abs(support[0]), abs(support[1])) or 1.0
                lo, hi = 0.0, scale
            x, y = normalized_curve(grid, density, lo, hi)
            ax_norm.plot(x, np.clip(y, 1e-300, None), color=color, ls=line, lw=1.3, label=label)
            curves.append((x, y))
        for ax in (ax_raw, ax_norm):
            ax.set_yscale("log")
            ax.set_ylabel("spectral density")
        ax_raw.set_ylim(*_density_limits([full_curve, layer_curve]))
        ax_norm.set_ylim(*_density_limits(curves))
        ax_raw.set_xlabel("eigenvalue $\\lambda$")
        if axis == "minmax":
            ax_norm.set_xlabel("$(\\lambda - \\lambda_{min}) / (\\lambda_{max} - \\lambda_{min})$")
            ax_norm.set_title("each support mapped to [0, 1]")
        else:
            ax_norm.set_xlabel("$\\lambda / \\max|\\lambda|$")
            ax_norm.set_title("each spectrum / its largest $|\\lambda|$")
        ax_raw.set_title("eigenvalue axis")
        ax_raw.legend(loc="upper right", frameon=False)
        fig.suptitle(f"closest layer at epoch {epoch}: {layer} ({metric_label} = {distance:.3g})")
    return fig


# ----------------------------------------------------------------------------- training
def plot_training_curves(metrics: pd.DataFrame, title: str | None = None):
    """Loss and accuracy per epoch, train and test (``metrics.csv`` columns). Accuracy is
    shown in percent (fractions in [0, 1] are scaled by 100). A quantity with no values
    gets no panel; with none at all, a ``ValueError``."""
    frame = metrics.sort_values("epoch")
    panels = []
    for kind, label in (("loss", "cross-entropy loss"), ("acc", "accuracy (%)")):
        series = [(split, frame[f"{split}_{kind}"]) for split in ("train", "test")
                  if f"{split}_{kind}" in frame and frame[f"{split}_{kind}"].notna().any()]
        if series:
            panels.append((kind, label, series))
    if not panels:
        raise ValueError("no loss or accuracy values to plot")
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 2.8),
                                 layout="constrained", squeeze=False)
        for ax, (kind, label, series) in zip(axes[0], panels):
            for split, values in series:
                scale = 100.0 if kind == "acc" and values.max() <= 1.0 else 1.0
                ax.plot(frame["epoch"], values * scale, color="C0" if split == "train" else "C1",
                        marker="o", ms=2.5, label=split)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.set_ylabel(label)
            ax.legend(frameon=False)
        if title:
            fig.suptitle(title)
    return fig


def save_training_curves(metrics: pd.DataFrame, folder, title: str | None = None,
                         dpi: int = 100) -> list:
    """``folder/loss.png`` and ``folder/acc.png`` (train and test, per epoch) from a run's
    metrics (``metrics.csv`` columns), drawn by :func:`plot_training_curves`; nothing
    without rows. Returns the written paths."""
    if not len(metrics):
        return []
    written = []
    for kind in ("loss", "acc"):
        columns = ["epoch", f"train_{kind}", f"test_{kind}"]
        written.append(save_figure(plot_training_curves(metrics[columns], title=title),
                                   Path(folder) / f"{kind}.png", dpi=dpi))
    return written


MODEL_ORDER = ("LeNet", "VGG11", "VGG11_bn", "ResNet18")
DATASET_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.")


def run_styles(runs) -> dict:
    """``{label: (colour, marker, linestyle)}`` for runs ``[(label, model, dataset), ...]``:
    one colour per model, one marker per dataset, and a new line style for each further
    run of the same model and dataset, so no two runs look the same."""
    runs = list(runs)
    models = sorted({m for _, m, _ in runs},
                    key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else 99, str(m)))
    datasets = sorted({d for _, _, d in runs},
                      key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, str(d)))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    markers = {d: DATASET_MARKERS[i % len(DATASET_MARKERS)] for i, d in enumerate(datasets)}
    seen, styles = {}, {}
    for label, model, dataset in runs:
        if label in styles:
            continue
        k = seen.get((model, dataset), 0)
        seen[(model, dataset)] = k + 1
        styles[label] = (colors[model], markers[dataset], LINESTYLES[k % len(LINESTYLES)])
    return styles


def plot_depth_profiles(profiles, metric_labels, title: str | None = None):
    """Relative distance to the full spectrum against relative depth, one line per run or setting.

    ``profiles``: ``{panel: [entry, ...]}``, one panel per key (e.g. per metric) titled by
    ``metric_labels[key]``; an entry is a dict with ``label``, ``model``, ``dataset``,
    ``frame`` (columns ``depth`` in [0, 1], ``relative`` = distance / the largest over layers,
    optional ``relative_low``/``relative_high``: the interval, drawn as error bars) and
    optional ``best_index`` (the closest layer's row) and ``significant`` (the verdict).
    The closest layer is marked with a star when it is significantly closer than every
    other layer, with an open circle and "n.s." otherwise. Colour = model, marker =
    dataset (:func:`run_styles`).
    """
    panels = list(profiles)
    runs = [(e["label"], e["model"], e["dataset"]) for rows in profiles.values() for e in rows]
    styles = run_styles(runs)
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 2.4, 3.6),
                                 layout="constrained", squeeze=False, sharey=True)
        handles = {}
        for ax, panel in zip(axes[0], panels):
            for e in profiles[panel]:
                frame = e["frame"]
                color, marker, line = styles[e["label"]]
                x, y = frame["depth"].to_numpy(float), frame["relative"].to_numpy(float)
                if {"relative_low", "relative_high"} <= set(frame.columns):
                    lo = frame["relative_low"].to_numpy(float)
                    hi = frame["relative_high"].to_numpy(float)
                    if np.isfinite(lo).all() and np.isfinite(hi).all():
                        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)],
                                    fmt="none", ecolor=color, elinewidth=0.9, capsize=2.5,
                                    alpha=0.8)
                (h,) = ax.plot(x, y, linestyle=line, marker=marker, ms=4, lw=1.3, color=color,
                               mfc="white", mew=1.1, label=e["label"])
                handles.setdefault(e["label"], h)
                best = e.get("best_index")
                if best is not None:
                    if e.get("significant", False):
                        ax.plot(x[best], y[best], marker="*", ms=13, color=color, mec="black",
                                mew=0.7, zorder=5, linestyle="none")
                    else:
                        ax.plot(x[best], y[best], marker="o", ms=13, mfc="none", mec="0.35",
                                mew=1.2, zorder=5, linestyle="none")
                        ax.annotate("n.s.", (x[best], y[best]), xytext=(0, -14),
                                    textcoords="offset points", ha="center", fontsize=7.5,
                                    color="0.3")
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.12, 1.12)
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0\nfirst", "0.25", "0.5", "0.75", "1\nlast"])
            ax.set_xlabel("relative depth of layer")
            ax.set_title(wrap_label(metric_labels.get(panel, str(panel)), 40), fontsize=9.5)
        axes[0][0].set_ylabel("distance / largest over layers")
        if title:
            fig.suptitle(title)
        verdicts = [
            Line2D([], [], marker="*", ms=11, color="0.5", mec="black", ls="none",
                   label="closest layer, significantly"),
            Line2D([], [], marker="o", ms=11, mfc="none", mec="0.35", ls="none",
                   label="n.s.: no layer significantly closer"),
        ]
        fig.legend([*handles.values(), *verdicts], [*handles, *(v.get_label() for v in verdicts)],
                   loc="outside right center", frameon=False,
                   title="colour = model, marker = dataset\n(bars: bootstrap interval)",
                   title_fontsize=8.5)
    return fig

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
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
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
        ax_trace.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- distances
def plot_distance_heatmap(matrix: pd.DataFrame, metric_label: str, peak=None,
                          title: str | None = None):
    """Distance of each layer's spectrum to the full one: layers (rows, input at top) x
    epochs (columns). Dots mark the best-matching layer per epoch; a box marks ``peak``."""
    values = matrix.to_numpy(float)
    epochs = np.asarray(matrix.columns)
    layers = list(matrix.index)
    height = min(9.0, max(2.8, 1.6 + 0.22 * len(layers)))
    with style():
        fig, ax = plt.subplots(figsize=(7.0, height), layout="constrained")
        rows = np.arange(len(layers))
        mesh = ax.pcolormesh(epochs, rows, values, shading="nearest", cmap="viridis",
                             rasterized=True)
        best = np.nanargmin(np.where(np.isnan(values), np.inf, values), axis=0)
        ax.scatter(epochs, best, s=10, color="white", edgecolor="black", lw=0.5, zorder=3,
                   label="best layer per epoch")
        if peak is not None and peak in set(epochs.tolist()):
            col = list(epochs).index(peak)
            ax.scatter([peak], [best[col]], s=90, marker="s", facecolor="none",
                       edgecolor="red", lw=1.5, zorder=4, label=f"peak epoch {peak}")
        ax.set_yticks(rows, layers, fontsize=8 if len(layers) <= 12 else 6.5)
        ax.invert_yaxis()
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("layer (input $\\to$ output)")
        ax.grid(False)
        ax.set_title(title or "distance of each layer's spectrum to the full spectrum")
        bar = fig.colorbar(mesh, ax=ax, pad=0.01)
        bar.set_label(metric_label)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if height > 3 else -0.2),
                  ncol=2, frameon=False)
    return fig


def normalized_curve(grid, density, lo: float, hi: float):
    """A density mapped to the axis ``(x - lo) / (hi - lo)``: returns ``(x, density * (hi - lo))``
    so it stays a density (integrates to the same mass) on the new axis."""
    width = hi - lo if hi > lo else 1.0
    return (np.asarray(grid) - lo) / width, np.asarray(density) * width


def plot_best_match(full_curve, layer_curve, full_support, layer_support, layer: str,
                    epoch: int, distance: float, metric_label: str):
    """The full spectrum overlaid with a layer's, on the eigenvalue axis (left) and on each
    spectrum's own support mapped to [0, 1] (right; the axis the default metric uses).

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
            x, y = normalized_curve(grid, density, *support)
            ax_norm.plot(x, np.clip(y, 1e-300, None), color=color, ls=line, lw=1.3, label=label)
            curves.append((x, y))
        for ax in (ax_raw, ax_norm):
            ax.set_yscale("log")
            ax.set_ylabel("spectral density")
        ax_raw.set_ylim(*_density_limits([full_curve, layer_curve]))
        ax_norm.set_ylim(*_density_limits(curves))
        ax_raw.set_xlabel("eigenvalue $\\lambda$")
        ax_norm.set_xlabel("$(\\lambda - \\lambda_{min}) / (\\lambda_{max} - \\lambda_{min})$")
        ax_raw.set_title("eigenvalue axis")
        ax_norm.set_title("each support mapped to [0, 1]")
        ax_raw.legend(loc="upper right", frameon=False)
        fig.suptitle(f"best match at epoch {epoch}: {layer} ({metric_label} = {distance:.3g})")
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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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


def plot_depth_profiles(profiles, metric_labels, title: str | None = None):
    """Relative distance to the full spectrum against relative depth, one line per run.

    ``profiles``: ``{panel: [(label, model, dataset, frame), ...]}`` with frames having
    ``depth`` (in [0, 1]) and ``relative`` (distance / the run's maximum) columns; one
    panel per key (e.g. per metric), titled by ``metric_labels[key]``. Colour = dataset,
    line style and marker = model.
    """
    panels = list(profiles)
    datasets = sorted({d for rows in profiles.values() for _, _, d, _ in rows},
                      key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else 99, str(d)))
    colors = {d: f"C{i % 10}" for i, d in enumerate(datasets)}
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 2.0, 3.2),
                                 layout="constrained", squeeze=False, sharey=True)
        handles = {}
        for ax, panel in zip(axes[0], panels):
            for label, model, dataset, frame in profiles[panel]:
                line, marker = MODEL_STYLES.get(model, ("-.", "D"))
                (h,) = ax.plot(frame["depth"], frame["relative"], linestyle=line, marker=marker,
                               ms=3.5, lw=1.3, color=colors[dataset], label=label)
                handles.setdefault(label, h)
            ax.set_xlim(-0.03, 1.03)
            ax.set_ylim(-0.03, 1.05)
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0\nfirst", "0.25", "0.5", "0.75", "1\nlast"])
            ax.set_xlabel("relative depth of layer")
            ax.set_title(metric_labels.get(panel, str(panel)))
        axes[0][0].set_ylabel("distance / run's maximum")
        if title:
            fig.suptitle(title)
        fig.legend(list(handles.values()), list(handles), loc="outside right center",
                   frameon=False, title="model+dataset")
    return fig


"""Distances between spectra, and the epoch where a layer matches the full Hessian best.

A spectrum here is anything with ``.nodes`` and ``.weights`` (1-D float arrays, weights >= 0
summing to 1): a :class:`~layerhessians.spectra.SpectralMeasure` from SLQ (Ritz values and
quadrature weights) or an exact spectrum.

Two metrics:

``"wasserstein"`` (default)
    The 1-Wasserstein distance between the two spectral measures on the eigenvalue axis,
    after mapping each axis by a normalisation (:data:`NORMALIZATIONS`, default ``"minmax"``:
    each measure's own support ``[min node, max node]`` -> ``[0, 1]``, as the paper compares
    shapes, not scales). Unit: the normalised eigenvalue axis (raw eigenvalue units with
    ``"none"``).
``"paper"``
    The original ``match_distros.py`` computation, reproduced exactly: each spectrum's
    density curve on 1024 grid points is log-transformed, min-max scaled and normalised to
    sum 1 (:func:`paper_transform`), and the two resulting 1024-vectors are compared by
    ``scipy.stats.wasserstein_distance`` *as unweighted samples*. This ignores the
    eigenvalue axis (the grid), so it is not a distance between spectra; it is kept to show
    the original's numbers side by side.

Depth of layer ``i`` (0-based) of ``L`` layers is ``i / (L - 1)`` in [0, 1] (0 for ``L == 1``).

The *peak epoch* of a run (:func:`peak_epoch`) is the epoch at which the best-matching layer
is closest to the full spectrum: ``argmin_epoch min_layer distance(full, layer)``, the
earliest epoch on ties.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from layerhessians.errors import UserError
from layerhessians.vocabulary import FULL

METRICS = ("wasserstein", "paper")
NORMALIZATIONS = ("minmax", "joint", "maxabs", "none")
PAPER_POINTS = 1024  # the original's density grid

# The original match_distros.py's hard-coded peak epochs, as 0-based indices into its 50
# per-epoch spectra; index k is the spectrum after k + 1 training epochs, i.e. our epoch
# k + 1 (our epoch 0 is the initialisation).
PAPER_PEAK_INDEX = {
    ("LeNet", "FashionMNIST"): 33, ("LeNet", "MNIST"): 18, ("LeNet", "SVHN"): 20,
    ("LeNet", "CIFAR10"): 44, ("VGG11_bn", "MNIST"): 21, ("VGG11_bn", "FashionMNIST"): 6,
    ("VGG11_bn", "SVHN"): 28, ("VGG11_bn", "CIFAR10"): 19, ("ResNet18", "MNIST"): 19,
    ("ResNet18", "FashionMNIST"): 25, ("ResNet18", "SVHN"): 11, ("ResNet18", "CIFAR10"): 26,
}
PAPER_PEAK_EPOCH = {key: index + 1 for key, index in PAPER_PEAK_INDEX.items()}

SEED_MODELS = ("LeNet", "VGG11_bn", "ResNet18")
SEED_DATASETS = ("MNIST", "FashionMNIST", "SVHN", "CIFAR10")


def seed_run_name(model: str, dataset: str) -> str:
    """The seed README's run directory name, e.g. ``model=LeNet,dataset=MNIST,te,run1``."""
    return f"model={model},dataset={dataset},te,run1"


SEED_RUNS = tuple(seed_run_name(m, d) for m in SEED_MODELS for d in SEED_DATASETS)

DISTANCE_COLUMNS = ["run", "model", "dataset", "epoch", "layer", "index", "depth",
                    "distance", "metric", "normalize"]


# ----------------------------------------------------------------------------- measures
def _as_measure(measure):
    """``(nodes, weights)`` float64 1-D arrays of a measure, zero-weight nodes dropped."""
    try:
        nodes = np.asarray(measure.nodes, dtype=np.float64).ravel()
        weights = np.asarray(measure.weights, dtype=np.float64).ravel()
    except AttributeError:
        raise TypeError(f"expected a spectral measure with .nodes and .weights, got "
                        f"{type(measure).__name__}") from None
    if nodes.shape != weights.shape or nodes.size == 0:
        raise ValueError(f"a measure needs as many nodes as weights (>0), got {nodes.size} "
                         f"nodes and {weights.size} weights")
    if not (np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))):
        raise ValueError("a measure's nodes and weights must be finite")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("a measure's weights must be >= 0 with a positive sum")
    keep = weights > 0
    return nodes[keep], weights[keep] / weights[keep].sum()


def depth(index: int, count: int) -> float:
    """Relative depth ``index / (count - 1)`` of layer ``index`` (0-based) of ``count``."""
    return 0.0 if count <= 1 else index / (count - 1)


def _affine_to_unit(nodes, lo, hi):
    """Map ``[lo, hi]`` -> ``[0, 1]``; a single point (``hi == lo``) goes to 0.5."""
    width = hi - lo
    if width <= 0:
        return np.full_like(nodes, 0.5)
    return (nodes - lo) / width


def normalize_nodes(nodes, how: str = "minmax", reference=None) -> np.ndarray:
    """The eigenvalue axis of ``nodes`` mapped by the normalisation ``how``.

    - ``"minmax"``: ``(x - min) / (max - min)`` over ``nodes`` itself -> ``[0, 1]``;
    - ``"joint"``: the same with min/max taken over ``reference`` (the nodes of both
      measures being compared) so both share one map;
    - ``"maxabs"``: ``x / max|x|`` -> ``[-1, 1]`` (keeps 0 and the sign);
    - ``"none"``: unchanged (raw eigenvalues).

    Degenerate supports never divide by zero: with ``max == min`` ("minmax"/"joint") every
    node maps to 0.5, the middle of [0, 1]; with all nodes 0 ("maxabs") they stay at 0.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    if how == "minmax":
        return _affine_to_unit(nodes, nodes.min(), nodes.max())
    if how == "joint":
        ref = nodes if reference is None else np.asarray(reference, dtype=np.float64)
        return _affine_to_unit(nodes, ref.min(), ref.max())
    if how == "maxabs":
        scale = np.abs(nodes).max()
        return nodes / scale if scale > 0 else nodes.copy()
    if how == "none":
        return nodes.copy()
    raise UserError(f"unknown normalisation {how!r}; choose one of {', '.join(NORMALIZATIONS)}")


def wasserstein(p, q, normalize: str = "minmax") -> float:
    """1-Wasserstein distance between spectral measures ``p`` and ``q``.

    Each measure's eigenvalue nodes are first mapped by :func:`normalize_nodes`
    (``normalize``); the distance is then ``int |F_p(x) - F_q(x)| dx`` of the two
    cumulative distribution functions (``scipy.stats.wasserstein_distance`` with the
    quadrature weights). Unit: the normalised eigenvalue axis.
    """
    p_nodes, p_weights = _as_measure(p)
    q_nodes, q_weights = _as_measure(q)
    union = np.concatenate([p_nodes, q_nodes])
    u = normalize_nodes(p_nodes, normalize, reference=union)
    v = normalize_nodes(q_nodes, normalize, reference=union)
    return float(wasserstein_distance(u, v, p_weights, q_weights))


# ----------------------------------------------------------------------------- the original
def paper_transform(density) -> np.ndarray:
    """The original's density transform: density values -> a vector summing to 1.

    For a density curve ``d`` (shape ``[P]``, values >= 0, e.g. P = 1024 grid points):
    zeros are replaced by the smallest positive value ``d_min`` (``d + eps`` with
    ``eps_i = d_min`` where ``d_i == 0``), then ``p = log(d + eps)`` is min-max scaled to
    [0, 1] and divided by its sum. The grid (eigenvalue axis) plays no part. If ``log d``
    is constant (0/0 in the original, giving NaN) this returns the uniform vector ``1/P``.
    The result does not change when ``d`` is multiplied by a positive constant.
    """
    d = np.asarray(density, dtype=np.float64).ravel()
    if d.size == 0 or not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("a density for the paper metric must be a non-empty, finite, "
                         "non-negative array")
    positive = d[d > 0]
    if positive.size == 0:
        raise ValueError("a density for the paper metric needs at least one positive value")
    p = np.log(np.where(d == 0, positive.min(), d))
    lo, hi = p.min(), p.max()
    if hi == lo:
        return np.full_like(p, 1.0 / p.size)
    p = (p - lo) / (hi - lo)
    return p / p.sum()


def paper_distance(density_p, density_q) -> float:
    """The original ``match_distros.py`` distance between two density curves.

    ``scipy.stats.wasserstein_distance(paper_transform(d_p), paper_transform(d_q))``: the
    transformed density values are treated as two unweighted samples.
    """
    return float(wasserstein_distance(paper_transform(density_p), paper_transform(density_q)))


def paper_metric(p, q, points: int = PAPER_POINTS) -> float:
    """:func:`paper_distance` of two measures' densities (``measure.density(points)``),
    standing in for the original's 1024-point Papyan densities."""
    return paper_distance(p.density(points=points)[1], q.density(points=points)[1])


def spectrum_distance(p, q, metric: str = "wasserstein", normalize: str = "minmax",
                      points: int = PAPER_POINTS) -> float:
    """Distance between two spectra by ``metric`` (:data:`METRICS`)."""
    if metric == "wasserstein":
        return wasserstein(p, q, normalize)
    if metric == "paper":
        return paper_metric(p, q, points)
    raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


# ----------------------------------------------------------------------------- runs
def measure_lookup(run):
    """A ``(block, epoch) -> measure`` function for ``run``, equal to ``run.measure`` but
    grouping ``run.spectra`` once and caching (``run.measure`` scans the whole table on
    every call, ~10 ms each for a 50-epoch ResNet18 run). Missing pairs go to
    ``run.measure``, which raises its :class:`UserError`."""
    from layerhessians.spectra import SpectralMeasure

    spectra = run.spectra
    groups = {(block, int(epoch)): rows for (block, epoch), rows
              in spectra.groupby(["block", "epoch"], sort=False)}
    cache = {}

    def lookup(block, epoch):
        key = (block, int(epoch))
        if key not in cache:
            if key not in groups:
                return run.measure(block, epoch)
            cache[key] = SpectralMeasure.from_frame(groups[key][["vector", "node", "weight"]])
        return cache[key]

    return lookup


def default_epochs(epochs) -> list:
    """The epochs compared by default: the training epochs (>= 1), as the original did;
    epoch 0 (initialisation) only when it is the only one."""
    epochs = sorted(int(e) for e in epochs)
    trained = [e for e in epochs if e >= 1]
    return trained or epochs


def layer_distances(run, metric: str = "wasserstein", normalize: str = "minmax",
                    epochs=None, points: int = PAPER_POINTS, measure=None) -> pd.DataFrame:
    """Distance of every layer's spectrum to the full spectrum, at every epoch of ``run``.

    ``run``: a :class:`~layerhessians.store.runs.Run` (``.blocks``, ``.epochs``, ``.measure``).
    ``epochs``: the epochs to use (default :func:`default_epochs`); epochs the run lacks
    are a :class:`UserError`. ``measure``: optional ``(block, epoch) -> measure``
    (default :func:`measure_lookup` of ``run``). Returns a DataFrame with
    :data:`DISTANCE_COLUMNS`, one row per epoch and layer: ``index`` is the 0-based layer
    index, ``depth`` its relative depth, ``distance`` in the metric's unit (normalised
    eigenvalue axis for ``"wasserstein"``), ``normalize`` empty for the paper metric.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "wasserstein" and normalize not in NORMALIZATIONS:
        raise UserError(f"unknown normalisation {normalize!r}; choose one of "
                        f"{', '.join(NORMALIZATIONS)}")
    blocks = list(run.blocks)
    layers = [b for b in blocks if b != FULL]
    name = getattr(run, "name", str(getattr(run, "path", "run")))
    if FULL not in blocks or not layers:
        raise UserError(f"run {name} needs spectra of the full Hessian and of at least one "
                        f"layer to compare them (it has: {', '.join(blocks) or 'none'}); "
                        "train it without --no-layers")
    available = list(run.epochs)
    chosen = default_epochs(available) if epochs is None else sorted({int(e) for e in epochs})
    missing = [e for e in chosen if e not in available]
    if not available:
        raise UserError(f"run {name} has no spectra yet; train it first")
    if missing:
        raise UserError(f"run {name} has no spectra at epoch(s) {missing}; it has epochs "
                        f"{available[0]}..{available[-1]}")
    config = getattr(run, "config", {}) or {}
    measure = measure_lookup(run) if measure is None else measure
    rows = []
    for epoch in chosen:
        full = measure(FULL, epoch)
        full_density = full.density(points=points)[1] if metric == "paper" else None
        for index, layer in enumerate(layers):
            spectrum = measure(layer, epoch)
            if metric == "paper":
                dist = paper_distance(full_density, spectrum.density(points=points)[1])
            else:
                dist = wasserstein(full, spectrum, normalize)
            rows.append((name, config.get("model"), config.get("dataset"), epoch, layer,
                         index, depth(index, len(layers)), dist, metric,
                         normalize if metric == "wasserstein" else ""))
    return pd.DataFrame(rows, columns=DISTANCE_COLUMNS)


def distance_matrix(distances: pd.DataFrame) -> pd.DataFrame:
    """``distances`` of one run and metric as a layers x epochs table (layers in order)."""
    table = distances.pivot(index="layer", columns="epoch", values="distance")
    order = distances.drop_duplicates("layer").sort_values("index")["layer"]
    return table.loc[list(order)]


def peak_epoch(distances: pd.DataFrame) -> int:
    """The epoch at which the best-matching layer is closest to the full spectrum.

    ``argmin_epoch min_layer distance`` over the rows of one run and one metric
    (:func:`layer_distances`); ties go to the earliest epoch; NaN distances are ignored.
    """
    best = distances.groupby("epoch")["distance"].min().dropna()
    if best.empty:
        raise ValueError("no finite distances to choose a peak epoch from")
    return int(best.idxmin())


def best_layer(distances: pd.DataFrame, epoch=None) -> pd.Series:
    """The best-matching layer (a row with ``layer``, ``index``, ``depth``, ``distance``).

    At ``epoch`` if given, else over training: the layer whose distance summed over the
    epochs in ``distances`` is smallest (``distance`` is then that sum). Ties: shallowest.
    """
    if epoch is not None:
        rows = distances[distances["epoch"] == epoch]
        if rows.empty:
            raise ValueError(f"no distances at epoch {epoch}")
        return rows.sort_values(["distance", "index"], kind="stable").iloc[0]
    summed = profile(distances)
    return summed.sort_values(["distance", "index"], kind="stable").iloc[0]


def profile(distances: pd.DataFrame, epoch=None) -> pd.DataFrame:
    """Per layer of one run and metric: ``layer, index, depth, distance, relative``.

    ``distance`` is the distance at ``epoch``, or summed over all epochs in ``distances``
    if ``epoch`` is None; ``relative`` is ``distance / max over layers`` (the original's
    per-run normalisation for its figures; NaN if that maximum is 0).
    """
    rows = distances if epoch is None else distances[distances["epoch"] == epoch]
    if rows.empty:
        raise ValueError(f"no distances at epoch {epoch}")
    table = (rows.groupby(["index", "layer", "depth"], sort=True)["distance"]
             .sum(min_count=1).reset_index())
    top = table["distance"].max()
    table["relative"] = table["distance"] / top if top > 0 else np.nan
    return table[["layer", "index", "depth", "distance", "relative"]]


def paper_peak_epoch(model, dataset):
    """The original's hard-coded peak for ``(model, dataset)`` as our epoch, or None."""
    return PAPER_PEAK_EPOCH.get((model, dataset))


def summarize(distances: pd.DataFrame, peaks=None) -> pd.DataFrame:
    """One row per (run, metric): the peak epoch and the best-matching layer there and over
    training. ``peaks``: optional ``{run: epoch}`` overrides (else :func:`peak_epoch`)."""
    peaks = peaks or {}
    rows = []
    for (run, metric), group in distances.groupby(["run", "metric"], sort=False):
        if run in peaks and peaks[run] is not None:
            peak, source = int(peaks[run]), "given"
        else:
            peak, source = peak_epoch(group), "computed"
        at_peak = best_layer(group, peak)
        overall = best_layer(group)
        rows.append({
            "run": run, "model": group["model"].iloc[0], "dataset": group["dataset"].iloc[0],
            "metric": metric, "normalize": group["normalize"].iloc[0],
            "peak_epoch": peak, "peak_source": source,
            "peak_layer": at_peak["layer"], "peak_index": int(at_peak["index"]),
            "peak_depth": float(at_peak["depth"]), "peak_distance": float(at_peak["distance"]),
            "best_layer": overall["layer"], "best_index": int(overall["index"]),
            "best_depth": float(overall["depth"]), "best_summed": float(overall["distance"]),
            "layers": int(group["index"].max()) + 1, "epochs": int(group["epoch"].nunique()),
        })
    return pd.DataFrame(rows)



def parse_epochs(text: str) -> list:
    """Epochs from a spec such as ``"1-50"``, ``"0,5,10"`` or ``"1-10,20"`` (sorted, unique)."""
    epochs = set()
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            if "-" in part[1:]:
                first, last = part.split("-", 1)
                lo, hi = int(first), int(last)
                if hi < lo:
                    raise ValueError
                epochs.update(range(lo, hi + 1))
            else:
                epochs.add(int(part))
    except ValueError:
        raise UserError(f"cannot read epochs {text!r}; give e.g. 1-50, 0,10,20 or "
                        "1-10,20") from None
    if not epochs or min(epochs) < 0:
        raise UserError(f"epochs {text!r} must be non-negative integers, e.g. 1-50")
    return sorted(epochs)

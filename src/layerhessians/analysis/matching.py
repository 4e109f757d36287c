"""Matching layers to the full Hessian: distances with their spread, verdicts, the peak epoch
and the block-diagonal baseline.

The distances themselves live in :mod:`layerhessians.analysis.distances` (the registry
:data:`~layerhessians.analysis.distances.DISTANCES`; default ``"w1-maxabs"``). This module
applies them to runs, epoch by epoch, and says how sure the answer is.

**Spread.** Every distance comes with ``replicates`` bootstrap draws (default
:data:`REPLICATES`) and an interval (``distance_low``, ``distance_high``; level
:data:`LEVEL`) that always contains the distance (:func:`interval`: the draws' percentile
interval centred on the estimate by their median). In draw ``b`` every block's measure is resampled once per epoch
(:func:`resample`) and all distances of that epoch are recomputed, so the draws of layers
at one epoch share the full spectrum's draw (a paired design: noise of the full spectrum
moves every layer's distance together and cancels in comparisons between layers). How a
measure is resampled (:func:`spread_method`):

- ``"vectors(V)"`` (``V >= 2`` SLQ start vectors): a bootstrap over the vectors, V rows
  drawn with replacement and averaged. Model-free, but crude for small V (V = 2 gives 3
  distinct measures);
- ``"dirichlet"`` (one vector, operator size ``D`` known): the weights are redrawn as
  ``Dirichlet(D * w / 2)`` at fixed Ritz values. For a start vector uniform on the sphere
  (a normalised Gaussian) and Ritz values equal to eigenvalues of multiplicity
  ``m_j = D w_j``, the quadrature weights are exactly ``Dirichlet(m / 2)``, so this has the
  noise of one SLQ vector's weights (``Var w_j = 2 w_j (1 - w_j) / (D + 2)``). Limitations:
  it leaves the Ritz values fixed (interior Ritz values of a real run also move from vector
  to vector), and it overstates the noise of Rademacher start vectors;
- ``"exact"`` (a measure with ``method == "exact"``): not resampled; against exact layers
  the spread comes from the full spectrum alone;
- ``"none"`` (one vector, size unknown): no model for the noise; draws are NaN and no
  verdict is given.

**Verdict.** Among candidates (layers at one epoch, layers summed over training, or
epochs), the one with the smallest distance is *significantly closer* when it is strictly
closer than every other candidate in at least ``level`` of the draws (its *support*).
Otherwise the answer is "no layer significantly closer" (or, for epochs, the epochs not
significantly farther than the peak are listed).

**Peak epoch** (:func:`peak_epoch`): ``argmin_epoch min_layer distance``, the earliest
epoch on ties; :func:`summarize` adds its support and the epochs within its spread.

**Baseline.** For blocks partitioning all parameters, the spectrum of the block-diagonal
part of the Hessian is the parameter-weighted mixture ``sum_b (d_b / D) mu_b``
(:func:`block_diagonal_mixture`). The layer blocks cover the Conv2d/Linear weights only; a
block named :data:`REST` (biases, batch-norm parameters) completes the partition when a run
has it, otherwise the mixture is over the layers alone (``mixture_blocks`` says which).

Depth of layer ``i`` (0-based) of ``L`` layers is ``i / (L - 1)`` in [0, 1] (0 for ``L == 1``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from layerhessians.analysis.distances import (
    DEFAULT_DISTANCE,
    PAPER_POINTS,
    get_distance,
    paper_transform,
    resolve_metric,
)
from layerhessians.analysis.spread import block_diagonal_mixture, resample, spread_method
from layerhessians.errors import UserError
from layerhessians.spectra.measure import SpectralMeasure
from layerhessians.store.record import RunRecord
from layerhessians.vocabulary import DEFAULT_REPLICATES, FULL

REST = "rest"  # the block of every parameter that is not a layer weight, when measured
REPLICATES = DEFAULT_REPLICATES
LEVEL = 0.95
NO_VERDICT = "no layer significantly closer"

# the table of layer_distances; ``draws`` and ``mixture_draws`` (float64 arrays [replicates])
# are not written to CSV
CSV_COLUMNS = ["run", "model", "dataset", "epoch", "layer", "index", "depth", "share",
               "distance", "distance_low", "distance_high", "mixture_distance", "mixture_low",
               "mixture_high", "mixture_blocks", "spread", "replicates", "metric", "normalize"]
DISTANCE_COLUMNS = [*CSV_COLUMNS, "draws", "mixture_draws"]


def depth(index: int, count: int) -> float:
    """Relative depth ``index / (count - 1)`` of layer ``index`` (0-based) of ``count``."""
    return 0.0 if count <= 1 else index / (count - 1)


def distance_entry(metric: str | None, points: int = PAPER_POINTS):
    """The registry entry ``metric``; for ``"paper"`` with a density grid of ``points``."""
    entry = get_distance(metric)
    if entry.name == "paper" and int(points) != PAPER_POINTS:
        points = int(points)
        entry = replace(entry, normalize=lambda m: paper_transform(m.density(points=points)[1]))
    return entry


# ----------------------------------------------------------------------------- block sizes
def run_record(run) -> RunRecord:
    """The :class:`~layerhessians.store.record.RunRecord` of ``run`` (a
    :class:`~layerhessians.store.run.Run`, or any object with a ``config`` dict)."""
    record = getattr(run, "record", None)
    return record if isinstance(record, RunRecord) else \
        RunRecord.from_dict(getattr(run, "config", None) or {})


def block_dimensions(record) -> dict:
    """``{block: number of parameters}`` from a run's record (a
    :class:`~layerhessians.store.record.RunRecord`, or config.json as a ``dict``), else
    counted on a freshly built model of the run's architecture (input channels and classes
    from the record, else from the dataset registry); ``{}`` if neither is possible."""
    # torch: counting parameters builds the model; not imported for `match --help`
    from layerhessians.data.registry import get_spec
    from layerhessians.models import build_model, layer_blocks

    if not isinstance(record, RunRecord):
        record = RunRecord.from_dict(record or {})
    if record.block_dims:
        return record.block_dims
    try:
        channels = record.facts.get("in_channels")
        classes = record.facts.get("num_classes")
        if not (channels and classes):
            spec = get_spec(record.dataset)
            channels, classes = channels or spec.in_channels, classes or spec.num_classes
        model = build_model(record.model, in_channels=int(channels), num_classes=int(classes))
    except Exception:  # unknown architecture or dataset: no sizes
        return {}
    dims = {name: sum(p.numel() for p in ps) for name, ps in layer_blocks(model).items()}
    dims[FULL] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dims


# ----------------------------------------------------------------------------- runs
def measure_lookup(run, dims=None):
    """A ``(block, epoch) -> measure`` function for ``run``, equal to ``run.measure`` but
    grouping ``run.spectra`` once and caching. Measures get ``dim`` from ``dims`` (default
    :func:`block_dimensions` of the run's config) and ``method`` from an optional
    ``method`` column of the spectra table (``"exact"`` for exact spectra). Missing pairs
    go to ``run.measure``, which raises its :class:`UserError`."""
    dims = block_dimensions(run_record(run)) if dims is None else dims
    spectra = run.spectra
    groups = {(block, int(epoch)): rows for (block, epoch), rows
              in spectra.groupby(["block", "epoch"], sort=False)}
    cache = {}

    def lookup(block, epoch):
        key = (block, int(epoch))
        if key not in cache:
            if key not in groups:
                return run.measure(block, epoch)
            rows = groups[key]
            found = SpectralMeasure.from_frame(rows[["vector", "node", "weight"]],
                                               dim=dims.get(block))
            if "method" in rows and rows["method"].notna().any():
                found.method = str(rows["method"].dropna().iloc[0])
            cache[key] = found
        return cache[key]

    return lookup


def default_epochs(epochs) -> list:
    """The epochs compared by default: the training epochs (>= 1), as the original did;
    epoch 0 (initialisation) only when it is the only one."""
    epochs = sorted(int(e) for e in epochs)
    trained = [e for e in epochs if e >= 1]
    return trained or epochs


def interval(draws, point, level: float = LEVEL) -> tuple:
    """The interval of a distance ``point`` from its bootstrap ``draws``: the draws'
    percentile interval moved so that the draws' median sits on ``point``,
    ``[point - (median - q_low), point + (q_high - median)]`` (``q`` at ``(1 -+ level) / 2``),
    its lower end kept >= 0 when the point and draws are.

    It always contains ``point``. The plain percentile interval need not: a distance between
    resampled measures is biased (noise moves a resampled measure away from, or, with few
    SLQ vectors, towards, the other; Dirichlet weights at fixed Ritz values only add noise),
    so the draws can sit beside the estimate (``7.685e-05 [6.281e-05, 7.654e-05]``). The
    basic interval ``[2 point - q_high, 2 point - q_low]`` excludes the point in exactly the
    same cases, and BC/BCa only while the point's rank among the draws is not extreme. The
    draws' spread is what they measure well; their offset (median - point, the bootstrap's
    median bias) is not corrected for, only removed: the interval is about the estimate
    that is reported.

    Args:
        draws: float array [B] (NaN or empty: no interval).
        point: the estimate.
        level: in (0, 1).

    Returns:
        ``(low, high)`` floats, NaN without finite draws.
    """
    draws = np.asarray(draws, np.float64).ravel()
    if draws.size == 0 or not np.all(np.isfinite(draws)) or not np.isfinite(point):
        return np.nan, np.nan
    tail = 50.0 * (1.0 - level)
    lo, mid, hi = np.percentile(draws, [tail, 50.0, 100.0 - tail])
    low, high = point - (mid - lo), point + (hi - mid)
    if point >= 0 and draws.min() >= 0:
        low = max(low, 0.0)
    return float(low), float(high)


def _checked_epochs(run, name, epochs):
    available = list(run.epochs)
    if not available:
        raise UserError(f"run {name} has no spectra yet; train it first")
    chosen = default_epochs(available) if epochs is None else sorted({int(e) for e in epochs})
    missing = [e for e in chosen if e not in available]
    if missing:
        raise UserError(f"run {name} has no spectra at epoch(s) {missing}; it has epochs "
                        f"{available[0]}..{available[-1]}")
    return chosen


def distance_table(run, metrics=(DEFAULT_DISTANCE,), epochs=None, points: int = PAPER_POINTS,
                   measure=None, replicates: int = REPLICATES, seed: int = 0,
                   level: float = LEVEL, on_epoch=None) -> pd.DataFrame:
    """Distance of every layer's spectrum to the full spectrum, with its spread, at every
    epoch of ``run``, for every metric in ``metrics`` (registry names).

    All metrics use the same bootstrap draws of the measures (module docstring).

    Args:
        run: a :class:`~layerhessians.store.run.Run` (``.blocks``, ``.epochs``,
            ``.measure``, ``.record``).
        metrics: registry names (:data:`METRICS`).
        epochs: epochs to use (default :func:`default_epochs`).
        points: density grid of the ``"paper"`` metric.
        measure: optional ``(block, epoch) -> measure`` (default :func:`measure_lookup`).
        replicates: bootstrap draws per distance (0: no spread, no verdicts).
        seed: seed of the draws (the same seed gives the same draws).
        level: interval level in (0, 1).
        on_epoch: optional callable, called after each epoch (progress).

    Returns:
        DataFrame with :data:`DISTANCE_COLUMNS`, one row per metric, epoch and layer:
        ``share`` the layer's fraction of all parameters (NaN if sizes are unknown);
        ``distance`` between the averaged measures; ``distance_low``/``distance_high`` the
        interval of the draws (:func:`interval`); ``mixture_*`` the full spectrum's distance to the
        block-diagonal mixture (the same on every row of an epoch; NaN if sizes are
        unknown); ``spread`` how full/layer were resampled; ``draws`` the draws [replicates]
        (``mixture_draws`` the mixture's, the same on every row of an epoch).

    Raises:
        UserError: unknown metric, missing epochs, or a run without full and layer spectra.
    """
    entries = [distance_entry(m, points) for m in metrics]
    if not 0 < level < 1:
        raise UserError(f"level must be in (0, 1); got {level}")
    blocks = list(run.blocks)
    layers = [b for b in blocks if b not in (FULL, REST)]
    name = getattr(run, "name", str(getattr(run, "path", "run")))
    if FULL not in blocks or not layers:
        raise UserError(f"run {name} needs spectra of the full Hessian and of at least one "
                        f"layer to compare them (it has: {', '.join(blocks) or 'none'}); "
                        "train it without --no-layers")
    chosen = _checked_epochs(run, name, epochs)
    record = run_record(run)
    dims = block_dimensions(record)
    measure = measure_lookup(run, dims) if measure is None else measure
    total = dims.get(FULL) or record.num_params
    parts = layers + ([REST] if REST in blocks else [])
    mixable = all(dims.get(b) for b in parts)
    mixture_blocks = ("" if not mixable else "layers + rest" if REST in blocks
                      else "layers only")
    shares = [dims[b] / total if total and dims.get(b) else np.nan for b in layers]
    rng = np.random.default_rng(seed)
    rows = []
    for epoch in chosen:
        full = measure(FULL, epoch)
        parts_m = [measure(b, epoch) for b in parts]
        mix = (block_diagonal_mixture(parts_m, [dims[b] for b in parts]) if mixable else None)
        spread = f"{spread_method(full)}/" + "+".join(sorted({spread_method(m)
                                                             for m in parts_m[:len(layers)]}))
        batched = _batched_draws(entries, full, parts_m, [dims.get(b) for b in parts],
                                 len(layers), mixable, int(replicates), rng, points)
        looped = batched is None or batched[0].shape[0] == 1
        draws = [[] for _ in entries] if looped else [t[1:] for t in batched]
        loop = int(replicates) if looped else 0  # vectors resampled, or no batched form
        for _ in range(loop):
            rf = resample(full, rng)
            rp = [resample(m, rng) for m in parts_m]
            rmix = (block_diagonal_mixture(rp, [dims[b] for b in parts])
                    if mixable and all(r is not None for r in rp) else None)
            for k, entry in enumerate(entries):
                if rf is None:
                    draws[k].append([np.nan] * (len(layers) + 1))
                    continue
                f = entry.normalize(rf)
                values = [np.nan if r is None else entry.function(f, entry.normalize(r))
                          for r in rp[:len(layers)]]
                values.append(np.nan if rmix is None else entry.function(f, entry.normalize(rmix)))
                draws[k].append(values)
        for k, entry in enumerate(entries):
            if batched is not None:
                point, mix_point = batched[k][0, :-1], float(batched[k][0, -1])
            else:
                f = entry.normalize(full)
                point = [entry.function(f, entry.normalize(m)) for m in parts_m[:len(layers)]]
                mix_point = np.nan if mix is None else entry.function(f, entry.normalize(mix))
            table = np.asarray(draws[k], np.float64).reshape(int(replicates), len(layers) + 1)
            mix_lo, mix_hi = (interval(table[:, -1], mix_point, level) if mix is not None
                              else (np.nan,) * 2)
            for index, layer in enumerate(layers):
                lo, hi = interval(table[:, index], point[index], level)
                rows.append((name, record.model, record.dataset, epoch, layer,
                             index, depth(index, len(layers)), shares[index], float(point[index]),
                             lo, hi, float(mix_point), mix_lo, mix_hi, mixture_blocks, spread,
                             int(replicates), entry.name, entry.axis, table[:, index].copy(),
                             table[:, -1].copy()))
        if on_epoch is not None:
            on_epoch()
    return pd.DataFrame(rows, columns=DISTANCE_COLUMNS)


def _batched_draws(entries, full, parts, dims, count, mixable, replicates, rng, points):
    """Per entry, ``[1 + replicates, count + 1]``: row 0 the point distances of the layers
    and the mixture (last column), then the draws, computed at once
    (:mod:`~layerhessians.analysis.draws`); the draws only when every measure is exact or
    Dirichlet-resampled (else only row 0). ``None`` when an entry has no batched form."""
    from layerhessians.analysis import draws as batch

    if any(e.name not in batch.W1_ENTRIES and e.name != "paper" for e in entries):
        return None
    hows = [spread_method(m) for m in (full, *parts)]
    if replicates == 0 or any(h not in ("exact", "dirichlet") for h in hows):
        replicates = 0

    measures = [full, *parts]
    drawn = [batch.fixed_draws(m) for m in measures]
    resampled = [i for i, h in enumerate(hows) if h == "dirichlet" and replicates]
    if resampled:  # in resample()'s order: draw by draw, measure by measure
        shapes = {i: np.maximum(measures[i].dim * measures[i].per_vector[0][1] / 2.0, 1e-300)
                  for i in resampled}
        columns = {i: [np.asarray(measures[i].weights, np.float64)] for i in resampled}
        for _ in range(replicates):
            for i in resampled:
                draw = np.maximum(rng.gamma(shapes[i]), np.finfo(np.float64).tiny)
                columns[i].append(draw / draw.sum())
        for i in resampled:  # column 0: the measure itself
            drawn[i].weights = np.stack(columns[i], axis=1)
    full_d, parts_d = drawn[0], drawn[1:]
    mix_d = batch.mixture_draws(parts_d, dims) if mixable else None
    out = []
    for entry in entries:
        cache = {}
        columns = [batch.batched_distance(entry.name, full_d, p, points, cache)
                   for p in parts_d[:count]]
        columns.append(batch.batched_distance(entry.name, full_d, mix_d, points, cache)
                       if mix_d is not None else np.full(1 + replicates, np.nan))
        out.append(np.stack([np.broadcast_to(c, (1 + replicates,)) for c in columns], axis=1))
    return out


def layer_distances(run, metric: str | None = None, normalize: str | None = None, epochs=None,
                    points: int = PAPER_POINTS, measure=None, replicates: int = REPLICATES,
                    seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """:func:`distance_table` for one metric (a registry name, default
    :data:`DEFAULT_DISTANCE`; ``"wasserstein"`` with ``normalize`` for the former names)."""
    return distance_table(run, [resolve_metric(metric, normalize)], epochs=epochs,
                          points=points, measure=measure, replicates=replicates, seed=seed,
                          level=level)


def distance_matrix(distances: pd.DataFrame, column: str = "distance") -> pd.DataFrame:
    """``distances`` of one run and metric as a layers x epochs table (layers in order)."""
    table = distances.pivot(index="layer", columns="epoch", values=column)
    order = distances.drop_duplicates("layer").sort_values("index")["layer"]
    return table.loc[list(order)]


# ----------------------------------------------------------------------------- verdicts
def verdict(points, draws, level: float = LEVEL) -> dict:
    """Whether the candidate with the smallest distance is significantly closer.

    Args:
        points: [K] distances (NaN ignored).
        draws: [K, B] paired bootstrap draws of the same distances.
        level: the support required, in (0, 1).

    Returns:
        ``{"best": i, "runner_up": j or None, "support": s, "significant": bool}``:
        ``best`` the smallest point distance (first on ties), ``support`` the fraction of
        draws in which it is strictly closer than every other candidate (NaN without
        draws), ``significant`` when ``support >= level`` and the point distances do not
        tie. A single candidate is significant by definition (support 1).
    """
    points = np.asarray(points, np.float64)
    draws = np.asarray(draws, np.float64).reshape(points.size, -1)
    finite = np.where(np.isnan(points), np.inf, points)
    order = np.argsort(finite, kind="stable")
    best = int(order[0])
    if points.size == 1:
        return {"best": best, "runner_up": None, "support": 1.0, "significant": True}
    runner = int(order[1])
    scale = max(np.nanmax(np.abs(points)), 1e-300)
    tol = 1e-9 * scale
    if draws.shape[1] == 0 or not np.all(np.isfinite(draws)):
        return {"best": best, "runner_up": runner, "support": np.nan, "significant": False}
    others = np.delete(draws, best, axis=0)
    support = float(np.mean(np.all(draws[best] < others - tol, axis=0)))
    strict = finite[runner] - finite[best] > tol
    return {"best": best, "runner_up": runner, "support": support,
            "significant": bool(strict and support >= level)}


def _cube(distances):
    """``(epochs [E], layers frame [L], points [E, L], draws [E, L, B])`` of one run/metric."""
    frame = distances.sort_values(["epoch", "index"], kind="stable")
    epochs = sorted(frame["epoch"].unique())
    layers = frame.drop_duplicates("index").sort_values("index")
    E, L = len(epochs), len(layers)
    points = frame["distance"].to_numpy(np.float64).reshape(E, L)
    if "draws" in frame:
        draws = np.stack([np.asarray(d, np.float64) for d in frame["draws"]])
        draws = draws.reshape(E, L, -1)
    else:
        draws = np.zeros((E, L, 0))
    return epochs, layers, points, draws


def epoch_verdicts(distances: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per epoch of one run and metric: ``epoch, layer, index, distance, support,
    significant`` for the closest layer (:func:`verdict`)."""
    epochs, layers, points, draws = _cube(distances)
    rows = []
    for e, epoch in enumerate(epochs):
        v = verdict(points[e], draws[e], level)
        rows.append((epoch, layers["layer"].iloc[v["best"]], v["best"], points[e, v["best"]],
                     v["support"], v["significant"]))
    return pd.DataFrame(rows, columns=["epoch", "layer", "index", "distance", "support",
                                       "significant"])


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


def profile(distances: pd.DataFrame, epoch=None, level: float = LEVEL) -> pd.DataFrame:
    """Per layer of one run and metric: ``layer, index, depth, share, distance, low, high,
    relative, relative_low, relative_high``.

    ``distance`` is the distance at ``epoch``, or summed over all epochs in ``distances``
    if ``epoch`` is None; ``low``/``high`` the interval of its draws (:func:`interval`) (the draws
    summed over epochs; NaN without draws); ``relative*`` are divided by the largest
    ``distance`` over layers (the original's per-run normalisation for its figures; NaN if
    that maximum is 0).
    """
    rows = distances if epoch is None else distances[distances["epoch"] == epoch]
    if rows.empty:
        raise ValueError(f"no distances at epoch {epoch}")
    epochs, layers, points, draws = _cube(rows)
    summed, summed_draws = points.sum(axis=0), draws.sum(axis=0)
    intervals = [interval(d, p, level) for d, p in zip(summed_draws, summed)]
    table = pd.DataFrame({
        "layer": layers["layer"].to_numpy(), "index": layers["index"].to_numpy(),
        "depth": layers["depth"].to_numpy(),
        "share": layers["share"].to_numpy() if "share" in layers else np.nan,
        "distance": summed, "low": [i[0] for i in intervals], "high": [i[1] for i in intervals]})
    top = table["distance"].max()
    for col, src in (("relative", "distance"), ("relative_low", "low"), ("relative_high", "high")):
        table[col] = table[src] / top if top > 0 else np.nan
    return table.reset_index(drop=True)


def _epoch_list(epochs) -> str:
    return ",".join(str(int(e)) for e in epochs)


def summarize(distances: pd.DataFrame, peaks=None, level: float = LEVEL) -> pd.DataFrame:
    """One row per (run, metric): the peak epoch and the best-matching layer there and over
    training, each with its spread and verdict, and the block-diagonal baseline.

    ``peaks``: optional ``{run: epoch}`` overrides (else :func:`peak_epoch`). Columns beyond
    the layer's name/index/depth/distance: ``*_low``/``*_high`` intervals, ``*_share`` the
    layer's share of the parameters, ``*_support`` and ``*_significant`` (:func:`verdict`),
    ``*_verdict`` the layer name or :data:`NO_VERDICT`, ``*_runner_up``;
    ``peak_epoch_support`` and ``peak_epochs_within_spread`` (comma-separated epochs not
    significantly farther than the peak; empty for a given peak); ``mixture_*`` the full
    spectrum's distance to the block-diagonal mixture at the peak and summed.
    """
    peaks = peaks or {}
    rows = []
    for (run, metric), group in distances.groupby(["run", "metric"], sort=False):
        epochs, layers, points, draws = _cube(group)
        names = layers["layer"].tolist()
        best_e = points.min(axis=1)
        given = run in peaks and peaks[run] is not None
        if given:
            peak, source = int(peaks[run]), "given"
            if peak not in epochs:
                raise ValueError(f"no distances at epoch {peak}")
            epoch_support, within = np.nan, ""
        else:
            peak, source = peak_epoch(group), "computed"
            best_draws = draws.min(axis=1) if draws.shape[2] else draws[:, 0, :]
            ev = verdict(best_e, best_draws, level)
            epoch_support = ev["support"]
            p = epochs.index(peak)
            if best_draws.shape[1] and np.all(np.isfinite(best_draws)):
                tol = 1e-9 * max(np.abs(best_e).max(), 1e-300)
                farther = np.mean(best_draws > best_draws[p] + tol, axis=1)
                within = _epoch_list(e for i, e in enumerate(epochs)
                                     if i == p or farther[i] < level)
            else:
                within = _epoch_list(epochs)
        p = epochs.index(peak)
        at = verdict(points[p], draws[p], level)
        summed = profile(group, level=level)
        over = verdict(summed["distance"].to_numpy(), draws.sum(axis=0), level)
        peak_rows = group[group["epoch"] == peak].sort_values("index")
        first = group.iloc[0]
        mix_summed = float(group.drop_duplicates("epoch")["mixture_distance"].sum(min_count=1)
                           ) if "mixture_distance" in group else np.nan
        row = {"run": run, "model": first["model"], "dataset": first["dataset"],
               "metric": metric, "normalize": first["normalize"], "peak_epoch": peak,
               "peak_source": source, "peak_epoch_support": epoch_support,
               "peak_epochs_within_spread": within}
        for prefix, v, frame, value in (("peak", at, peak_rows, "distance"),
                                        ("best", over, summed, "distance")):
            b = v["best"]
            r = frame.iloc[b]
            key = "peak_distance" if prefix == "peak" else "best_summed"
            row.update({
                f"{prefix}_layer": names[b], f"{prefix}_index": int(layers["index"].iloc[b]),
                f"{prefix}_depth": float(layers["depth"].iloc[b]), key: float(r[value]),
                f"{prefix}_low": float(r["distance_low" if prefix == "peak" else "low"]),
                f"{prefix}_high": float(r["distance_high" if prefix == "peak" else "high"]),
                f"{prefix}_share": float(r["share"]) if "share" in r else np.nan,
                f"{prefix}_support": v["support"], f"{prefix}_significant": v["significant"],
                f"{prefix}_verdict": names[b] if v["significant"] else NO_VERDICT,
                f"{prefix}_runner_up": "" if v["runner_up"] is None else names[v["runner_up"]],
            })
        peak_first = peak_rows.iloc[0]
        row.update({
            "mixture_peak": float(peak_first.get("mixture_distance", np.nan)),
            "mixture_peak_low": float(peak_first.get("mixture_low", np.nan)),
            "mixture_peak_high": float(peak_first.get("mixture_high", np.nan)),
            "mixture_summed": mix_summed,
            "mixture_blocks": peak_first.get("mixture_blocks", ""),
            "spread": peak_first.get("spread", ""),
            "replicates": int(peak_first.get("replicates", 0)), "level": level,
            "layers": len(names), "epochs": len(epochs),
        })
        rows.append(row)
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

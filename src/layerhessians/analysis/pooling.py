"""Verdicts pooled over replicated runs: which runs are replicates of one setting, and the
distances, intervals and verdicts of each setting.

**Settings.** Two runs are replicates of one setting when their recorded settings
(config.json, read as a :class:`~layerhessians.training.config.TrainConfig`) differ only in
the training seed and the Hessian-subset seed (:data:`REPLICATE_KEYS`), and they compare the
same layers at the same epochs. Where and how a run executed (:data:`ENVIRONMENT_KEYS`:
device, threads, memory plan, dataset folder, ...) does not separate settings; anything else
does, the dataset's checksum included. :func:`group_runs` says which setting each run joined
and, for every setting, how it differs from the nearest other one.

**Pooling** (:func:`pool_settings`), per setting, metric and scope (``summed``: the distance
summed over the compared epochs; ``peak``: at each replicate's own peak epoch):

- the distance of a layer is the mean over the R replicates of each replicate's distance;
- its spread is a hierarchical bootstrap: draw ``b`` resamples R replicates with
  replacement and, within each, one of that run's own draws (its SLQ vectors resampled,
  :func:`~layerhessians.analysis.matching.resample`), and averages them. Replicates that
  share a training seed (one trained network measured on several Hessian subsets) are not
  independent: they are resampled together, as one cluster (the training seeds are
  resampled, every run of a drawn seed enters). Slot ``i`` of the
  draws takes the run's within-run draws in a fixed random order (slot 0 in their own order),
  so every layer and the mixture share each draw (paired), and one replicate gives exactly
  the run's own draws: a setting with one replicate reproduces the single-run numbers;
- the interval is :func:`~layerhessians.analysis.matching.interval` of the pooled draws;
- ``support``: the fraction of pooled draws in which the layer is strictly closer than every
  other layer; the verdict names the closest layer only when its support is at least the
  level (95%), else :data:`~layerhessians.analysis.matching.NO_VERDICT`;
- ``closest_in``: in how many of the R replicates the layer is the closest (point distances);
- the baseline, the parameter-share mixture of the block spectra, is pooled the same way;
  ``closer_than_mixture`` is the fraction of pooled draws in which the layer is closer to
  the full spectrum than the mixture is;
- the peak epoch: each replicate's own, with their (lower) median, minimum and maximum.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from layerhessians.analysis import matching as compare

#: the settings replicates may differ in (config.json keys; ``hessian.`` nested)
REPLICATE_KEYS = ("seed", "hessian.subset_seed")
#: where and how a run executed, not what it computes (ignored when grouping)
ENVIRONMENT_KEYS = ("device", "threads", "dataset_root", "download", "workers", "save_freq",
                    "export_legacy", "memory_budget", "hessian_batch_size", "dist_backend",
                    "num_epochs")
#: recorded facts that separate settings beside the settings themselves
FACT_KEYS = ("dataset_checksum",)
SCOPES = ("summed", "peak")
#: the columns of ``match_distros_settings.csv``
SETTINGS_COLUMNS = [
    "setting", "model", "dataset", "metric", "scope", "layer", "index", "depth", "share",
    "replicates", "distance", "distance_low", "distance_high", "closest_in", "support",
    "significant", "verdict", "mixture_distance", "mixture_low", "mixture_high",
    "closer_than_mixture", "baseline", "peak_epoch", "peak_epoch_min", "peak_epoch_max",
    "peak_epochs", "seeds", "subset_seeds", "draws", "level", "runs"]
#: the columns of ``match_distros_groups.csv``: one row per run
GROUP_COLUMNS = ["run", "setting", "label", "seed", "subset_seed", "note"]


# ----------------------------------------------------------------------------- grouping
def setting_view(record) -> dict:
    """A run's record (:class:`~layerhessians.store.record.RunRecord`) as the flat settings
    :func:`setting_key` and :func:`group_runs` read: the run facts, then the training
    settings as ``TrainConfig.to_dict()`` spells them (a tracker's run: its facts only)."""
    return {**record.facts, **record.training_settings()}


def setting_key(config: dict) -> dict:
    """The settings of a run's config.json that define its setting: every
    :class:`~layerhessians.training.config.TrainConfig` field (``hessian.*`` flattened) but
    :data:`REPLICATE_KEYS` and :data:`ENVIRONMENT_KEYS`, plus :data:`FACT_KEYS`."""
    from layerhessians.training.config import TrainConfig

    known = TrainConfig.from_dict(config or {}).to_dict()
    flat = {}
    for key, value in known.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    flat.update({k: (config or {}).get(k) for k in FACT_KEYS})
    skip = set(REPLICATE_KEYS) | set(ENVIRONMENT_KEYS)
    return {k: v for k, v in flat.items() if k not in skip}


def _differences(a: dict, b: dict) -> list:
    keys = list(dict.fromkeys([*a, *b]))
    return [(k, a.get(k), b.get(k)) for k in keys
            if json.dumps(a.get(k), default=str, sort_keys=True)
            != json.dumps(b.get(k), default=str, sort_keys=True)]


def not_pooled(nearest) -> str:
    """Why a setting was not pooled with its nearest one (``(setting, differences)``)."""
    other, diffs = nearest
    return f"not pooled with {other}: " + (
        f"differs in {describe(diffs)}" if diffs else
        "the same settings and seeds (a repeat of a run, not a replicate)")


def describe(diffs, limit: int = 3) -> str:
    """``"key a vs b, ..."`` of :func:`group_runs`' differences (the first ``limit``)."""
    def short(value):
        text = repr(value)
        return text if len(text) <= 24 else text[:20] + "...'"

    shown = [f"{k} {short(x)} vs {short(y)}" for k, x, y in diffs[:limit]]
    more = len(diffs) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def group_runs(ids, configs, layouts=None) -> tuple:
    """Which runs are replicates of one setting.

    Args:
        ids: run ids (as in the distance table), in order.
        configs: each run's config.json (dicts), in order.
        layouts: optional per run ``(layers, epochs)`` compared; runs that differ in them
            are not pooled either.

    Returns:
        ``(settings, groups)``: ``settings`` a list of dicts (``setting`` ``"S1"``..,
        ``label`` ``"Model+Dataset"`` (with the first difference where labels repeat),
        ``runs`` (ids), ``key``, ``nearest``: ``(other setting, its differences)`` or
        ``None``) in the order of their first run; ``groups`` a DataFrame with
        :data:`GROUP_COLUMNS` (``note``: why the run's setting was not pooled with the
        nearest other setting).
    """
    from layerhessians.training.config import TrainConfig

    keys, seeds = [], []
    for i, config in enumerate(configs):
        key = setting_key(config)
        if layouts is not None:
            layers, epochs = layouts[i]
            key["compared layers"] = list(layers)
            key["compared epochs"] = compare._epoch_list(epochs)
        keys.append(key)
        recorded = TrainConfig.from_dict(config or {})
        seeds.append((recorded.seed, recorded.hessian.subset_seed))
    settings = []
    for rid, key, pair in zip(ids, keys, seeds):
        for s in settings:  # a run with a setting's seeds repeats a run: not a replicate
            if not _differences(s["key"], key) and pair not in s["seeds"]:
                s["runs"].append(rid)
                s["seeds"].append(pair)
                break
        else:
            settings.append({"setting": f"S{len(settings) + 1}", "key": key, "runs": [rid],
                             "seeds": [pair]})
    for s in settings:
        others = [(o["setting"], _differences(s["key"], o["key"])) for o in settings if o is not s]
        s["nearest"] = min(others, key=lambda o: len(o[1])) if others else None
        s["label"] = f"{s['key'].get('model')}+{s['key'].get('dataset')}"
    labels = [s["label"] for s in settings]
    for s in settings:
        if labels.count(s["label"]) == 1:
            continue
        if len(s["runs"]) == 1 or not (s["nearest"] and s["nearest"][1]):
            s["label"] += f" ({s['runs'][0]})"
        else:
            k, value, _ = s["nearest"][1][0]
            s["label"] += f" ({k.replace('hessian.', 'hessian ')}={value})"
    by_id = {rid: s for s in settings for rid in s["runs"]}
    rows = []
    for rid, pair in zip(ids, seeds):
        s = by_id[rid]
        note = "" if s["nearest"] is None else not_pooled(s["nearest"])
        rows.append((rid, s["setting"], s["label"], pair[0], pair[1], note))
    return settings, pd.DataFrame(rows, columns=GROUP_COLUMNS)


# ----------------------------------------------------------------------------- pooling
def _run_views(group, peak):
    """Per scope: ``(points [L + 1], draws [L + 1, B])`` of one run and metric, the last
    column the mixture baseline."""
    epochs, layers, points, draws = compare._cube(group)
    E, L = points.shape
    B = draws.shape[2]
    frame = group.sort_values(["epoch", "index"], kind="stable").drop_duplicates("epoch")
    mix = frame["mixture_distance"].to_numpy(np.float64) if "mixture_distance" in frame \
        else np.full(E, np.nan)
    if "mixture_draws" in frame and B:
        mix_draws = np.stack([np.asarray(d, np.float64) for d in frame["mixture_draws"]])
    else:
        mix_draws = np.full((E, B), np.nan)
    p = epochs.index(peak)
    views = {"summed": (np.append(points.sum(axis=0), mix.sum()),
                        np.vstack([draws.sum(axis=0), mix_draws.sum(axis=0)[None]])),
             "peak": (np.append(points[p], mix[p]), np.vstack([draws[p], mix_draws[p][None]]))}
    return layers, views


def hierarchical_draws(draws, rng: np.random.Generator, clusters=None):
    """Pooled bootstrap draws over replicates.

    Args:
        draws: float array [R, K, B]: each replicate's within-run draws of K quantities.
        rng: the generator of the replicate resampling and the slots' orders.
        clusters: optional label per replicate [R]: replicates with one label are not
            independent (the same trained network measured on other Hessian examples) and
            are resampled together; ``None`` or all labels distinct: every replicate alone.

    Returns:
        float array [K, B]: draw ``b`` averages, over R slots, replicate ``r[b, i]`` (drawn
        with replacement) at its within-run draw ``order_i[b]`` (``order_0`` the identity,
        the others random permutations). With clusters: C slots draw clusters with
        replacement, and the draw averages every member run of the drawn clusters, a member
        of slot ``j`` at its within-run draw ``order_j[b]``. With R = 1 this is ``draws[0]``.
    """
    draws = np.asarray(draws, np.float64)
    R, K, B = draws.shape
    if B == 0:
        return np.zeros((K, 0))
    if R == 1:
        return draws[0].copy()
    labels = list(range(R)) if clusters is None else list(clusters)
    groups = [[r for r in range(R) if labels[r] == label] for label in dict.fromkeys(labels)]
    if len(groups) < R:
        return _cluster_draws(draws, groups, rng)
    runs = rng.integers(0, R, size=(B, R))
    orders = np.stack([np.arange(B)] + [rng.permutation(B) for _ in range(R - 1)], axis=1)
    picked = draws.transpose(0, 2, 1)[runs, orders]  # [B, R, K]
    return picked.mean(axis=1).T


def _cluster_draws(draws, groups, rng):
    """:func:`hierarchical_draws` over clusters of replicates (``groups``: run indices)."""
    R, K, B = draws.shape
    C = len(groups)
    picks = rng.integers(0, C, size=(B, C))
    orders = np.stack([np.arange(B)] + [rng.permutation(B) for _ in range(C - 1)], axis=1)
    out = np.empty((K, B))
    for b in range(B):
        taken = [draws[r, :, orders[b, j]] for j in range(C) for r in groups[picks[b, j]]]
        out[:, b] = np.mean(taken, axis=0)
    return out


def _strict_support(draws, points):
    """Per candidate: the fraction of draws in which it is strictly closer than every other."""
    K, B = draws.shape
    if B == 0 or not np.all(np.isfinite(draws)):
        return np.full(K, np.nan)
    tol = 1e-9 * max(np.nanmax(np.abs(points)), 1e-300)
    out = np.empty(K)
    for k in range(K):
        others = np.delete(draws, k, axis=0)
        out[k] = np.mean(np.all(draws[k] < others - tol, axis=0)) if K > 1 else 1.0
    return out


def _baseline(fraction, level):
    if not np.isfinite(fraction):  # no draws, or no mixture
        return "no spread"
    if fraction >= level:
        return "closer than the mixture"
    if fraction <= 1 - level:
        return "mixture closer"
    return "as close as the mixture"


def _closest_counts(points, L):
    """Per layer: in how many replicates (rows of ``points`` [R, L]) it is the closest."""
    finite = np.where(np.isnan(points), np.inf, points)
    best = np.argmin(finite, axis=1)  # first on ties, as best_layer's shallowest
    return np.bincount(best, minlength=L)


def pool_settings(distances: pd.DataFrame, settings, peaks=None, level: float = compare.LEVEL,
                  seed: int = 0, seeds=None) -> pd.DataFrame:
    """Distances, intervals and verdicts per setting (module docstring).

    Args:
        distances: :func:`~layerhessians.analysis.matching.distance_table` rows of every
            run (``run`` = its id), with ``draws`` and ``mixture_draws``.
        settings: :func:`group_runs`' settings.
        peaks: optional ``{run id: epoch}`` (else each run's
            :func:`~layerhessians.analysis.matching.peak_epoch`).
        level: the verdicts' support and the intervals' level, in (0, 1).
        seed: seed of the replicate resampling.
        seeds: optional ``{run id: (training seed, subset seed)}`` for the table.

    Returns:
        DataFrame with :data:`SETTINGS_COLUMNS`: one row per setting, metric, scope and
        layer (``verdict`` and ``peak_*`` repeat on the rows of a setting, metric and scope).
    """
    peaks, seeds = peaks or {}, seeds or {}
    rng = np.random.default_rng(seed)
    rows = []
    metrics = list(dict.fromkeys(distances["metric"]))
    for s in settings:
        for metric in metrics:
            per_run, run_peaks = [], []
            layers = None
            for rid in s["runs"]:
                group = distances[(distances["run"] == rid) & (distances["metric"] == metric)]
                peak = peaks.get(rid)
                peak = compare.peak_epoch(group) if peak is None else int(peak)
                layers, views = _run_views(group, peak)
                per_run.append(views)
                run_peaks.append(peak)
            R, L = len(per_run), len(layers)
            # runs of one training seed share their network: resampled together
            clusters = [seeds[r][0] if r in seeds else r for r in s["runs"]]
            first = distances[(distances["run"] == s["runs"][0])
                              & (distances["metric"] == metric)].iloc[0]
            B = min(v["summed"][1].shape[1] for v in per_run)
            peak_median = int(sorted(run_peaks)[(R - 1) // 2])  # the (lower) median epoch
            for scope in SCOPES:
                points = np.stack([v[scope][0] for v in per_run])  # [R, L + 1]
                draws = hierarchical_draws(np.stack([v[scope][1][:, :B] for v in per_run]), rng,
                                           clusters)
                pooled = points.mean(axis=0)
                support = _strict_support(draws[:L], pooled[:L])
                v = compare.verdict(pooled[:L], draws[:L], level)
                counts = _closest_counts(points[:, :L], L)
                mix_lo, mix_hi = compare.interval(draws[L], pooled[L], level)
                verdict = (layers["layer"].iloc[v["best"]] if v["significant"]
                           else compare.NO_VERDICT)
                for i in range(L):
                    lo, hi = compare.interval(draws[i], pooled[i], level)
                    below = (float(np.mean(draws[i] < draws[L])) if B
                             and np.all(np.isfinite(draws[[i, L]])) else np.nan)
                    layer = layers.iloc[i]
                    rows.append({
                        "setting": s["setting"], "model": first["model"],
                        "dataset": first["dataset"], "metric": metric, "scope": scope,
                        "layer": layer["layer"], "index": int(layer["index"]),
                        "depth": float(layer["depth"]), "share": float(layer["share"]),
                        "replicates": R, "distance": float(pooled[i]), "distance_low": lo,
                        "distance_high": hi, "closest_in": int(counts[i]),
                        "support": float(support[i]),
                        "significant": bool(v["significant"] and v["best"] == i),
                        "verdict": verdict, "mixture_distance": float(pooled[L]),
                        "mixture_low": mix_lo, "mixture_high": mix_hi,
                        "closer_than_mixture": below, "baseline": _baseline(below, level),
                        "peak_epoch": peak_median, "peak_epoch_min": int(min(run_peaks)),
                        "peak_epoch_max": int(max(run_peaks)),
                        "peak_epochs": compare._epoch_list(run_peaks),
                        "seeds": _values(seeds[r][0] for r in s["runs"] if r in seeds),
                        "subset_seeds": _values(seeds[r][1] for r in s["runs"] if r in seeds),
                        "draws": int(B), "level": level, "runs": ";".join(s["runs"])})
    return pd.DataFrame(rows, columns=SETTINGS_COLUMNS)


def _values(values) -> str:
    """Distinct values, sorted, comma-separated (unknown ones as ``?``)."""
    values = set(values)
    known = sorted(v for v in values if v is not None)
    return ",".join([str(v) for v in known] + (["?"] if None in values else []))


def setting_verdicts(table: pd.DataFrame, labels=None) -> list:
    """One line per setting and metric of a :func:`pool_settings` table: the closest layer
    over training and at the peak, how many replicates agree, and the baseline comparison.

    ``labels``: optional ``{setting: label}`` (default ``Model+Dataset``)."""
    labels = labels or {}
    lines = []
    for (setting, metric), rows in table.groupby(["setting", "metric"], sort=False):
        first = rows.iloc[0]
        R = int(first["replicates"])
        name = labels.get(setting, f"{first['model']}+{first['dataset']}")
        runs = "1 run" if R == 1 else f"{R} replicates"
        parts = []
        for scope in SCOPES:
            frame = rows[rows["scope"] == scope].sort_values("index")
            best = frame.loc[frame["distance"].idxmin()]
            where = ("over training" if scope == "summed"
                     else f"at the peak epoch {_peak_text(first)}")
            agree = f"closest in {best['closest_in']} of {R}"
            if best["significant"]:
                text = (f"{where}, {best['layer']} (depth {best['depth']:.2f}, "
                        f"{100 * best['share']:.2g}% of parameters) significantly closest "
                        f"({agree})")
            else:
                text = (f"{where}, {compare.NO_VERDICT} (closest {best['layer']}, {agree}, "
                        f"{_pct(best['support'])} of draws)")
            text += f"; {_baseline_text(best)}"
            parts.append(text)
        lines.append(f"{name} [{setting}, {runs}]: " + "; ".join(parts) + f" [{metric}]")
    return lines


def _pct(value):
    return "no spread" if not np.isfinite(value) else f"{100 * value:.0f}%"


def _peak_text(row):
    if row["peak_epoch_min"] == row["peak_epoch_max"]:
        return f"{row['peak_epoch_min']}"
    return (f"{row['peak_epoch']} (the replicates' own peaks: "
            f"{row['peak_epoch_min']}-{row['peak_epoch_max']})")


def _baseline_text(best):
    if not np.isfinite(best["mixture_distance"]):
        return "no parameter-share baseline (block sizes unknown)"
    how = best["baseline"]
    values = f"{best['distance']:.4g} vs {best['mixture_distance']:.4g}"
    if how == "closer than the mixture":
        return f"closer than the parameter-share mixture ({values})"
    if how == "mixture closer":
        return f"but the parameter-share mixture is closer ({values})"
    if how == "as close as the mixture":
        return (f"not distinguishable from the parameter-share mixture ({values}; closer in "
                f"{_pct(best['closer_than_mixture'])} of draws)")
    return f"parameter-share mixture {best['mixture_distance']:.4g} (no spread)"

"""Regularisation methods compared over reruns: the test-error table with Welch's tests
against SGD and against L2, the curvature the methods leave, and the figures.

Input: ``{method: [run directories]}`` (the reruns of each method, see
:func:`~layerhessians.analysis.regularization.rerun_dirs`), or a root whose run directories
are named ``[model=M,dataset=D,]METHOD[,runK]`` (:func:`method_groups`, as the regularisation
grids and ``layerhessians train --reruns`` name them). The references are the methods named
``sgd`` (or the original's ``no``) and ``l2``, where present.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.analysis.regularization import last_epochs, mean_std, welch
from layerhessians.pipeline.replicates import replicate_base, replicate_index
from layerhessians.store.record import RunRecord
from layerhessians.store.run import committed_epoch

__all__ = ["compare_methods", "complete_runs", "method_groups", "report_root"]

#: reference methods: plain SGD (the original calls it ``no``) and weight decay
SGD_NAMES, L2_NAMES = ("sgd", "no"), ("l2",)
_SETTING = re.compile(r"^(?P<setting>model=[^,]+,dataset=[^,]+),(?P<method>.+)$")


def complete_runs(dirs) -> list[Path]:
    """The directories whose committed epoch (the checkpoint's,
    :func:`~layerhessians.store.run.committed_epoch`; every metrics row for a run made by
    other means) reaches the run's recorded ``num_epochs``."""
    out = []
    for path in map(Path, dirs):
        config, metrics = path / "config.json", path / "metrics.csv"
        if not (config.is_file() and metrics.is_file()):
            continue
        done = committed_epoch(path)
        if done is False:
            table = pd.read_csv(metrics)
            done = int(table["epoch"].max()) if len(table) else None
        settings = RunRecord.from_dict(json.loads(config.read_text())).training_settings()
        if done is not None and done >= int(settings.get("num_epochs") or 0):
            out.append(path)
    return out


def method_groups(root) -> "OrderedDict[str, OrderedDict[str, list[Path]]]":
    """``{setting: {method: complete reruns}}`` of the run directories under ``root``.

    A directory ``model=M,dataset=D,METHOD,runK`` belongs to setting ``model=M,dataset=D``
    and method ``METHOD`` (``,runK`` as :mod:`~layerhessians.pipeline.replicates` names
    reruns); one without the ``model=..,dataset=..`` prefix to setting ``""``. Methods in
    order: SGD, L2, then by name. Incomplete runs are left out.
    """
    found: dict = {}
    for path in sorted(Path(root).iterdir()):
        if not (path / "metrics.csv").is_file():
            continue
        base, k = replicate_base(path.name), replicate_index(path.name) or 0
        named = _SETTING.match(base)
        setting, method = (named["setting"], named["method"]) if named else ("", base)
        found.setdefault(setting, {}).setdefault(method, []).append((k, path))
    out = OrderedDict()
    for setting, methods in found.items():
        order = sorted(methods, key=lambda m: (m not in SGD_NAMES, m not in L2_NAMES, m))
        runs = OrderedDict((m, complete_runs([p for _, p in sorted(methods[m])]))
                           for m in order)
        runs = OrderedDict((m, d) for m, d in runs.items() if d)
        if runs:
            out[setting] = runs
    return out


def _reference(runs, names):
    return next((m for m in names if m in runs), None)


def _fmt(mean, std, scale=100, digits=2):
    if not np.isfinite(mean):
        return "-"
    spread = f"{scale * std:.{digits}f}" if np.isfinite(std) else "n/a"
    return f"{scale * mean:.{digits}f} +- {spread}"


def _cell(w, scale=100.0, digits=2):
    if w is None:
        return "-"
    return (f"{scale * w['difference']:+.{digits}f} [{scale * w['low']:+.{digits}f}, "
            f"{scale * w['high']:+.{digits}f}], p = {w['p']:.2g}")


def error_table(runs: dict, labels=None, original=None) -> tuple[list, dict]:
    """Markdown lines and numbers: per method the last-epoch test error, top-5 error and
    gap (mean +- sample std over reruns, in %), and Welch's test against SGD and L2."""
    labels, original = labels or {}, original or {}
    last = {m: last_epochs(d) for m, d in runs.items()}
    errors = {m: (1 - t["test_acc"]).to_numpy() for m, t in last.items()}
    refs = {"sgd": _reference(runs, SGD_NAMES), "l2": _reference(runs, L2_NAMES)}
    header = ("| method | n | test error % | top-5 error % | gap (train - test) % | vs SGD: "
              "difference [95% CI], p | vs L2: difference [95% CI], p |")
    lines = [header + (" original |" if original else ""),
             "|---" * (7 + bool(original)) + "|"]
    numbers = {}
    for method, t in last.items():
        err, top5, gap = (mean_std(errors[method]), mean_std(1 - t["test_top5"]),
                          mean_std(t["gap"]))
        row = {"n": err[2], "test_error": err[:2], "top5_error": top5[:2], "gap": gap[:2],
               "per_run_test_error": list(errors[method]), "runs": list(t["run"])}
        cells = []
        for key, ref in refs.items():
            w = None if ref in (None, method) else welch(errors[method], errors[ref])
            if w is not None:
                row[f"vs_{key}"] = w
            cells.append(_cell(w))
        numbers[method] = row
        line = (f"| {labels.get(method, method)} | {err[2]} | {_fmt(*err[:2])} | "
                f"{_fmt(*top5[:2])} | {_fmt(*gap[:2])} | {cells[0]} | {cells[1]} |")
        lines.append(line + (f" {original.get(method, '-')} |" if original else ""))
    return lines, numbers


def last_curvature(runs: dict) -> dict:
    """Per method: the last epoch's exact trace summed over the layer blocks (``trace/*``
    columns), the top Hessian eigenvalue and the gap, mean +- sample std over reruns, with
    Welch's test against SGD where there is one."""
    out = {}
    for method, dirs in runs.items():
        traces, tops = [], []
        for d in dirs:
            t = pd.read_csv(d / "metrics.csv").iloc[-1]
            columns = [c for c in t.index if c.startswith("trace/")]
            traces.append(sum(float(t[c]) for c in columns) if columns else float("nan"))
            tops.append(float(t["top_eigenvalue"]) if "top_eigenvalue" in t else float("nan"))
        gaps = list(last_epochs(dirs)["gap"])
        out[method] = {"layer_trace_sum": mean_std(traces)[:2],
                       "top_eigenvalue": mean_std(tops)[:2], "gap": mean_std(gaps)[:2],
                       "n": len(dirs), "per_run_trace": traces, "per_run_top": tops,
                       "per_run_gap": gaps}
    sgd = _reference(runs, SGD_NAMES)
    for method, row in out.items():
        if sgd is not None and method != sgd:
            for key in ("trace", "top", "gap"):
                row[f"{key}_vs_sgd"] = welch(row[f"per_run_{key}"], out[sgd][f"per_run_{key}"])
    return out


def _curves(dirs, column):
    tables = [pd.read_csv(d / "metrics.csv") for d in dirs]
    if any(column not in t for t in tables):
        return None, None
    length = min(len(t) for t in tables)
    return (tables[0]["epoch"].to_numpy()[:length],
            np.stack([t[column].to_numpy(dtype=float)[:length] for t in tables]))


def figures(runs: dict, out: Path, labels=None, title: str = "", dpi: int = 150) -> list:
    """``error_bars.png`` (last-epoch test error per method: mean +- sample std, dots the
    runs), ``test_accuracy.png`` (mean over reruns through training, band min-max) and,
    where the runs measured exact layer traces, ``layer_curvature.png`` (per layer the
    trace and the top eigenvalue through training, mean over reruns). Returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    label = lambda m: labels.get(m, m)  # noqa: E731
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(runs)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs)), 3.6))
    for i, (method, dirs) in enumerate(runs.items()):
        err = 100 * (1 - last_epochs(dirs)["test_acc"].to_numpy())
        mean, std, n = mean_std(err)
        ax.errorbar(i, mean, yerr=std if np.isfinite(std) else 0, fmt="o", capsize=4,
                    color=colors[method])
        ax.scatter(np.full(n, i) + 0.12, err, s=10, color=colors[method], alpha=0.6)
    ax.set_xticks(range(len(runs)), [label(m).replace(", ", "\n").replace(" (", "\n(")
                                     for m in runs], fontsize=7)
    ax.set_ylabel("test error at the last epoch (%)")
    ax.set_title(f"{title}: mean +- sample std over reruns (dots: runs)".lstrip(": "),
                 fontsize=9)
    save(fig, "error_bars.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, dirs in runs.items():
        epochs, acc = _curves(dirs, "test_acc")
        ax.plot(epochs, 100 * acc.mean(0), label=f"{label(method)} (n={len(dirs)})",
                color=colors[method])
        ax.fill_between(epochs, 100 * acc.min(0), 100 * acc.max(0), alpha=0.15,
                        color=colors[method])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy: mean over reruns, band min-max", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "test_accuracy.png")

    first = pd.read_csv(next(iter(runs.values()))[0] / "metrics.csv")
    layers = [c.split("/", 1)[1] for c in first.columns if c.startswith("trace/")]
    if layers:
        fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 5.5), squeeze=False)
        for method, dirs in runs.items():
            for j, layer in enumerate(layers):
                for i, kind in enumerate(("trace", "top_eigenvalue")):
                    epochs, values = _curves(dirs, f"{kind}/{layer}")
                    if epochs is None:
                        continue
                    keep = np.isfinite(values).all(0)
                    axes[i, j].plot(epochs[keep], values[:, keep].mean(0), marker=".",
                                    color=colors[method], label=label(method))
                    axes[i, j].set_yscale("log")
                    axes[i, j].set_title(f"{layer}: {'trace' if i == 0 else 'top eigenvalue'}",
                                         fontsize=8)
                    axes[i, j].set_xlabel("epoch", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        fig.suptitle("exact layer Hessian blocks through training, mean over reruns",
                     fontsize=9)
        save(fig, "layer_curvature.png")
    return written


def compare_methods(runs: dict, out, *, labels=None, original=None, title: str = "",
                    dpi: int = 150) -> dict:
    """Write ``table.md`` (the error table, then the curvature table) and the figures
    (:func:`figures`) into ``out``; return every number.

    Args:
        runs: ``{method: [run directories]}``, complete runs (the reruns of each method).
        out: the output folder (created).
        labels: ``{method: label}`` for the tables and figures (default: the names).
        original: ``{method: text}``, a column of recorded numbers to compare with.
        title: the figures' title.
        dpi: the PNGs' resolution.

    Returns:
        ``{"methods": per-method test error numbers and tests, "curvature": per-method
        last-epoch curvature, "table": the markdown, "figures": names}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines, numbers = error_table(runs, labels, original)
    curvature = last_curvature(runs)
    lines += ["", "| method | n | layer-trace sum (last epoch) | vs SGD [95% CI], p | "
              "top Hessian eigenvalue (last epoch) | vs SGD [95% CI], p | gap vs SGD (%) "
              "[95% CI], p |", "|---|---|---|---|---|---|---|"]
    for method, c in curvature.items():
        lines.append(f"| {(labels or {}).get(method, method)} | {c['n']} | "
                     f"{_fmt(*c['layer_trace_sum'], 1, 1)} | "
                     f"{_cell(c.get('trace_vs_sgd'), 1.0, 1)} | "
                     f"{_fmt(*c['top_eigenvalue'], 1, 2)} | {_cell(c.get('top_vs_sgd'), 1.0, 2)}"
                     f" | {_cell(c.get('gap_vs_sgd'))} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return {"methods": numbers, "curvature": curvature, "table": table,
            "figures": figures(runs, out, labels, title, dpi)}


def report_root(root, out=None, dpi: int = 150) -> list[str]:
    """:func:`compare_methods` for every setting (model, dataset) under ``root``, into
    ``out/SETTING`` (default ``root/regularization``); returns printable lines (each
    setting's tables, or why there is none)."""
    root = Path(root)
    out = Path(out) if out is not None else root / "regularization"
    groups = method_groups(root)
    if not groups:
        return [f"no complete run under {root} to compare"]
    lines = []
    for setting, runs in groups.items():
        folder = out / (setting or "runs")
        result = compare_methods(runs, folder, title=setting, dpi=dpi)
        lines += [f"{setting or root}: {len(runs)} method(s), "
                  f"{sum(len(d) for d in runs.values())} run(s); written to {folder}",
                  *result["table"].splitlines(), ""]
    return lines

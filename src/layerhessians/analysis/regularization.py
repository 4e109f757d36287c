"""Reruns of regularisation methods: last-epoch accuracies as mean +- sample std over
reruns, the generalisation gap, and Welch's t-test between two methods.

A method's reruns are the run directories ``BASE,run1`` .. ``BASE,runR`` beside ``BASE`` (as
``layerhessians train --reruns`` and ``sweep --replicates`` name them), or ``BASE`` itself
when it is one run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from layerhessians.errors import UserError
from layerhessians.pipeline.replicates import replicate_base, replicate_index

#: the last-epoch columns summarised (fractions; ``test_top5`` only in runs that record it)
COLUMNS = ("test_acc", "test_top5", "train_acc")


def rerun_dirs(base) -> list[Path]:
    """The run directories of the reruns of ``base`` (``BASE,runK``, by K), or ``[base]``.

    Raises:
        UserError: neither ``base`` nor any ``BASE,runK`` holds a run.
    """
    base = Path(base)
    found = sorted((replicate_index(p.name), p) for p in base.parent.glob(f"{base.name},run*")
                   if replicate_index(p.name) is not None
                   and replicate_base(p.name) == base.name and (p / "metrics.csv").is_file())
    if found:
        return [p for _, p in found]
    if (base / "metrics.csv").is_file():
        return [base]
    raise UserError(f"no run at {base} nor reruns {base},run1..: train them first "
                    "(layerhessians train -r BASE --reruns R)")


def last_epochs(dirs) -> pd.DataFrame:
    """One row per run: its last epoch's ``epoch`` and :data:`COLUMNS`, and ``gap`` (train
    accuracy minus test accuracy, the generalisation gap), ``run`` its directory name."""
    rows = []
    for path in dirs:
        metrics = pd.read_csv(Path(path) / "metrics.csv")
        if not len(metrics):
            continue
        last = metrics.iloc[-1]
        row = {"run": Path(path).name, "epoch": int(last["epoch"])}
        for column in COLUMNS:
            row[column] = float(last[column]) if column in metrics else float("nan")
        row["gap"] = row["train_acc"] - row["test_acc"]
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std(values) -> tuple[float, float, int]:
    """``(mean, sample std (ddof 1; NaN for one value), n)`` of the finite ``values``."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    n = len(values)
    if not n:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else float("nan"), n


def welch(a, b) -> dict:
    """Welch's t-test of ``mean(a) - mean(b)`` (unequal variances, scipy), with its 95%
    confidence interval from the Welch-Satterthwaite degrees of freedom.

    Returns:
        ``{"difference", "t", "df", "p", "low", "high", "n_a", "n_b"}`` (NaN where a side
        has fewer than 2 values).
    """
    from scipy import stats

    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    out = {"difference": float(a.mean() - b.mean()) if len(a) and len(b) else float("nan"),
           "n_a": len(a), "n_b": len(b)}
    if len(a) < 2 or len(b) < 2:
        return {**out, "t": float("nan"), "df": float("nan"), "p": float("nan"),
                "low": float("nan"), "high": float("nan")}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {**out, "t": float("nan"), "df": float("nan"), "p": float("nan"),
                "low": out["difference"], "high": out["difference"]}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    result = stats.ttest_ind(a, b, equal_var=False)
    half = float(stats.t.ppf(0.975, df)) * se
    return {**out, "t": float(result.statistic), "df": float(df), "p": float(result.pvalue),
            "low": out["difference"] - half, "high": out["difference"] + half}


def format_summary(base, dirs=None) -> str:
    """The lines ``plot_penalization.py -r RUN`` prints: last-epoch test top-1 and top-5
    accuracy and the generalisation gap, in percent, as ``mean +- sample std (n = R)``."""
    dirs = rerun_dirs(base) if dirs is None else dirs
    table = last_epochs(dirs)
    if table.empty:
        raise UserError(f"the runs of {base} have no completed epoch yet")
    lines = [f"{base}: {len(table)} run(s), last epoch {sorted(set(table['epoch']))}"]
    for column, label in (("test_acc", "test top-1 accuracy"),
                          ("test_top5", "test top-5 accuracy"),
                          ("train_acc", "train accuracy (running, last epoch)"),
                          ("gap", "generalisation gap (train - test)")):
        mean, std, n = mean_std(table[column])
        if n:
            spread = f"{100 * std:.3f}" if np.isfinite(std) else "n/a"
            lines.append(f"  {label}: {100 * mean:.3f} +- {spread} % (sample std, n = {n})")
    return "\n".join(lines)

"""The scalars a logger receives from one set of spectra: per block, the top Ritz value and
the SLQ trace estimate."""

from collections import OrderedDict

import numpy as np

from layerhessians.vocabulary import FULL

#: scalar names, each followed by ``/<block>``
TOP_EIGENVALUE = "top_eigenvalue"
TRACE = "trace"


def top_ritz_value(measure) -> float:
    """The largest node of ``measure`` with positive weight (the top Ritz value, which
    estimates the largest eigenvalue from below)."""
    nodes, weights = np.asarray(measure.nodes), np.asarray(measure.weights)
    return float(nodes[weights > 0].max())


def spectra_scalars(spectra) -> "OrderedDict[str, float]":
    """The scalars a tracker sends to its loggers.

    The top eigenvalue is the largest Ritz value (with positive quadrature weight); the
    trace is the SLQ estimate ``dim * sum_i w_i lambda_i`` (Ubaru, Chen and Saad, 2017),
    i.e. ``dim * v^T A v`` averaged over the unit start vectors ``v``. Units: those of the
    loss per example (nats for cross-entropy) per squared parameter unit.

    Args:
        spectra: ``{block: SpectralMeasure}`` (``"full"`` first, as the engine returns it).

    Returns:
        ``OrderedDict`` ``{"top_eigenvalue/<block>": float, "trace/<block>": float, ...}``
        in the blocks' order; the trace is left out for a measure without ``dim``.
    """
    scalars = OrderedDict()
    for block, measure in spectra.items():
        scalars[f"{TOP_EIGENVALUE}/{block}"] = top_ritz_value(measure)
        if getattr(measure, "dim", None) is not None:
            scalars[f"{TRACE}/{block}"] = float(measure.trace())
    return scalars


def full_scalars(scalars) -> dict:
    """The full Hessian's scalars of :func:`spectra_scalars`, keyed without the block
    (``{"top_eigenvalue": ..., "trace": ...}``), as the run's metrics.csv records them."""
    return {name: scalars[f"{name}/{FULL}"] for name in (TOP_EIGENVALUE, TRACE)
            if f"{name}/{FULL}" in scalars}

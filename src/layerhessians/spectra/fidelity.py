"""SLQ's error on the layer blocks whose exact spectra the Gram route gives (validation).

:func:`fidelity_rows` is the one computation behind both :func:`slq_fidelity` (any model)
and the trainer's ``--validate-layer-spectra`` (``RUN/slq_fidelity.csv``): run SLQ with the
same settings on the exact blocks and compare (:func:`relative_w1`, top eigenvalue, trace).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import pandas as pd
from torch import nn

from layerhessians.curvature.blocks import layer_blocks
from layerhessians.curvature.certify import certify_blocks
from layerhessians.curvature.gram import block_parameters, gram_factors
from layerhessians.settings import SpectraSettings
from layerhessians.spectra.exact_layers import layer_measure
from layerhessians.spectra.layers import measure_layer_spectra
from layerhessians.spectra.measure import SpectralMeasure, w1

__all__ = ["FIDELITY_COLUMNS", "fidelity_rows", "relative_w1", "slq_fidelity"]

#: the columns of a fidelity table (the trainer's ``slq_fidelity.csv`` adds ``epoch`` first)
FIDELITY_COLUMNS = ["block", "dim", "w1_relative", "exact_top", "slq_top", "exact_trace",
                    "slq_trace"]


def relative_w1(measure: SpectralMeasure, reference: SpectralMeasure) -> float:
    """1-Wasserstein distance between two measures, divided by the reference's span
    (``max - min`` of its nodes; 1 if they coincide)."""
    low, high = reference.support
    span = high - low if high > low else 1.0
    return w1(measure.nodes, measure.weights, reference.nodes, reference.weights) / span


def fidelity_rows(model: nn.Module, loss_fn, data, exact: dict, settings: SpectraSettings,
                  *, plan=None) -> list[dict]:
    """SLQ (``settings``, ``layer_method="slq"``) on the blocks of ``exact`` and its error.

    ``model``, ``loss_fn``, ``data``: as in :func:`~layerhessians.spectra.layer_spectra`;
    ``exact``: ``{block: (parameters, exact SpectralMeasure)}``; ``settings``: the Lanczos
    settings (their seed seeds the start vectors); ``plan``: a
    :class:`~layerhessians.spectra.plan.MemoryPlan` to follow, or ``None``.

    Returns:
        One dict per block with the :data:`FIDELITY_COLUMNS`.
    """
    if not exact:
        return []
    blocks = OrderedDict((name, params) for name, (params, _) in exact.items())
    slq = measure_layer_spectra(model, loss_fn, data, replace(settings, layer_method="slq"),
                                layers=blocks, plan=plan)
    rows = []
    for name, (_, truth) in exact.items():
        approx = slq[name]
        rows.append({"block": name, "dim": truth.dim, "w1_relative": relative_w1(approx, truth),
                     "exact_top": truth.support[1], "slq_top": approx.support[1],
                     "exact_trace": truth.trace(), "slq_trace": approx.trace()})
    return rows


def slq_fidelity(model: nn.Module, loss_fn, data, iterations: int = SpectraSettings.iterations,
                 vectors: int = SpectraSettings.vectors, seed: int = 0, layers=True,
                 **slq_options) -> pd.DataFrame:
    """SLQ's error on every certified layer block, against its exact spectrum.

    Certifies the blocks (those that are not certified are skipped), takes their exact
    spectra by the Gram route and runs SLQ on the same blocks (:func:`fidelity_rows`).

    ``model``, ``loss_fn``, ``data``: as in :func:`~layerhessians.spectra.layer_spectra`;
    ``iterations``, ``vectors``, ``seed`` and ``slq_options``: the SLQ settings
    (:class:`~layerhessians.settings.SpectraSettings` fields); ``layers``: ``True`` (every
    Conv2d/Linear weight) or a ``{name: parameter(s)}`` mapping.

    Returns:
        DataFrame with the :data:`FIDELITY_COLUMNS` (``w1_relative``: :func:`relative_w1` of
        SLQ against exact).

    Raises:
        SettingError: a bad setting.
    """
    settings = SpectraSettings(iterations=iterations, vectors=vectors, seed=seed,
                               **slq_options)
    blocks = block_parameters(model, layer_blocks(model) if layers is True else layers)
    factors = gram_factors(model, loss_fn, data, blocks)
    certificates = certify_blocks(model, loss_fn, data, blocks, factors)
    exact = OrderedDict((name, (blocks[name], layer_measure(factors[name])))
                        for name, c in certificates.items() if c.certified)
    return pd.DataFrame(fidelity_rows(model, loss_fn, data, exact, settings),
                        columns=FIDELITY_COLUMNS)
